"""Run folders as the commands read and write them: finding a finished run's model, the names a
run was made with (cli.json), optional plots, and the rank that may write.

Under torchrun every rank trains, and only rank 0 writes files (run folders, samples, plots,
JSON) and prints tables: `writes()` is the one test each command makes before it writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import distributed
from ..models.flow_model import FlowModel

EXIT_USER_ERROR = 2
EVAL_SEED_OFFSET = 1000     # evaluation samples never share a stream with training
RUN_INFO = "cli.json"       # names (task, reward, objective) a run was made with


def writes() -> bool:
    """True on the process that writes files and prints results (rank 0; the only one without torchrun)."""
    return distributed.is_main()


def run_dir(run) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist; pass the --out of a "
                                "finished `tiltflow pretrain` or `tiltflow finetune`")
    return run


def load_model(run, device="auto") -> FlowModel:
    """The model of a finished run folder, on `device` (distributed.device: "auto" picks the GPU if any)."""
    f = run_dir(run) / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"no model file {str(f)!r}: the run has not finished; "
                                "complete it with --resume or pass another --run")
    return FlowModel.load(f, device=distributed.device(device))


def run_info(run) -> dict:
    f = Path(run) / RUN_INFO
    return json.loads(f.read_text()) if f.is_file() else {}


def plots():
    """The plots module, or None with a note naming the extra (plots are optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: skipping plots: plotting needs matplotlib: pip install 'tiltflow[plot]'", file=sys.stderr)
        return None
    from .. import plots as plots_mod
    return plots_mod


def print_config(name: str, cfg) -> None:
    if writes():
        print(f"tiltflow {name}: {cfg}")


def prepare_run(out, config: dict, resume: bool, resumable_keys) -> None:
    """checkpoint.prepare_run (config.json; on resume, the check that the settings are the run's)
    on rank 0 alone; under torchrun the other ranks learn whether it refused and raise too, rather
    than train on while rank 0 has stopped."""
    distributed.setup()
    error = None
    if writes():
        try:
            ckpt.prepare_run(out, config, resume, resumable_keys=resumable_keys)
        except ValueError as e:
            error = e
    refused = distributed.all_gather(torch.tensor([float(error is not None)]))
    if error is not None:
        raise error
    if bool(refused.any()):
        raise ValueError(f"rank 0 refused the run folder {str(out)!r} (see its message)")
