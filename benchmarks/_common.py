"""Small helpers shared by the benchmark scripts: where results go, the run's environment,
timing with medians over repeats, and writing the JSON and PNG of one benchmark.

Not part of the library; each benchmark stays runnable on its own (`python benchmarks/x.py`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def setup_torch(threads: int = 1) -> None:
    """One intra-op thread: tiny 2-D models are dominated by dispatch, and the machine is shared."""
    torch.set_num_threads(threads)


def environment() -> dict:
    """What the numbers depend on: versions, threads, CPU (tiltflow.tracking.environment)."""
    from tiltflow.tracking import environment as env
    return env()


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict:
    """Median (the figure of merit on a shared machine), min, max and all samples, in seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "n": len(times), "samples_s": times}


def _jsonable(obj):
    if is_dataclass(obj):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)            # JSON has no NaN/inf
    return obj


def write_json(name: str, payload: dict) -> Path:
    """Write results/<name>.json (pretty, with the environment added) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def save_figure(fig, name: str) -> Path:
    """Save a matplotlib figure as results/<name>.png and close it."""
    import matplotlib.pyplot as plt
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def print_table(rows: list[list], header: list[str]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
