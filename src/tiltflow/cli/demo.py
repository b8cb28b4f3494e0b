"""`tiltflow demo`, the main job: pretrain on a 2-D task, fine-tune by expected reward, left CVaR
and right CVaR, and compare them (and the closed-form tilt, where there is one) in one table,
printed and written as summary.json."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import distributed
from .. import rewards as rewards_mod
from ..methods.finetune import FinetuneConfig
from ..methods.pretrain import PretrainConfig
from ..tasks import toy2d
from ..validation import in_interval, one_of, positive, positive_int
from ..tracking import environment
from .evaluation import EvalConfig, print_eval_table, print_exact_tilt
from .finetune import run_finetune
from .flags import (add_config_flags, build, config_dict, config_from, merge, positive_ints, progress_flags,
                    report_to_flag, resolve_deprecated)
from .pretrain import run_pretrain
from .runs import open_run_tracker, plots, prepare_run, track_results, writes


@dataclass
class DemoConfig:
    """The main job: pretrain on a 2-D task, then fine-tune by expected reward, left CVaR and
    right CVaR, and compare (printed and saved as config.json in the demo folder)."""
    task: str = "mixture"                 # toy2d task the base model is pretrained on
    reward: str = "linear"                # rewards.REWARDS name; linear r(x) = x₁ + 0.5·x₂
    lam: float = 3.0                      # KL weight λ of every fine-tuning
    level: float = 0.1                    # CVaR tail mass β
    pretrain_iters: int = 3000            # optimiser steps of the flow-matching pretraining
    pretrain_batch_size: int = 256
    hidden: tuple = (128, 128, 128)       # MLP widths of the base model
    iters: int = 300                      # Adjoint Matching iterations of each fine-tuning
    batch_size: int = 256                 # trajectories per fine-tuning iteration
    steps: int = 20                       # memoryless-SDE steps per trajectory
    lr: float = 2e-3                      # fine-tuning learning rate
    n_eval: int = 2000
    eval_steps: int = 50
    n_kl: int = 500
    seed: int = 0
    device: str = "auto"                  # auto: the GPU when there is one, else the CPU
    pretrain_steps: int | None = field(default=None, metadata={"deprecated": "pretrain_iters"})

    def __post_init__(self):
        resolve_deprecated(self)
        one_of(self.task, "task", toy2d.TASKS)
        one_of(self.reward, "reward", rewards_mod.REWARDS)
        positive(self.lam, "lam")
        in_interval(self.level, "level", 0.0, 1.0)
        for name in ("pretrain_iters", "pretrain_batch_size", "iters", "batch_size", "steps", "eval_steps"):
            positive_int(getattr(self, name), name)
        positive_ints(self.hidden, "hidden")
        positive(self.lr, "lr")
        EvalConfig(self.n_eval, self.eval_steps, self.n_kl)
        positive_int(self.seed, "seed", minimum=0)


# `demo --fast`: the same pipeline in about 30 seconds (used by the CLI test); pictures are rough.
FAST = dict(pretrain_iters=400, iters=30, batch_size=64, steps=10, n_eval=500, eval_steps=20, n_kl=100)

RUNS = {"expected": ("expected", "right"), "cvar-left": ("cvar", "left"), "cvar-right": ("cvar", "right")}

# the columns of the summary table: (summary.json key, printed header, what it is)
COLUMNS = [("reward_mean", "reward mean", "mean reward of the n_eval ODE samples"),
           ("cvar_left", "CVaR₁₀ left", "mean of the lowest 10 % of those rewards"),
           ("cvar_right", "CVaR₁₀ right", "mean of the highest 10 % of those rewards"),
           ("kl", "KL", "KL(model ‖ base) by log-likelihoods of n_kl samples; exact tilt: closed form"),
           ("diversity", "diversity", "mean pairwise distance of the samples")]
ENERGY_DISTANCE = ("energy distance to n_eval samples of the exact tilt of the expected-reward target (null "
                   "where there is no closed form or it is not the model's target; exact tilt: between two "
                   "independent exact samples, the noise floor)")


def summary_models(results: dict, out: Path) -> dict:
    """The rows of the summary table, {model: {reward_mean, cvar_left, cvar_right, kl, diversity,
    energy_distance, reward_std, [eta]}}, from the evaluations of the fine-tuning runs; a value
    not known for a row (energy_distance without a closed-form target) is None."""
    def row(stats: dict, energy_distance=None) -> dict:
        return {"reward_mean": stats.get("reward_mean"), "cvar_left": stats.get("reward_cvar_left_10"),
                "cvar_right": stats.get("reward_cvar_right_10"), "kl": stats.get("kl"),
                "diversity": stats.get("diversity"), "energy_distance": energy_distance,
                "reward_std": stats.get("reward_std")}

    exact = results["expected"].get("exact_tilt")
    models = {"base": row({**results["expected"]["base"], "kl": 0.0})}
    for name, res in results.items():
        models[name] = row(res["finetuned"])
        stage1 = json.loads((out / name / "metrics.json").read_text()).get("stage1")
        if stage1:
            models[name]["eta"] = stage1.get("eta")     # the CVaR threshold η* of stage 1
    if exact is not None:
        models["base"]["energy_distance"] = exact["energy_distance_base"]
        models["expected"]["energy_distance"] = exact["energy_distance_finetuned"]
        models["exact tilt"] = row(exact, energy_distance=exact["energy_distance_noise_floor"])
    return models


def cmd_demo(args) -> int:
    given = {k: v for k, v in config_from(args, DemoConfig).items() if v is not None}
    cfg = build(DemoConfig, merge(DemoConfig, FAST if args.fast else {}, given), given)
    out = Path(args.out)
    progress = not args.no_progress
    t_start = time.perf_counter()
    say = print if writes() else (lambda *a, **k: None)      # under torchrun only rank 0 prints and writes
    say(f"tiltflow demo: {cfg}")
    prepare_run(out, config_dict(cfg), args.resume, resumable_keys=("pretrain_iters", "pretrain_steps", "iters"))

    pre_cfg = config_dict(PretrainConfig(iters=cfg.pretrain_iters, batch_size=cfg.pretrain_batch_size,
                                         hidden=cfg.hidden, seed=cfg.seed, device=cfg.device))
    ev = EvalConfig(n_eval=cfg.n_eval, eval_steps=cfg.eval_steps, n_kl=cfg.n_kl)
    timings = {}
    t = time.perf_counter()
    say("\n== 1/4 pretrain the base model ==")
    run_pretrain(cfg.task, out / "pre", pre_cfg, args.resume, progress, args.report_to)
    distributed.barrier()       # every rank loads the base model that rank 0 has just written
    timings["pretrain_s"] = time.perf_counter() - t

    ft_cfg = config_dict(FinetuneConfig(lam=cfg.lam, iters=cfg.iters, batch_size=cfg.batch_size, steps=cfg.steps,
                                        lr=cfg.lr, seed=cfg.seed, device=cfg.device))
    results = {}
    for i, (name, (objective, tail)) in enumerate(RUNS.items(), start=2):
        say(f"\n== {i}/4 fine-tune: {name} ==")
        t = time.perf_counter()
        results[name] = run_finetune(out / "pre", out / name, cfg.reward, objective, cfg.level, tail, 0.0,
                                     ft_cfg, ev, args.resume, progress, args.report_to)
        timings[f"finetune_{name}_s"] = time.perf_counter() - t
    if not writes():
        return 0

    models = summary_models(results, out)
    exact = results["expected"].get("exact_tilt")
    argv = getattr(args, "argv", None)
    summary = {"command": shlex.join(["tiltflow", *(sys.argv[1:] if argv is None else argv)]),
               "settings": config_dict(cfg),
               "columns": {**{k: what for k, _, what in COLUMNS}, "energy_distance": ENERGY_DISTANCE},
               "models": models}
    if exact is not None:
        summary["exact_tilt"] = {
            "description": f"closed-form tilt of the {cfg.task} task by {cfg.reward} at λ = {cfg.lam:g} "
                           "(toy2d.GaussianMixture.tilt_linear), compared with the expected-reward model",
            **exact,
        }
    plots_mod = plots()
    if plots_mod is not None:
        xb, rb = results["expected"]["_samples"]["base"]
        panels = {"base": xb, **{n: r["_samples"]["finetuned"][0] for n, r in results.items()}}
        hists = {"base": rb, **{n: r["_samples"]["finetuned"][1] for n, r in results.items()}}
        if "exact tilt" in results["expected"]["_samples"]:
            panels["exact tilt (expected)"] = results["expected"]["_samples"]["exact tilt"][0]
        reward = rewards_mod.get_reward(cfg.reward)
        plots_mod.plot_samples(out / "samples.png", panels, density=reward,
                               title=f"{cfg.task}: base and fine-tuned by {cfg.reward} reward, λ = {cfg.lam:g}")
        plots_mod.plot_reward_hist(out / "reward_hist.png", hists, level=cfg.level)
    timings["total_s"] = time.perf_counter() - t_start
    summary["wall_s"] = timings["total_s"]
    summary["timings"] = timings
    summary["torch_threads"] = torch.get_num_threads()
    summary["environment"] = environment()
    ckpt.write_json(out / "summary.json", summary)
    with open_run_tracker(args.report_to, out, "demo", config_dict(cfg)) as tracker:   # the table and the figures
        track_results(tracker, out, ["samples.png", "reward_hist.png"], models, step=0)

    print(f"\n== summary ({cfg.n_eval} ODE samples per model; KL by log-likelihoods on {cfg.n_kl}) ==")
    print_eval_table(models, [(k, header) for k, header, _ in COLUMNS])
    if exact is not None:
        print_exact_tilt(exact, "expected")
    print(f"wall time {timings['total_s']:.0f} s; wrote {out}/summary.json, samples.png, reward_hist.png and "
          "run folders pre/, expected/, cvar-left/, cvar-right/")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("demo", help="the main job: pretrain, fine-tune three ways, compare",
                       description="Pretrain on the mixture task, fine-tune by expected reward and by left and "
                                   "right CVaR, write plots and summary.json, print a table.")
    s.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    s.add_argument("--fast", action="store_true",
                   help="small settings, about 30 seconds (" + ", ".join(f"{k}={v}" for k, v in FAST.items()) + ")")
    add_config_flags(s, DemoConfig, no_defaults=True)
    s.add_argument("--resume", action="store_true", help="continue each stage from its newest checkpoint")
    progress_flags(s)
    report_to_flag(s)
    s.set_defaults(func=cmd_demo)
