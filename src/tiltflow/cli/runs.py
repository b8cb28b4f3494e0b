"""Run folders as the commands read and write them: finding a finished run's model, the names a
run was made with (cli.json), optional plots, and the rank that may write.

Under torchrun every rank trains, and only rank 0 writes files (run folders, samples, plots,
JSON) and prints tables: `writes()` is the one test each command makes before it writes.

Tracking (--report-to). A command opens the run's tracker itself (`open_run_tracker`) and hands
it to the library call, which logs its records to it and leaves it open; the command then adds
its evaluation and the figures it draws (`track_results`) to the same TensorBoard folder or W&B
run, and closes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import distributed
from ..models.flow_model import FlowModel
from ..tracking import Tracker
from ..training import read_log

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


def open_run_tracker(report_to: str, out, name: str, config: dict | None = None) -> Tracker:
    """The tracker of run folder `out` for a command (rank 0 writes; a no-op one for "none")."""
    return Tracker(report_to, out, name, config, enabled=writes())


def track_results(tracker: Tracker, out, figures=(), scalars: dict | None = None, step: int | None = None) -> None:
    """The command's evaluation (numeric scalars of `scalars`, under "eval/...") and the PNG files
    `figures` (paths in run folder `out`, or absolute) that exist (tag: the file's stem) into `tracker` at `step`
    (default: the last logged step of the run, the "iter" or "outer" of its last log.jsonl record)."""
    if not tracker.active:
        return
    if step is None:
        records = read_log(Path(out) / "log.jsonl")
        step = int(records[-1].get("iter", records[-1].get("outer", 0))) if records else 0
    if scalars:
        tracker.log({"eval": scalars}, step)
    for name in figures:
        path = Path(out) / name
        if path.is_file():
            tracker.log_figure(Path(name).stem, path, step)
