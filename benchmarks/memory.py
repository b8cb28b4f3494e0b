"""Does memory stay flat over a long fine-tuning run (no growth in retained tensors)?

A tiny closed-form base (2-D Gaussian, exact velocity) fine-tuned by `tiltflow.finetune` with a
linear reward for 10⁴ iterations (batch 16, 4 SDE steps, residual MLP 16-16, with a run folder,
so logging and checkpoints every 1000 iterations are part of what is measured). Every 500
iterations the callback records the resident set size (/proc/self/statm) and the number of live
torch tensors (gc). Growth is reported as the change between the first record after warm-up
(iteration 1000) and the last; a leak of one tensor per iteration would show 9000 tensors.

Writes results/memory.json and results/memory.png.

    python benchmarks/memory.py            # 10⁴ iterations (~2-4 min)
    python benchmarks/memory.py --quick    # 2000 iterations
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tiltflow as tilt  # noqa: E402

NAME = "memory"


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():   # isinstance on every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    _common.setup_torch()
    iters = 2000 if args.quick else 10_000
    base = tilt.FlowModel(tilt.GaussianMixtureVelocity([1.0], [[1.0, -0.5]], 0.49 * torch.eye(2)[None]))
    records = []

    def callback(it, rec):
        if it % 500 == 0:
            records.append({"iter": it, "rss_mb": rss_mb(), "tensors": live_tensors()})

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tilt.finetune(base, tilt.rewards.Linear([1.0, 0.5]), lam=1.0, iters=iters, batch_size=16, steps=4,
                      residual_hidden=(16, 16), checkpoint_every=1000, out=Path(tmp) / "run",
                      progress=False, callback=callback)
    first = next(r for r in records if r["iter"] >= 1000)
    last = records[-1]
    growth = {"rss_mb": last["rss_mb"] - first["rss_mb"], "tensors": last["tensors"] - first["tensors"],
              "from_iter": first["iter"], "to_iter": last["iter"]}
    _common.print_table([[r["iter"], r["rss_mb"], r["tensors"]] for r in records], ["iter", "RSS MB", "live tensors"])
    print("growth after warm-up:", growth)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ax[0].plot([r["iter"] for r in records], [r["rss_mb"] for r in records], marker=".")
        ax[0].set(xlabel="iteration", ylabel="RSS (MB)")
        ax[1].plot([r["iter"] for r in records], [r["tensors"] for r in records], marker=".")
        ax[1].set(xlabel="iteration", ylabel="live torch tensors")
        fig.suptitle("memory over a long finetune run")
        _common.save_figure(fig, NAME)
    except ImportError:
        print("matplotlib missing: no PNG (pip install 'tiltflow[plot]')")
    path = _common.write_json(NAME, {"iters": iters, "records": records, "growth": growth,
                                     "wall_s": time.perf_counter() - t0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
