"""How fast does Adjoint Matching reach the exact tilt?

Base: the exact (closed-form) velocity of toy2d "mixture" (GaussianMixtureVelocity from its
weights, means and covariances, rectified path), so the only errors are Adjoint Matching's and
the sampler's. Reward r(x) = a·x with a = (1, 0.5); for each λ the target
p* ∝ p_base exp(r/λ) is again a Gaussian mixture, `GaussianMixture.tilt_linear(a, λ)`.

`tiltflow.finetune` (init "auto" = base + zero-initialised residual MLP) runs with batch 256,
100 memoryless-SDE steps, 25 loss times, lr 1e-3. Every `eval_every` iterations the fine-tuned
model is sampled by the ODE (Heun, 100 steps, 5000 samples, the same seed each time) and we
record, against the exact tilted mixture:

  energy distance   to 5000 exact samples of p*
  mean error        |mean(samples) − E_p*[x]|
  weight error      total variation ½ Σ_k |f_k − π*_k| between the fraction f_k of samples
                    nearest (Euclidean) to each tilted mean and the closed-form weights π*_k

and three reference levels: the *floor*, the root mean square of each metric over
`floor_sets` further independent exact sample sets of p* (the estimator's noise: the energy
distance is an unbiased U-statistic, so a single exact-vs-exact value scatters around 0 and can
be negative); the *ODE floor* (samples of p* by the same Heun sampler driven by the exact
velocity of p*, i.e. what a perfect fine-tune would score); and the base's distance to p*.

The model at iteration k is obtained by running `finetune` in chunks with out=/resume=True, so
what is measured is the library's own loop (resuming restores weights, Adam state and the
generator; the callback gets no handle on the model).

At the end, `solver_check` evaluates the AM loss per time t_i for the exact tilted velocity and
for the trained model on the same memoryless rollouts of p* (and their lean adjoints): the exact
velocity's loss is the irreducible variance of the regression target σ ã given X_t, the
trained model's excess is what training has left. It also records the mean reward of SDE
rollouts of the exact velocity (a check of the rollout scheme) and of the trained model.

Writes results/am_convergence.json and results/am_convergence.png: energy distance vs
iteration (log y) per λ with the floors, the mean and weight errors vs iteration, and the
per-time AM loss of the exact and the trained velocity on rollouts of p*.

    python benchmarks/am_convergence.py            # full (~14 min on one thread)
    python benchmarks/am_convergence.py --quick    # smoke test (~2-3 min)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tiltflow as tilt  # noqa: E402
from tiltflow.solvers import adjoint_matching as am  # noqa: E402

NAME = "am_convergence"


@dataclass
class Config:
    lams: tuple = (0.5, 1.0, 2.0)
    a: tuple = (1.0, 0.5)             # linear reward r(x) = a·x
    iters: int = 600
    eval_every: int = 50
    batch_size: int = 256
    steps: int = 100                  # memoryless-SDE steps of each rollout
    n_loss_times: int | None = 25
    lr: float = 1e-3
    n_eval: int = 5000                # ODE samples per evaluation, and exact samples
    floor_sets: int = 4               # independent exact sets for the noise floor
    check_batch: int = 2048           # rollouts of the final loss comparison (solver_check)
    eval_steps: int = 100             # Heun steps of the evaluation sampler
    seed: int = 0


def quick() -> Config:
    return Config(iters=100, eval_every=25, n_eval=2000, check_batch=512)


def nearest_fractions(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Fraction of x: (n, d) nearest to each of means: (K, d); returns (K,)."""
    k = torch.cdist(x.double(), means.double()).argmin(1)
    return torch.bincount(k, minlength=means.shape[0]).double() / x.shape[0]


def evaluate(x: torch.Tensor, target: tilt.toy2d.GaussianMixture, exact: torch.Tensor) -> dict:
    """Energy distance, mean error and weight error of samples x against p* (see module doc)."""
    frac = nearest_fractions(x, target.means)
    w = target.weights.double()
    return {"energy_distance": tilt.metrics.energy_distance(x, exact),
            "mean_error": float((x.double().mean(0) - target.mean().double()).norm()),
            "weight_tv": float(0.5 * (frac - w).abs().sum()),
            "fractions": frac.tolist()}


