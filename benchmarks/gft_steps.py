"""Does Gradual Fine-Tuning give shorter paths and fewer inference steps at equal quality than
standard fine-tuning, and is it more stable from run to run?

The GFT paper (arXiv 2601.22495, abstract) claims: more stable convergence, shorter probability
paths and faster inference, generation quality comparable to standard fine-tuning.

Setup, per 2-D shift (base task → target):
  mixture → shifted and reweighted mixture (weights 0.5/0.3/0.2 → 0.2/0.3/0.5, means moved),
  moons   → moons rotated by 60°.
A base FlowModel (MLP 128×3) is pretrained on the base task (independent coupling, 2500 steps,
seed 0). It is fine-tuned on n_train = 2000 target samples with the same budget (total optimiser
steps, batch 256, lr, EMA) by
  FT        standard fine-tuning: continue flow matching on the target samples (schedule [0.0],
            independent coupling),
  FT+OT     the same with the minibatch exact OT coupling (separates the coupling's effect),
  GFT       gradual fine-tuning, geometric schedule τ 10 → 1e-3, independent coupling,
  GFT+OT    gradual fine-tuning with the OT coupling (the library's default),
each for several seeds. Measured on 2000 held-out target samples: energy distance and sliced W2
of 2000 model samples drawn with 1, 2, 4, 8, 16, 32 Euler steps; path straightness
E∫‖v‖²dt − E‖x1 − x0‖² (0 = straight) and length ratio on 1000 ODE paths; the spread over seeds.

Writes results/gft_steps.json and results/gft_steps.png (per task: energy distance and sliced W2
against Euler steps, mean ± std over seeds, and straightness per method).

    python benchmarks/gft_steps.py             # full (5 seeds, ~12 min on one thread)
    python benchmarks/gft_steps.py --seeds 3   # fewer seeds
    python benchmarks/gft_steps.py --quick     # smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tiltflow as tilt  # noqa: E402
from tiltflow.methods.gft import straightness  # noqa: E402
from tiltflow.metrics import energy_distance, sliced_wasserstein  # noqa: E402
from tiltflow.tasks.toy2d import GaussianMixture, TwoMoons  # noqa: E402

NAME = "gft_steps"
STEPS = (1, 2, 4, 8, 16, 32)


@dataclass
class Config:
    pretrain_steps: int = 2500
    hidden: tuple = (128, 128, 128)
    n_train: int = 2000           # target samples available for fine-tuning
    n_test: int = 2000            # held-out target samples
    n_eval: int = 2000            # model samples per evaluation
    stages: int = 6               # GFT temperatures (geometric tau_start → tau_end)
    steps_per_stage: int = 250    # so the budget is stages × steps_per_stage optimiser steps for every method
    tau_start: float = 10.0
    tau_end: float = 1e-3
    batch_size: int = 256
    lr: float = 5e-4
    ema: float = 0.995
    seeds: int = 5


QUICK = dict(pretrain_steps=400, stages=3, steps_per_stage=60, n_eval=500, n_test=500, seeds=2)


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    r = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return x @ r.T


class RotatedMoons:
    """TwoMoons rotated by `degrees` about the origin."""

    def __init__(self, degrees: float = 60.0):
        self.moons, self.degrees = TwoMoons(), degrees

    def sample(self, n, generator=None):
        return rotate(self.moons.sample(n, generator=generator), self.degrees)


def tasks():
    shifted = GaussianMixture.isotropic(weights=(0.2, 0.3, 0.5), means=((-1.5, 0.5), (2.0, 2.0), (2.0, -1.0)),
                                        stds=0.5)
    return {"mixture → shifted mixture": (tilt.toy2d.get_task("mixture"), shifted),
            "moons → rotated moons": (TwoMoons(), RotatedMoons(60.0))}


def methods(cfg: Config) -> dict:
    budget = cfg.stages * cfg.steps_per_stage
    ft = dict(schedule=[0.0], iters_per_stage=budget)
    gft = dict(schedule="geometric", stages=cfg.stages, iters_per_stage=cfg.steps_per_stage,
               tau_start=cfg.tau_start, tau_end=cfg.tau_end)
    return {"FT": {**ft, "coupling": "independent"}, "FT+OT": {**ft, "coupling": "ot"},
            "GFT": {**gft, "coupling": "independent"}, "GFT+OT": {**gft, "coupling": "ot"}}


@torch.no_grad()
def evaluate(model, test: torch.Tensor, cfg: Config, seed: int) -> dict:
    out = {"energy_distance": {}, "sliced_w2": {}}
    for k in STEPS:
        x = model.sample(cfg.n_eval, steps=k, method="euler", seed=10_000 + seed)
        out["energy_distance"][k] = energy_distance(x, test)
        out["sliced_w2"][k] = sliced_wasserstein(x, test, generator=torch.Generator().manual_seed(seed))
    out.update(straightness(model, n=1000, steps=100, seed=20_000 + seed))
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test settings: " + str(QUICK))
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per method (default 5)")
    args = p.parse_args(argv)
    _common.setup_torch(1)
    cfg = Config(**(QUICK if args.quick else {}))
    if args.seeds is not None:
        cfg.seeds = args.seeds
    print(f"{NAME}: {cfg}")
    t_all = time.perf_counter()
    results, timings = {}, {}
    for task_name, (base_task, target_task) in tasks().items():
        g = torch.Generator().manual_seed(123)
        train, test = target_task.sample(cfg.n_train, generator=g), target_task.sample(cfg.n_test, generator=g)
        t0 = time.perf_counter()
        base = tilt.pretrain(base_task, iters=cfg.pretrain_steps, hidden=cfg.hidden, seed=0, progress=False)
        timings[f"{task_name}: pretrain_s"] = time.perf_counter() - t0
        res = {"base": evaluate(base, test, cfg, 0),
               "noise_floor": {"energy_distance": energy_distance(target_task.sample(cfg.n_eval, generator=g), test),
                               "sliced_w2": sliced_wasserstein(target_task.sample(cfg.n_eval, generator=g), test,
                                                               generator=torch.Generator().manual_seed(0))}}
        for method, kw in methods(cfg).items():
            runs, t0 = [], time.perf_counter()
            for seed in range(cfg.seeds):
                ft = tilt.gradual_finetune(base, train, batch_size=cfg.batch_size, lr=cfg.lr, ema=cfg.ema,
                                           seed=seed, progress=False, **kw)
                runs.append(evaluate(ft, test, cfg, seed))
            timings[f"{task_name}: {method}_s"] = time.perf_counter() - t0
            res[method] = {
                "energy_distance": {k: _stats([r["energy_distance"][k] for r in runs]) for k in STEPS},
                "sliced_w2": {k: _stats([r["sliced_w2"][k] for r in runs]) for k in STEPS},
                "straightness": _stats([r["straightness"] for r in runs]),
                "length_ratio": _stats([r["length_ratio"] for r in runs]),
            }
            e = res[method]["energy_distance"]
            print(f"[{task_name}] {method:7s} ED@1 {e[1]['mean']:.4f}  ED@4 {e[4]['mean']:.4f}  "
                  f"ED@32 {e[32]['mean']:.4f}±{e[32]['std']:.4f}  straightness "
                  f"{res[method]['straightness']['mean']:.3f}  ({timings[f'{task_name}: {method}_s']:.0f} s)")
        results[task_name] = res
    timings["total_s"] = time.perf_counter() - t_all

    rows = []
    for task_name, res in results.items():
        for method in methods(cfg):
            r = res[method]
            rows.append([task_name.split()[0], method] + [r["energy_distance"][k]["mean"] for k in STEPS]
                        + [r["energy_distance"][32]["std"], r["sliced_w2"][4]["mean"], r["straightness"]["mean"],
                           r["length_ratio"]["mean"]])
        b = res["base"]
        rows.append([task_name.split()[0], "base"] + [b["energy_distance"][k] for k in STEPS]
                    + [0.0, b["sliced_w2"][4], b["straightness"], b["length_ratio"]])
    print()
    _common.print_table(rows, ["task", "method"] + [f"ED@{k}" for k in STEPS]
                        + ["ED@32 std", "SW2@4", "straight", "len ratio"])

    path = _common.write_json(NAME, {
        "question": "GFT vs standard fine-tuning: quality vs Euler steps, path straightness, seed spread",
        "config": asdict(cfg), "euler_steps": list(STEPS), "methods": methods(cfg),
        "results": results, "timings": timings,
        "note": "energy distance (squared form, U-statistics) and sliced W2 against held-out target samples; "
                "mean and std over fine-tuning seeds; the base model is pretrained once per task (seed 0)"})
    fig = plot(results, cfg)
    png = _common.save_figure(fig, NAME)
    print(f"wrote {path} and {png} in {timings['total_s']:.0f} s")
    return 0


def plot(results: dict, cfg: Config):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 3, figsize=(14, 4 * len(results)), squeeze=False)
    colors = {"FT": "tab:gray", "FT+OT": "tab:blue", "GFT": "tab:orange", "GFT+OT": "tab:red"}
    for row, (task_name, res) in zip(axes, results.items()):
        for ax, key, label in ((row[0], "energy_distance", "energy distance"), (row[1], "sliced_w2", "sliced W2")):
            for method, c in colors.items():
                m = [res[method][key][k]["mean"] for k in STEPS]
                s = [res[method][key][k]["std"] for k in STEPS]
                ax.errorbar(STEPS, m, yerr=s, color=c, marker="o", ms=3, capsize=2, label=method)
            ax.plot(STEPS, [res["base"][key][k] for k in STEPS], color="k", ls=":", label="base (no fine-tuning)")
            ax.axhline(res["noise_floor"][key], color="k", lw=0.8, ls="--", label="target vs target")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("Euler steps at inference")
            ax.set_title(f"{task_name}: {label}")
        row[0].legend(fontsize=7)
        names = list(colors)
        row[2].bar(names, [res[n]["straightness"]["mean"] for n in names],
                   yerr=[res[n]["straightness"]["std"] for n in names], color=[colors[n] for n in names], capsize=3)
        row[2].set_title(f"{task_name}: straightness (0 = straight)")
    fig.suptitle(f"GFT vs standard fine-tuning, same budget ({cfg.stages * cfg.steps_per_stage} steps), "
                 f"{cfg.seeds} seeds, mean ± std")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
