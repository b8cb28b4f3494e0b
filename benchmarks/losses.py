"""Which tilt loss should I use? The losses side by side on one closed-form tilt.

Tilt: base N(μ, Σ) (exact velocity), r = −½|x|², λ = 1, so p* = N(Σ'Σ⁻¹μ, Σ'), Σ' = (Σ⁻¹ + I)⁻¹.
For each solver (adjoint_matching, adjoint_sampling, target/conditional/novel score matching,
cmcd, nets) `finetune` runs for each budget in ITERS (batch 256, 50 steps, lr 2e-3, every interior time
in the loss) and we record the error of 20000 ODE samples — max |mean − mean*| and max |cov − cov*|
— and the wall time. Then the gradient variance: tr Cov of the one-row gradient at fixed t for
exact P* pairs (AM: along base rollouts with their lean adjoint), and its average over the
interior times of a uniform grid of N steps as the step 1/N shrinks.

Writes results/losses.json, results/losses_error.png (error vs iterations and vs wall time) and
results/losses_gradvar.png (variance vs t; vs step size). `--quick`: budgets 50/200 only.
"""

from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import save_figure, setup_torch, write_json  # noqa: E402

from tiltflow import integrators  # noqa: E402
from tiltflow.methods.finetune import finetune, make_finetune_model  # noqa: E402
from tiltflow.models import FlowModel, GaussianMixtureVelocity  # noqa: E402
from tiltflow.rewards import Quadratic  # noqa: E402
from tiltflow.solvers import SOLVERS, adjoint_matching as am, get_solver  # noqa: E402
from tiltflow.solvers.reciprocal import bridge_sample, gradient_variance  # noqa: E402

MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[0.49, 0.1], [0.1, 0.3]])
A = torch.eye(2)
COV_T = torch.linalg.inv(torch.linalg.inv(COV) + A)
MU_T = COV_T @ torch.linalg.solve(COV, MU)


def base():
    return FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))


def errors(ft):
    x = ft.sample(20000, steps=50, seed=1)
    return float((x.mean(0) - MU_T).abs().max()), float((torch.cov(x.T) - COV_T).abs().max())


def gradvar_curves(times, n=96):
    b = base()
    ft = make_finetune_model(b, "residual", (32, 32), 0)
    torch.manual_seed(0)
    for p in ft.net.residual.out.parameters():
        torch.nn.init.normal_(p, std=0.01)
    g = torch.Generator().manual_seed(0)
    x1 = torch.distributions.MultivariateNormal(MU_T, COV_T).sample((n,))
    a1 = x1 @ A
    out = {}
    for name in SOLVERS:
        if name in ("adjoint_matching", "cmcd", "nets"):   # not regressions on a score estimate T
            continue
        s, v = get_solver(name), []
        for tv in times:
            t = torch.full((n,), float(tv))
            xt, eps = bridge_sample(b.path, x1, t, g)
            v.append(gradient_variance(ft, b, xt, t, s.target(b, x1, a1, xt, eps, t)))
        out[name] = v
    # AM: base rollouts of the *tilted* model (exact P* paths), lean adjoint of the base
    tilted = FlowModel(GaussianMixtureVelocity([1.0], MU_T[None], COV_T[None]))
    steps = 200
    grid = integrators.time_grid(steps)
    ro = am.rollout(tilted, n, grid, g)
    a1_am, _ = am.terminal_adjoint(Quadratic(A), ro.xs[-1], 1.0)
    adj = am.lean_adjoint(b, ro, a1_am)
    v = []
    for tv in times:
        i = min(max(int(round(float(tv) * steps)), 1), steps - 1)
        t = torch.full((n,), float(grid[i]))
        v.append(gradient_variance(ft, b, ro.xs[i], t, -adj[i]))
    out["adjoint_matching"] = v
    return out


def main(quick: bool = False):
    setup_torch()
    iters_list = [50, 200] if quick else [50, 100, 200, 400]
    runs = {}
    for name in SOLVERS:
        runs[name] = []
        for iters in iters_list:
            t0 = time.perf_counter()
            ft = finetune(base(), Quadratic(A), lam=1.0, iters=iters, batch_size=256, steps=50, lr=2e-3,
                          progress=False, seed=0, solver=name)
            wall = time.perf_counter() - t0
            me, ce = errors(ft)
            runs[name].append({"iters": iters, "wall_s": wall, "mean_err": me, "cov_err": ce})
            print(f"{name:28s} iters {iters:4d}  {wall:6.1f}s  mean err {me:.3f}  cov err {ce:.3f}", flush=True)
    times = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995]
    gv = gradvar_curves(times)
    # grid average: mean over interior times k/N of the per-time variance (interpolated in log-log)
    import numpy as np
    lt, by_n = np.log(times), {}
    for name, v in gv.items():
        lv = np.log(v)
        by_n[name] = {}
        for N in (10, 20, 50, 100, 200):
            tt = np.arange(1, N) / N
            tt = tt[(tt >= times[0]) & (tt <= times[-1])]
            by_n[name][N] = float(np.exp(np.interp(np.log(tt), lt, lv)).mean())
        print(f"{name:28s} grad var (N=10..200): " + " ".join(f"{x:.3g}" for x in by_n[name].values()))
    write_json("losses", {"tilt": "N(mu, Sigma) * exp(-|x|^2/2), lam=1", "runs": runs, "gradvar_times": times,
                          "gradvar": gv, "gradvar_grid_mean": by_n, "quick": quick})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, rs in runs.items():
        ax[0].plot([r["iters"] for r in rs], [r["cov_err"] + r["mean_err"] for r in rs], "o-", label=name)
        ax[1].plot([r["wall_s"] for r in rs], [r["cov_err"] + r["mean_err"] for r in rs], "o-", label=name)
    for a, xl in zip(ax[:2], ("iterations", "wall time (s)")):
        a.set_xlabel(xl); a.set_ylabel("mean err + cov err"); a.set_yscale("log")
    ax[0].legend(fontsize=7)
    for name, v in gv.items():
        ax[2].loglog(times, v, "o-", label=name)
    ax[2].set_xlabel("t"); ax[2].set_ylabel("one-row gradient variance"); ax[2].legend(fontsize=7)
    save_figure(fig, "losses_error")
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, d in by_n.items():
        ax.loglog([1 / n for n in d], list(d.values()), "o-", label=name)
    ax.set_xlabel("step size 1/N"); ax.set_ylabel("gradient variance, mean over grid times"); ax.legend(fontsize=7)
    save_figure(fig, "losses_gradvar")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