@torch.no_grad()
def solver_check(cfg: Config, base, ft, exact_model, reward, lam: float) -> dict:
    """Is the gap to p* optimisation or the loss's own optimum? Per loss time t_i, the AM loss of
    the exact tilted velocity and of the trained model on the same rollouts (and lean adjoints).

    On rollouts of the exact tilt, the exact velocity minimises the continuous-time regression, so
    loss(trained) < loss(exact) there means the discrete loss prefers something else (a bias);
    loss(trained) > loss(exact) means training has not reached the loss's optimum. Also the mean
    reward of memoryless-SDE rollouts of the exact velocity (a check of the rollout scheme).
    """
    grid = tilt.integrators.time_grid(cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    out = {"n": cfg.check_batch}
    for name, model in (("exact_rollouts", exact_model), ("trained_rollouts", ft)):
        ro = am.rollout(model, cfg.check_batch, grid, gen)
        a1, r = am.terminal_adjoint(reward, ro.xs[-1], lam)
        adj = am.lean_adjoint(base, ro, a1)
        per_t = {"exact": [], "trained": []}
        for i in range(1, cfg.steps):
            idx, w = torch.tensor([i]), torch.ones(1)
            per_t["exact"].append(float(am.adjoint_matching_loss(exact_model, base, ro, adj, idx, w)[0]))
            per_t["trained"].append(float(am.adjoint_matching_loss(ft, base, ro, adj, idx, w)[0]))
        out[name] = {"reward_mean": float(r.mean()), "t": grid[1:-1].tolist(),
                     "loss_exact": per_t["exact"], "loss_trained": per_t["trained"],
                     "mean_loss_exact": sum(per_t["exact"]) / len(per_t["exact"]),
                     "mean_loss_trained": sum(per_t["trained"]) / len(per_t["trained"])}
    return out


def run_lambda(cfg: Config, task, base: tilt.FlowModel, lam: float) -> dict:
    target = task.tilt_linear(list(cfg.a), lam)
    gen = torch.Generator().manual_seed(cfg.seed + 100)
    exact = target.sample(cfg.n_eval, generator=gen)
    null = [evaluate(target.sample(cfg.n_eval, generator=gen), target, exact) for _ in range(cfg.floor_sets)]
    exact_velocity = tilt.FlowModel(tilt.GaussianMixtureVelocity(target.weights, target.means, target.covs))
    eval_seed = cfg.seed + 7

    def sample(model):
        return model.sample(cfg.n_eval, steps=cfg.eval_steps, seed=eval_seed)

    floor = {k: math.sqrt(sum(e[k] ** 2 for e in null) / len(null))
             for k in ("energy_distance", "mean_error", "weight_tv")}
    refs = {"floor": {**floor, "samples": null},
            "ode_floor": evaluate(sample(exact_velocity), target, exact),
            "base": evaluate(sample(base), target, exact)}
    reward = tilt.ExpectedReward(tilt.rewards.Linear(list(cfg.a)))
    curve = [{"iter": 0, **refs["base"], "sample_time_s": 0.0}]
    train_log, t_train, t_chunk_wall = [], 0.0, 0.0
    with tempfile.TemporaryDirectory(prefix="am_convergence_") as out:
        done = 0
        while done < cfg.iters:
            done = min(done + cfg.eval_every, cfg.iters)
            t0 = time.perf_counter()
            ft = tilt.finetune(base, reward, lam=lam, iters=done, out=out, resume=True, progress=False,
                               callback=lambda it, rec: train_log.append(rec),
                               batch_size=cfg.batch_size, steps=cfg.steps, n_loss_times=cfg.n_loss_times,
                               lr=cfg.lr, seed=cfg.seed, checkpoint_every=cfg.eval_every)
            t_chunk_wall += time.perf_counter() - t0
            t0 = time.perf_counter()
            x = sample(ft)
            ts = time.perf_counter() - t0
            curve.append({"iter": done, **evaluate(x, target, exact), "sample_time_s": ts})
            c = curve[-1]
            print(f"  λ={lam:g} iter {done:4d}: ED {c['energy_distance']:.2e} (floor "
                  f"{refs['floor']['energy_distance']:.1e}, ODE floor {refs['ode_floor']['energy_distance']:.1e})"
                  f"  mean err {c['mean_error']:.3f}  weight TV {c['weight_tv']:.3f}", flush=True)
    check = solver_check(cfg, base, ft, exact_velocity, reward.reward, lam)
    ce, ct = check["exact_rollouts"], check["trained_rollouts"]
    print(f"  λ={lam:g} check: E_p*[r] = {float(target.mean() @ torch.tensor(cfg.a)):.4f}, SDE rollouts of the "
          f"exact velocity {ce['reward_mean']:.4f}, of the trained model {ct['reward_mean']:.4f}; AM loss on "
          f"exact rollouts: exact {ce['mean_loss_exact']:.4f} vs trained {ce['mean_loss_trained']:.4f}", flush=True)
    t_train = sum(r["time_rollout"] + r["time_adjoint"] + r["time_loss"] for r in train_log)
    final = curve[-1]
    keep = ("iter", "loss", "kl", "reward_mean", "grad_norm", "time_rollout", "time_adjoint", "time_loss")
    return {"lam": lam,
            "target": {"weights": target.weights.tolist(), "means": target.means.tolist(),
                       "mean": target.mean().tolist()},
            "exact_reward_mean": float(target.mean() @ torch.tensor(cfg.a)),
            "references": refs, "curve": curve, "solver_check": check,
            "final": {k: final[k] for k in ("energy_distance", "mean_error", "weight_tv", "fractions")},
            "final_over_floor": final["energy_distance"] / max(refs["floor"]["energy_distance"], 1e-12),
            "train_time_s": t_train, "finetune_wall_s": t_chunk_wall,
            "s_per_iter": t_train / len(train_log),
            "train_log": [{k: r[k] for k in keep if k in r} for r in train_log]}


def run(cfg: Config) -> dict:
    _common.setup_torch(1)
    task = tilt.toy2d.get_task("mixture")
    base = tilt.FlowModel(tilt.GaussianMixtureVelocity(task.weights, task.means, task.covs))
    t0 = time.perf_counter()
    per_lam = [run_lambda(cfg, task, base, lam) for lam in cfg.lams]
    return {"config": asdict(cfg), "task": "toy2d mixture", "base_weights": task.weights.tolist(),
            "base_means": task.means.tolist(), "results": per_lam, "wall_s": time.perf_counter() - t0}


def plot(res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    axes = axes.ravel()
    colors = plt.cm.plasma([0.1, 0.45, 0.75, 0.9])
    for r, c in zip(res["results"], colors):
        it = [p["iter"] for p in r["curve"]]
        lab = f"λ = {r['lam']:g}"
        ed = [max(p["energy_distance"], 1e-7) for p in r["curve"]]   # unbiased estimate can dip below 0
        axes[0].plot(it, ed, "o-", color=c, ms=3,
                     label=f"{lab} (ODE floor {r['references']['ode_floor']['energy_distance']:.1e})")
        axes[0].axhline(r["references"]["floor"]["energy_distance"], color=c, ls=":", lw=1)
        axes[1].plot(it, [p["mean_error"] for p in r["curve"]], "o-", color=c, ms=3, label=lab)
        axes[1].axhline(r["references"]["floor"]["mean_error"], color=c, ls=":", lw=1)
        axes[2].plot(it, [p["weight_tv"] for p in r["curve"]], "o-", color=c, ms=3, label=lab)
        axes[2].axhline(r["references"]["floor"]["weight_tv"], color=c, ls=":", lw=1)
        chk = r["solver_check"]["exact_rollouts"]
        axes[3].plot(chk["t"], chk["loss_exact"], "-", color=c, lw=1.5, label=f"{lab}: exact velocity of p*")
        axes[3].plot(chk["t"], chk["loss_trained"], "--", color=c, lw=1, label=f"{lab}: trained (final)")
    axes[0].plot([], [], "k:", lw=1, label="floor: RMS over exact sample sets")
    cfg = res["config"]
    axes[0].set(yscale="log", xlabel="AM iteration", ylabel=f"energy distance to p* ({cfg['n_eval']} samples)",
                title="energy distance to the exact tilt")
    axes[1].set(yscale="log", xlabel="AM iteration", ylabel="|mean − E_p*[x]|", title="error of the mean")
    axes[2].set(yscale="log", xlabel="AM iteration", ylabel="½ Σ|f_k − π*_k|",
                title="component weights (nearest tilted mean)")
    axes[3].set(yscale="log", ylim=(1e-6, None), xlabel="t",
                ylabel="AM loss at t_i (mean over rollouts)",
                title=f"AM loss per time on {res['config']['check_batch']} rollouts of p*")
    axes[3].legend(fontsize=7)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Adjoint Matching on the exact mixture velocity, r = {tuple(cfg['a'])}·x; batch "
                 f"{cfg['batch_size']}, {cfg['steps']} steps, {cfg['n_loss_times']} loss times, lr {cfg['lr']:g}"
                 f"  (dotted: RMS over exact sample sets)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-size run")
    p.add_argument("--iters", type=int, help="override the number of AM iterations")
    p.add_argument("--eval-every", type=int, help="override the evaluation interval")
    args = p.parse_args(argv)
    cfg = quick() if args.quick else Config()
    if args.iters:
        cfg.iters = args.iters
    if args.eval_every:
        cfg.eval_every = args.eval_every
    print(f"{NAME}: {cfg}", flush=True)
    res = {"quick": args.quick, **run(cfg)}
    path = _common.write_json(NAME, res)
    png = _common.save_figure(plot(res), NAME)
    print()
    _common.print_table(
        [[r["lam"], r["references"]["base"]["energy_distance"], r["final"]["energy_distance"],
          r["references"]["floor"]["energy_distance"], r["references"]["ode_floor"]["energy_distance"],
          r["final"]["mean_error"], r["final"]["weight_tv"], r["references"]["floor"]["weight_tv"],
          r["s_per_iter"]] for r in res["results"]],
        ["λ", "ED base", f"ED @{cfg.iters}", "ED floor", "ED ODE floor", "mean err", "weight TV",
         "TV floor", "s/iter"])
    print(f"\ntotal {res['wall_s']:.0f} s\nwrote {path}\nwrote {png}")
    return res


if __name__ == "__main__":
    main()
