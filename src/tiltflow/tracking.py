"""tracking: the library's logging conventions and experiment tracking (TensorBoard, W&B).

Logging. The library logs through `get_logger(name)`, a child of the "tiltflow" logger, never
through print. So that a user who has configured nothing still sees a run's configuration line
and its resume warnings, the first `get_logger` call installs a stderr handler at INFO with the
format "%(message)s" on "tiltflow" (and sets that logger to INFO) — only when neither "tiltflow"
nor the root logger has handlers. A user who configures logging (`logging.basicConfig(...)`,
their own handlers) gets tiltflow's records through propagation instead; the default handler
stands down as soon as the root logger has handlers, so a record is never shown twice. To
quiet the library: `logging.getLogger("tiltflow").setLevel(logging.WARNING)`.

Tracking. `Tracker(report_to, run_dir, name, config)` sends the records a run writes to
log.jsonl (every numeric scalar of each record) and its figures to TensorBoard
(`<run_dir>/tensorboard`) or Weights & Biases (project $WANDB_PROJECT, default "tiltflow";
WANDB_MODE=offline works without network). Each backend is an optional extra:
`pip install 'tiltflow[tensorboard]'` or `'tiltflow[wandb]'`.

One run, one tracker. Every entry point's `report_to` also takes an open Tracker: the run logs
into it and leaves it open (`open_tracker`), so that the caller can add what it makes after the
library call returns (the command line's evaluation scalars and PNG figures) to the same
TensorBoard folder or W&B run, then close it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import numbers
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .validation import one_of

__all__ = ["Tracker", "environment", "get_logger", "open_tracker", "tracked", "REPORT_TO"]

REPORT_TO = ("none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}   # report_to -> the package it needs


class _DefaultHandler(logging.StreamHandler):
    """stderr at emit time (so redirected or captured stderr is honoured), silent once the root
    logger has handlers: the user has configured logging after our handler was installed and
    receives the record through propagation."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.setLevel(logging.INFO)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):    # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def _install_default_handler() -> None:
    # The decision lives on the logging tree, not in a module flag: once installed, "tiltflow"
    # has a handler and this is a no-op.
    lib = logging.getLogger("tiltflow")
    if lib.handlers or logging.getLogger().handlers:
        return
    lib.addHandler(_DefaultHandler())
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.INFO)


def get_logger(name: str) -> logging.Logger:
    """The logger "tiltflow.<name>" (a name already under "tiltflow", e.g. a module's __name__,
    is used as it is). Installs the default stderr handler on first use (module docstring)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _install_default_handler()
    full = name if name == "tiltflow" or name.startswith("tiltflow.") else f"tiltflow.{name}"
    return logging.getLogger(full)


def _scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric scalars of a log record as floats, nested dicts flattened to "a/b" tags.
    Bools count (accepted → 1.0); strings, lists and None are skipped; NaN and inf are kept."""
    out = {}
    for key, v in record.items():
        tag = f"{prefix}{key}"
        if isinstance(v, dict):
            out.update(_scalars(v, tag + "/"))
        elif isinstance(v, (bool, numbers.Real)):
            out[tag] = float(v)
        elif isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
            out[tag] = float(v.item())
    return out


def _missing(report_to: str) -> ImportError:
    pkg = _PACKAGES[report_to]
    return ImportError(f"report_to={report_to!r} needs the {pkg} package: pip install 'tiltflow[{report_to}]'")


