"""How much does the two-sided Crooks estimate (Bennett's acceptance ratio over forward model paths
and reverse noising paths of target samples) reduce the log Z error of an imperfect sampler,
compared with the one-sided forward (log mean_Q e^W) and reverse (−log mean_P e^{−W}) estimates,
as the number of paths grows?

Energy: the normalised 4-mode Gaussian mixture of the tests (2-D, locations in [−4, 4]², std 1,
log Z = 0, exact target samples). Deliberately imperfect samplers:
  three-mode  analytic mixture of three of the four modes, widened to std 1.2 (misses a mode:
              the forward estimate lacks that mass until a rare path finds it),
  prior       the wide Gaussian N(0, 4² I) that Adjoint Sampling starts from (untrained),
  trained     a short Adjoint Sampling run (tilt.sample_energy, 30 epochs × 10 steps).
For each sampler and repeat, n_max forward paths and n_max reverse paths (from n_max exact target
samples) with 50 exponential steps; the estimates at n < n_max use the first n of each
(n_F = n_R = n). Reported per n: RMSE, mean error and median |error| over repeats of the three
estimators, BAR's mean reported standard error and its 2σ coverage, and the ESS fractions.

Writes results/crooks_two_sided.json and results/crooks_two_sided.png (one panel per sampler:
RMSE of log Z against n, log-log, for forward, reverse and BAR; BAR's mean stderr dashed).

    python benchmarks/crooks_two_sided.py            # full (~1.5 min on one thread)
    python benchmarks/crooks_two_sided.py --quick    # smoke test (~20 s)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tiltflow as tilt  # noqa: E402
from tiltflow import estimators  # noqa: E402
from tiltflow.methods.sample_energy import gaussian_prior  # noqa: E402
from tiltflow.tasks.energies import GaussianMixtureEnergy  # noqa: E402

NAME = "crooks_two_sided"


@dataclass
class Config:
    n_max: int = 8192
    ns: tuple = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    repeats: int = 16
    steps: int = 50
    train_epochs: int = 30          # the "trained" sampler's Adjoint Sampling epochs
    seed: int = 0


def quick() -> Config:
    return Config(n_max=1024, ns=(64, 256, 1024), repeats=4, train_epochs=5)


def samplers(E, cfg: Config) -> dict:
    three = tilt.FlowModel(tilt.GaussianMixtureVelocity(
        [1.0, 1.0, 1.0], E.means[:3].float(), 1.2**2 * torch.eye(2).expand(3, 2, 2).clone()))
    t0 = time.perf_counter()
    trained = tilt.sample_energy(E, 2, prior_scale=4.0, iters=cfg.train_epochs * 10, iters_per_rollout=10,
                                 lr=2e-3, progress=False, seed=cfg.seed).model
    print(f"trained sampler: {time.perf_counter() - t0:.1f} s")
    return {"three-mode": three, "prior": gaussian_prior(2, 4.0), "trained": trained}


def run(cfg: Config) -> dict:
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0, std=1.0, seed=0)
    log_gamma = lambda x: -E(x)  # noqa: E731
    out = {}
    for name, model in samplers(E, cfg).items():
        t0 = time.perf_counter()
        err = {k: {n: [] for n in cfg.ns} for k in ("forward", "reverse", "bar")}
        se = {n: [] for n in cfg.ns}
        ess_f, ess_r = [], []
        for r in range(cfg.repeats):
            y = E.sample(cfg.n_max, torch.Generator().manual_seed(10_000 + r))
            res = estimators.crooks_two_sided(model, log_gamma, y, n=cfg.n_max, steps=cfg.steps, seed=r)
            ess_f.append(res.ess_forward / cfg.n_max)
            ess_r.append(res.ess_reverse / cfg.n_max)
            for n in cfg.ns:
                wf, wr = res.forward.log_w[:n], res.log_w_reverse[:n]
                c, s = estimators.bar(wf, wr)
                err["bar"][n].append(c - E.log_Z)
                se[n].append(s)
                err["forward"][n].append(float(torch.logsumexp(wf, 0)) - math.log(n) - E.log_Z)
                err["reverse"][n].append(-(float(torch.logsumexp(-wr, 0)) - math.log(n)) - E.log_Z)
        rows = []
        for n in cfg.ns:
            row = {"n": n, "bar_stderr_mean": statistics.fmean(se[n]),
                   "bar_coverage_2se": statistics.fmean(float(abs(e) < 2 * s) for e, s in zip(err["bar"][n], se[n]))}
            for k in err:
                e = err[k][n]
                row[f"{k}_rmse"] = math.sqrt(statistics.fmean(v * v for v in e))
                row[f"{k}_mean_error"] = statistics.fmean(e)
                row[f"{k}_median_abs_error"] = statistics.median(abs(v) for v in e)
            rows.append(row)
        out[name] = {"rows": rows, "ess_fraction_forward": statistics.fmean(ess_f),
                     "ess_fraction_reverse": statistics.fmean(ess_r),
                     "seconds": time.perf_counter() - t0, "errors": err, "stderr": se}
        print(f"\n{name}: ESS fraction forward {out[name]['ess_fraction_forward']:.3f}, "
              f"reverse {out[name]['ess_fraction_reverse']:.3f} ({out[name]['seconds']:.1f} s)")
        _common.print_table([[r["n"], r["forward_rmse"], r["reverse_rmse"], r["bar_rmse"], r["bar_stderr_mean"],
                              r["bar_coverage_2se"], r["forward_mean_error"], r["reverse_mean_error"],
                              r["bar_mean_error"]] for r in rows],
                            ["n", "rmse fwd", "rmse rev", "rmse BAR", "BAR se", "cover 2se",
                             "bias fwd", "bias rev", "bias BAR"])
    return out


def plot(res: dict, name_out: str) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res), figsize=(4.2 * len(res), 3.6), sharey=True)
    for ax, (name, r) in zip(axes, res.items()):
        ns = [row["n"] for row in r["rows"]]
        for k, label, c in (("forward", "forward (one-sided)", "C0"), ("reverse", "reverse (one-sided)", "C1"),
                            ("bar", "BAR (two-sided)", "C2")):
            ax.loglog(ns, [row[f"{k}_rmse"] for row in r["rows"]], "o-", color=c, label=label)
        ax.loglog(ns, [row["bar_stderr_mean"] for row in r["rows"]], "--", color="C2", label="BAR reported stderr")
        ax.set_title(f"{name}  (ESS fwd {r['ess_fraction_forward']:.2f}, rev {r['ess_fraction_reverse']:.2f})",
                     fontsize=9)
        ax.set_xlabel("paths per direction n")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("RMSE of log Z")
    axes[0].legend(fontsize=8)
    fig.suptitle("GMM-4 energy: log Z error of one-sided and two-sided Crooks estimates")
    _common.save_figure(fig, name_out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-size run")
    args = p.parse_args()
    _common.setup_torch(1)
    cfg = quick() if args.quick else Config()
    t0 = time.perf_counter()
    res = run(cfg)
    total = time.perf_counter() - t0
    name = NAME + ("_quick" if args.quick else "")
    plot(res, name)
    path = _common.write_json(name,
                              {"quick": args.quick, "config": cfg, "seconds": total, "results": res})
    print(f"\n{total:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
