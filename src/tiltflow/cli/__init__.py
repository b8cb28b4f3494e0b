"""The `tiltflow` command: pretrain | finetune | gft | fdc | sample-energy | sample | evaluate | demo | molecules | design | digits.

Each training command writes a run folder (config.json, log.jsonl, metrics.json,
model.safetensors, checkpoints/, plots), can be resumed with --resume and reports its training
records to TensorBoard or W&B with --report-to. The flags of `pretrain`, `finetune`, `gft`, `demo`,
`molecules` and `digits` map one to one onto the fields of PretrainConfig, FinetuneConfig,
GFTConfig, DemoConfig, MoleculesConfig and DigitsConfig (flags.py); `--iters` counts optimiser
steps and `--steps` integration steps, and old spellings still work as hidden flags that warn.
User errors (a missing run folder or model file, an unknown name, an invalid setting) print one
line and exit with code 2. Under torchrun every rank trains and only rank 0 writes files.

One module per command (pretrain.py, finetune.py, gft.py, fdc.py, sample.py for sample and
evaluate, sample_energy.py, demo.py, digits.py, molecules.py, design.py); evaluation.py holds the 2-D
evaluation and the closed-form tilt, runs.py the run-folder helpers.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .. import distributed
from . import demo, design, digits, fdc, finetune, gft, molecules, pretrain, sample, sample_energy
from .demo import FAST, DemoConfig, cmd_demo
from .digits import DIGITS_OBJECTIVES, DigitsConfig, cmd_digits
from .evaluation import EvalConfig, exact_tilt, exact_tilt_kl
from .fdc import FDC_UTILITIES, cmd_fdc
from .finetune import cmd_finetune
from .flags import config_dict, config_from
from .gft import cmd_gft
from .molecules import MoleculesConfig, cmd_molecules
from .pretrain import cmd_pretrain
from .runs import EVAL_SEED_OFFSET, EXIT_USER_ERROR, RUN_INFO
from .sample import cmd_evaluate, cmd_sample
from .sample_energy import cmd_sample_energy

__all__ = ["main", "build_parser", "EvalConfig", "DemoConfig", "MoleculesConfig", "DigitsConfig", "FAST",
           "DIGITS_OBJECTIVES", "FDC_UTILITIES", "EXIT_USER_ERROR", "EVAL_SEED_OFFSET", "RUN_INFO",
           "config_from", "config_dict", "exact_tilt", "exact_tilt_kl",
           "cmd_pretrain", "cmd_finetune", "cmd_gft", "cmd_fdc", "cmd_sample", "cmd_evaluate",
           "cmd_sample_energy", "cmd_demo", "cmd_molecules", "cmd_digits"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiltflow",
        description="Fine-tune flow models by exponential tilts p* ∝ p_base·exp(r/λ) "
                    "(Adjoint Matching; expected reward or CVaR).")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the small 2-D models run fastest on one thread, "
                        "and much faster than with several when cores are shared)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pretrain.add_parser(sub)
    finetune.add_parser(sub)
    gft.add_parser(sub)
    fdc.add_parser(sub)
    sample.add_parsers(sub)          # sample, evaluate
    sample_energy.add_parser(sub)
    demo.add_parser(sub)
    molecules.add_parser(sub)
    design.add_parser(sub)
    digits.add_parser(sub)
    return p


def main(argv=None) -> int:
    """Run one command; returns its exit code. A process started by a launcher (torchrun) with
    the real command line ends inside, by distributed.end_process (os._exit after flushing)."""
    code = _main(argv)
    if argv is None and distributed.launched():
        distributed.end_process(code)
    return code


def _main(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv        # finetune --config tells the flags given from the defaults; demo saves the command
    if args.threads < 1:
        print(f"tiltflow: error: --threads must be a positive integer, got {args.threads}", file=sys.stderr)
        return EXIT_USER_ERROR
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            # Python hides DeprecationWarnings outside __main__; a renamed flag should be seen
            warnings.filterwarnings("default", message="--", category=DeprecationWarning)
            return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tiltflow {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ImportError as e:
        print(f"tiltflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ntiltflow {args.command}: interrupted; continue with the same command and --resume",
              file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()   # closes the process group opened under torchrun, if any


if __name__ == "__main__":
    sys.exit(main())