class Tracker:
    """Experiment tracking of one run: `log(record, step)`, `log_figure(tag, fig, step)`, `close()`.

    report_to: "none" (every call a no-op), "tensorboard" (event files in
    `<run_dir>/tensorboard`, or ./runs/tensorboard/<name> when run_dir is None) or "wandb" (a
    run named `name` in project $WANDB_PROJECT, default "tiltflow", its files under run_dir,
    `config` as its config; WANDB_MODE=offline works without network).
    enabled=False (non-zero ranks under torchrun) makes it a no-op too, after the same checks,
    so every process fails alike on a bad report_to or a missing package.
    Use as a context manager, or call close() at the end of the run.
    """

    def __init__(self, report_to: str = "none", run_dir=None, name: str = "run", config: dict | None = None,
                 enabled: bool = True):
        one_of(report_to, "report_to", REPORT_TO)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if report_to != "none" and importlib.util.find_spec(_PACKAGES[report_to]) is None:
            raise _missing(report_to)
        self.report_to = report_to
        self.active = bool(enabled) and report_to != "none"
        self._writer = self._run = None
        if not self.active:
            return
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise _missing(report_to) from e
            log_dir = Path(run_dir) / "tensorboard" if run_dir is not None else Path("runs") / "tensorboard" / name
            self._writer = SummaryWriter(log_dir=str(log_dir))
        else:
            import wandb
            if run_dir is not None:
                Path(run_dir).mkdir(parents=True, exist_ok=True)
            # create_new: a run of our own, closed by close(); an outer run's tracker (fdc) and
            # a user's own W&B run are left alone.
            # the config as config.json holds it (paths, dtypes as strings)
            config = None if config is None else json.loads(json.dumps(config, default=str))
            self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tiltflow"), name=name,
                                   dir=None if run_dir is None else str(run_dir), config=config,
                                   reinit="create_new")

    def log(self, record: dict, step: int) -> None:
        """Every numeric scalar of `record` (one log.jsonl line) at `step` (a non-decreasing int)."""
        if not self.active:
            return
        if not isinstance(record, dict):
            raise ValueError(f"record must be a dict, got {type(record).__name__}")
        values = _scalars(record)
        if self._writer is not None:
            for tag, v in values.items():
                self._writer.add_scalar(tag, v, global_step=int(step))
        else:
            self._run.log(values, step=int(step))

    def log_figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib Figure (left open) or a PNG file (str or Path) under `tag` at `step`."""
        if not self.active:
            return
        if isinstance(figure, (str, os.PathLike)):
            path = Path(figure)
            if not path.is_file():
                raise ValueError(f"figure must be a matplotlib Figure or an existing PNG file, got {str(figure)!r}")
        elif not hasattr(figure, "savefig"):
            raise ValueError(f"figure must be a matplotlib Figure or a PNG path, got {type(figure).__name__}")
        if self._writer is not None:
            if hasattr(figure, "savefig"):
                self._writer.add_figure(tag, figure, global_step=int(step), close=False)
            else:
                import numpy as np
                from PIL import Image
                with Image.open(path) as im:
                    pixels = np.asarray(im.convert("RGB"))
                self._writer.add_image(tag, pixels, global_step=int(step), dataformats="HWC")
        else:
            import wandb
            self._run.log({tag: wandb.Image(figure if hasattr(figure, "savefig") else str(figure))}, step=int(step))

    def close(self) -> None:
        """Flush and close the writer or finish the W&B run; calling it again does nothing."""
        if self._writer is not None:
            self._writer.close()
        if self._run is not None:
            self._run.finish()
        self._writer = self._run = None
        self.active = False

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tracker(report_to={self.report_to!r}, active={self.active})"


def open_tracker(report_to, run_dir=None, name: str = "run", config: dict | None = None,
                 enabled: bool = True) -> tuple[Tracker, bool]:
    """The tracker a run logs to and whether the run owns it (closes it when it ends).

    report_to: "none", "tensorboard" or "wandb" → a Tracker opened here for the run (a no-op one
    for "none"), owned; an open Tracker (the caller's) → (it, False): used as it is, left open."""
    if isinstance(report_to, Tracker):
        return report_to, False
    return Tracker(report_to, run_dir, name, config, enabled=enabled), True


@contextlib.contextmanager
def tracked(report_to, run_dir=None, name: str = "run", config: dict | None = None, enabled: bool = True):
    """`with tracked(...) as tracker:` open_tracker, closing the tracker at the end if it is the run's own."""
    tracker, owned = open_tracker(report_to, run_dir, name, config, enabled)
    try:
        yield tracker
    finally:
        if owned:
            tracker.close()


def environment() -> dict:
    """What a run's numbers depend on: Python, torch and tiltflow versions, torch threads, the CPU
    model, the platform and the date (written into summaries and benchmark results)."""
    from . import __version__
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": sys.version.split()[0], "torch": torch.__version__, "tiltflow": __version__,
            "threads": torch.get_num_threads(), "cpu": cpu, "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
