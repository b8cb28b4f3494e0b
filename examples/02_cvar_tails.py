"""Fine-tune one base model toward either tail of its reward distribution with CVaR.

CVaR_β at tail mass β = `level` is the mean of the best (tail="right") or worst (tail="left")
β fraction of rewards. Maximising CVaR − λ·KL(p‖p_base) is again one exponential tilt, with the
pseudo-reward (r − η)₊/β or −(η − r)₊/β at a threshold η found first from base samples (TFFT,
arXiv 2602.16796): the right tail pushes the best rewards higher, the left tail lifts the worst.

    python examples/02_cvar_tails.py              # about 20 s on one CPU thread
"""

import os

import torch

import tiltflow as tilt

FAST = os.environ.get("TILTFLOW_EXAMPLE_FAST") == "1"   # a smaller run, for the test suite

task = tilt.toy2d.get_task("mixture")
base = tilt.pretrain(task, iters=200 if FAST else 1000, progress=False)
reward = tilt.rewards.Linear(torch.tensor([1.0, 0.5]))
level, lam = 0.1, 1.0

models = {"base": base}
for tail in ("left", "right"):
    models[f"CVaR {tail}"] = tilt.finetune(base, tilt.CVaR(reward, level=level, tail=tail), lam=lam,
                                           iters=20 if FAST else 100, batch_size=128, steps=20, lr=2e-3,
                                           progress=False)

n = 500 if FAST else 2000
print(f"{'':12s} {'E[r]':>7s} {'worst 10 %':>11s} {'best 10 %':>10s}")
for name, model in models.items():
    r = reward(model.sample(n, steps=50, seed=1)).double()
    print(f"{name:12s} {r.mean().item():7.3f} {tilt.metrics.cvar(r, level, 'left'):11.3f} "
          f"{tilt.metrics.cvar(r, level, 'right'):10.3f}")
