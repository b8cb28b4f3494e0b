"""How many memoryless-SDE steps does a rollout need: the exponential step against "heun".

Part 1, sampling. Bases with exact velocities (GaussianMixtureVelocity, rectified path): N(0, 1),
the 2-D Gaussian N(μ, Σ) of the tests, and the 1-D mixture ½N(−1, 0.1) + ½N(1, 0.1) (variance
1.1). Each is drawn by `integrators.memoryless_solve` with `steps` steps of each scheme from the
same noise (n samples); we record the error of the variance (the largest covariance entry in
2-D) against the exact value. Network calls (NFE): `steps` for "exponential", 2·steps − 1 for
"heun" (two a step, one for the last step into t = 1).

Part 1b, SD3's time grid. The same for N(1, 0.25) on the shift-3 grid of SD3's scheduler
(`diffusers_adapter.sd3_grid`, small steps near the noise), with 10, 20, 40 steps: the relative
error of the end variance, and the largest error of the lean adjoint of r(x) = 2x against its
closed form ã(t) = −2 t s² / (t² s² + (1 − t)²) (λ = 1).

Part 2, fine-tuning. The 2-D Gaussian tilted by the quadratic reward r(x) = −½xᵀAx + b·x,
A = diag(2, 1), b = (1, 1), λ = 1: p* = N(Σ'(Σ⁻¹μ + b/λ), Σ'), Σ' = (Σ⁻¹ + A/λ)⁻¹, a mean
shift of 0.35. `tiltflow.finetune` with each scheme and `steps` rollout steps (batch 128, 600
iterations, lr 3e-3 → 3e-4, two seeds); the fine-tuned model is sampled by the ODE (Heun, 100
steps, 40 000 samples) and we record the mean's and the covariance's error and the wall time.

Writes results/sde_schemes.json and results/sde_schemes.png (error against network calls,
log-log, both parts).

    python benchmarks/sde_schemes.py              # ~8 min on one thread
    python benchmarks/sde_schemes.py --quick      # smoke test (~10 s)
    python benchmarks/sde_schemes.py --plot-only  # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from tiltflow import integrators  # noqa: E402
from tiltflow.methods.finetune import finetune  # noqa: E402
from tiltflow.models import FlowModel, GaussianMixtureVelocity  # noqa: E402
from tiltflow.models.diffusers_adapter import sd3_grid  # noqa: E402
from tiltflow.solvers import adjoint_matching as am  # noqa: E402
from tiltflow.rewards import Quadratic  # noqa: E402

NAME = "sde_schemes"
SCHEMES = ("exponential", "heun")
MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[0.49, 0.1], [0.1, 0.3]])


@dataclass
class Config:
    sample_steps: tuple = (4, 8, 16, 32, 64, 128)
    sd3_steps: tuple = (10, 20, 40)
    n: int = 200_000
    ft_steps: tuple = (5, 10, 20, 40)
    ft_iters: int = 600
    ft_seeds: tuple = (0, 1)
    n_eval: int = 40_000
    seed: int = 0


def quick() -> Config:
    return Config(sample_steps=(8, 16), sd3_steps=(10,), n=20_000, ft_steps=(10,), ft_iters=30, ft_seeds=(0,), n_eval=4000)


def bases() -> dict:
    """name: (model, exact covariance (d, d))."""
    return {
        "N(0,1)": (FlowModel(GaussianMixtureVelocity([1.0], [[0.0]], [[[1.0]]])), torch.tensor([[1.0]])),
        "gaussian_2d": (FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None])), COV),
        "mixture_1d": (FlowModel(GaussianMixtureVelocity([0.5, 0.5], [[-1.0], [1.0]], [[[0.1]], [[0.1]]])),
                       torch.tensor([[1.1]])),
    }


def nfe(scheme: str, steps: int) -> int:
    return steps if scheme == "exponential" else 2 * steps - 1


def sampling(cfg: Config) -> dict:
    out = {}
    for name, (m, cov) in bases().items():
        rows = {scheme: {} for scheme in SCHEMES}
        for scheme in SCHEMES:
            for steps in cfg.sample_steps:
                g = torch.Generator().manual_seed(cfg.seed)
                x0 = torch.randn(cfg.n, m.shape[0], generator=g)
                x = integrators.memoryless_solve(m.path, m.velocity, x0, integrators.time_grid(steps), g, scheme=scheme)
                c = torch.cov(x.T).reshape(cov.shape)
                rows[scheme][steps] = {"scheme": scheme, "steps": steps, "nfe": nfe(scheme, steps),
                                             "variance": float(c[0, 0]),
                                             "cov_error": float((c - cov).abs().max())}
        out[name] = rows
    return out


def sd3_grid_errors(cfg: Config) -> dict:
    m, s, c = 1.0, 0.5, 2.0
    base = FlowModel(GaussianMixtureVelocity([1.0], [[m]], [[[s**2]]]))
    out = {scheme: {} for scheme in SCHEMES}
    for scheme in SCHEMES:
        for steps in cfg.sd3_steps:
            grid = sd3_grid(steps)
            ro = am.rollout(base, cfg.n, grid, torch.Generator().manual_seed(cfg.seed), scheme=scheme)
            t = grid.double()
            adj = am.lean_adjoint(base, am.Rollout(ro.xs[:, :2], grid), torch.full((2, 1), -c), scheme)
            exact = -c * t * s**2 / (t**2 * s**2 + (1 - t) ** 2)
            out[scheme][steps] = {"scheme": scheme, "steps": steps, "nfe": nfe(scheme, steps),
                                  "end_variance_error": abs(float(ro.xs[-1].var()) / s**2 - 1),
                                  "adjoint_error": float((adj[:, 0, 0].double() - exact).abs().max())}
    return out


def finetuning(cfg: Config) -> dict:
    A, b, lam = torch.diag(torch.tensor([2.0, 1.0])), torch.tensor([1.0, 1.0]), 1.0
    cov_t = torch.linalg.inv(torch.linalg.inv(COV) + A / lam)
    mean_t = cov_t @ (torch.linalg.solve(COV, MU) + b / lam)
    rows, ratio = {scheme: {} for scheme in SCHEMES}, {}
    finetune(FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None])), Quadratic(A, b), lam=lam, iters=2,
             batch_size=128, steps=4, progress=False, n_offline=64, scheme="heun")   # warm-up, untimed
    for steps in cfg.ft_steps:
        for scheme in SCHEMES:
            runs = []
            for seed in cfg.ft_seeds:
                base = FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))
                t0 = time.perf_counter()
                ft = finetune(base, Quadratic(A, b), lam=lam, iters=cfg.ft_iters, batch_size=128, steps=steps,
                              lr=3e-3, lr_final=3e-4, seed=seed, progress=False, n_offline=64, scheme=scheme)
                seconds = time.perf_counter() - t0
                x = ft.sample(cfg.n_eval, steps=100, seed=cfg.seed + 1)
                runs.append({"seed": seed, "seconds": seconds,
                             "mean_error": float((x.mean(0) - mean_t).norm()),
                             "cov_error": float((torch.cov(x.T) - cov_t).abs().max())})
            rows[scheme][steps] = {
                "scheme": scheme, "steps": steps, "nfe": nfe(scheme, steps), "runs": runs,
                **{k: statistics.mean(r[k] for r in runs) for k in ("mean_error", "cov_error", "seconds")}}
        ratio[steps] = rows["heun"][steps]["seconds"] / rows["exponential"][steps]["seconds"]
    return {"mean_shift": float((mean_t - MU).norm()), "exact_mean": mean_t, "exact_cov": cov_t, "rows": rows,
            "time_ratio_heun_to_exponential": ratio}


def plot(res: dict):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ls = {"exponential": "o--", "heun": "s-"}
    for name, color in zip(res["sampling"], ("C0", "C1", "C2")):
        for scheme in SCHEMES:
            pts = [(r["nfe"], r["cov_error"]) for r in res["sampling"][name][scheme].values()]
            axes[0].loglog(*zip(*pts), ls[scheme], color=color, label=f"{name}, {scheme}")
    axes[0].set(xlabel="network calls per sample", ylabel="|variance error| (largest covariance entry)",
                title="memoryless SDE sampling of exact bases")
    rows = res["finetuning"]["rows"]
    for scheme in SCHEMES:
        for key, color in (("mean_error", "C3"), ("cov_error", "C4")):
            pts = [(r["nfe"], r[key]) for r in rows[scheme].values()]
            axes[1].loglog(*zip(*pts), ls[scheme], color=color, label=f"{scheme}: {key.replace('_', ' ')}")
    axes[1].axhline(res["finetuning"]["mean_shift"], color="grey", lw=0.8, label="the tilt's mean shift")
    axes[1].set(xlabel="network calls per rollout", ylabel="error of the fine-tuned model",
                title="Adjoint Matching, quadratic tilt of a Gaussian")
    for ax in axes:
        lo, hi = ax.get_xlim()
        ticks = [2**k for k in range(1, 10) if lo <= 2**k <= hi]
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.legend(fontsize=7)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke test with small settings")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON of the last run")
    args = p.parse_args(argv)
    name = NAME + ("_quick" if args.quick else "")
    if args.plot_only:
        print("wrote", _common.save_figure(plot(json.loads((_common.RESULTS / f"{name}.json").read_text())), name))
        return 0
    _common.setup_torch(1)
    cfg = quick() if args.quick else Config()
    res = {"config": cfg, "sampling": sampling(cfg), "sd3_grid": sd3_grid_errors(cfg)}
    for base, rows in res["sampling"].items():
        _common.print_table([[base, r["scheme"], r["steps"], r["nfe"], r["variance"], r["cov_error"]]
                             for by_steps in rows.values() for r in by_steps.values()],
                            ["base", "scheme", "steps", "NFE", "variance", "cov error"])
    _common.print_table([[r["scheme"], r["steps"], r["nfe"], r["end_variance_error"], r["adjoint_error"]]
                         for by_steps in res["sd3_grid"].values() for r in by_steps.values()],
                        ["SD3 grid: scheme", "steps", "NFE", "end variance rel. error", "adjoint error"])
    res["finetuning"] = finetuning(cfg)
    rows = res["finetuning"]["rows"]
    _common.print_table([[r["scheme"], r["steps"], r["nfe"], r["mean_error"], r["cov_error"], r["seconds"]]
                         for by_steps in rows.values() for r in by_steps.values()],
                        ["scheme", "steps", "NFE", "mean error", "cov error", "seconds"])
    print("wrote", _common.write_json(name, res))
    print("wrote", _common.save_figure(plot(res), name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
