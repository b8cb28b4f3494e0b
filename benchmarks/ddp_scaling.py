"""How does one Adjoint Matching iteration scale from 1 to 2 processes (gloo, CPU) at a fixed
global batch, and how much of it is communication?

Setup: a residual MLP (128, 128) on the closed-form Gaussian base of the tests, reward
(1, 0.5)·x, λ = 1, global batch 512, 50 memoryless-SDE steps, one torch thread per process.
`tiltflow.finetune` is run for `iters` iterations with 1 process and with 2 processes
(torch.multiprocessing spawn, gloo); the per-iteration time is the median of the loop's own
timings (time_rollout + time_adjoint + time_loss) over the iterations after the first 3.
Communication is measured by timing tiltflow.distributed's collectives (gradient all-reduce,
metric mean, reward all-gather) inside the workers.

The machine has 2 cores shared with other jobs, which bounds the speed-up at 2 and usually
below; the numbers say whether the communication share is small, not what a GPU node does.
On NCCL the same code all-reduces the flattened gradient on the GPU (one collective per step,
~tens of µs for this model) and the per-rank rollouts run concurrently on separate devices, so
the speed-up is limited by the rollout/adjoint split only. The JSON records the machine's load
average: with other jobs on both cores, 2 processes cannot beat 1.

Writes results/ddp_scaling.json (no figure: two numbers).

    python benchmarks/ddp_scaling.py            # ~1 min
    python benchmarks/ddp_scaling.py --quick    # ~20 s
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from _common import environment, setup_torch, write_json

MU = [[1.0, -0.5]]
COV = [[[0.49, 0.1], [0.1, 0.3]]]


def _run(iters: int, batch: int, comm: dict | None):
    from tiltflow import distributed as dist
    from tiltflow.methods.finetune import finetune
    from tiltflow.models import FlowModel, GaussianMixtureVelocity
    from tiltflow.rewards import Linear

    if comm is not None:   # time every collective tiltflow calls
        for name in ("average_gradients", "mean", "all_gather"):
            fn = getattr(dist, name)

            def timed(*a, _fn=fn, **k):
                t = time.perf_counter()
                out = _fn(*a, **k)
                comm["total"] += time.perf_counter() - t
                return out
            setattr(dist, name, timed)
    base = FlowModel(GaussianMixtureVelocity([1.0], torch.tensor(MU), torch.tensor(COV)))
    times = []
    finetune(base, Linear(torch.tensor([1.0, 0.5])), lam=1.0, iters=iters, batch_size=batch, steps=50,
             n_offline=64, progress=False,
             callback=lambda it, r: times.append(r["time_rollout"] + r["time_adjoint"] + r["time_loss"]))
    return times


def _worker(rank, world, port, iters, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    setup_torch(1)
    comm = {"total": 0.0}
    t0 = time.perf_counter()
    times = _run(iters, batch, comm)
    wall = time.perf_counter() - t0
    from tiltflow import distributed as dist
    dist.shutdown()
    with open(os.path.join(out, f"r{rank}.txt"), "w") as f:
        f.write(f"{statistics.median(times[3:])} {comm['total']} {wall}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    iters, batch = (15, 256) if args.quick else (40, 512)
    setup_torch(1)
    t0 = time.perf_counter()
    one = _run(iters, batch, None)
    wall1 = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(2, port, iters, batch, tmp), nprocs=2, join=True)
        ranks = [list(map(float, open(os.path.join(tmp, f"r{r}.txt")).read().split())) for r in (0, 1)]
    it1 = statistics.median(one[3:])
    it2 = max(r[0] for r in ranks)
    comm_share = max(r[1] / r[2] for r in ranks)
    result = {
        "question": "AM iteration time with 1 and 2 gloo processes at a fixed global batch",
        "setup": {"global_batch": batch, "steps": 50, "iters": iters, "net": "residual MLP (128, 128)",
                  "backend": "gloo", "threads_per_process": 1},
        "iteration_s_1proc": it1, "iteration_s_2proc": it2, "speedup": it1 / it2,
        "communication_share_2proc": comm_share,
        "wall_s_1proc": wall1, "wall_s_2proc": max(r[2] for r in ranks),
        "note": "2 shared CPU cores bound the speed-up at 2; communication = time inside "
                "tiltflow.distributed collectives / wall time of the finetune call",
        "load_average_1min_after": os.getloadavg()[0],
        "environment": environment(),
    }
    path = write_json("ddp_scaling", result)
    print(f"1 process {it1 * 1e3:.1f} ms/iter, 2 processes {it2 * 1e3:.1f} ms/iter "
          f"(speed-up {it1 / it2:.2f}); communication {100 * comm_share:.1f} % of the 2-process run; wrote {path}")


if __name__ == "__main__":
    main()
