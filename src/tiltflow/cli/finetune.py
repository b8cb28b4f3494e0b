"""`tiltflow finetune`: Adjoint Matching of a run's 2-D model toward a reward (expected or CVaR),
evaluated against the base and, where it has a closed form, the exact tilt; or, with --config, a
diffusers pipeline as a TOML or YAML run config says (run_config.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import rewards as rewards_mod
from ..methods.finetune import FinetuneConfig, finetune
from ..metrics import energy_distance, mean_pairwise_distance, reward_summary
from ..objectives import CVaR, ExpectedReward
from ..tasks import toy2d
from .evaluation import EvalConfig, evaluate, exact_tilt, exact_tilt_kl, print_eval_table, print_exact_tilt
from .flags import (add_config_flags, base_run_flag, build, config_dict, config_from, progress_flags,
                    report_to_flag, with_report_to)
from .runs import (EVAL_SEED_OFFSET, RUN_INFO, load_model, open_run_tracker, plots, print_config, run_info,
                   track_results, writes)


FIGURES = ("before_after.png", "training.png", "reward_hist.png")


def make_objective(objective: str, reward, level: float, tail: str, smoothing: float):
    if objective == "expected":
        return ExpectedReward(reward)
    if objective == "cvar":
        return CVaR(reward, level=level, tail=tail, smoothing=smoothing)
    raise ValueError(f"unknown objective {objective!r}; valid: expected, cvar")


def run_finetune(base_run, out, reward_name: str, objective: str, level: float, tail: str,
                 smoothing: float, cfg: dict, ev: EvalConfig, resume: bool, progress: bool,
                 report_to: str = "none") -> dict | None:
    """Fine-tune the model of `base_run` (FinetuneConfig fields `cfg`), evaluate base and result on
    fresh ODE samples, plot.

    Returns {"base": stats, "finetuned": stats, ...} (also stored in metrics.json) plus the
    samples and rewards under "_samples" for callers that draw more figures; None on ranks other
    than 0, which only train.
    """
    reward = rewards_mod.get_reward(reward_name)
    obj = make_objective(objective, reward, level, tail, smoothing)
    base = load_model(base_run, cfg["device"])
    task_name = run_info(base_run).get("task")
    if not progress:
        print_config("finetune", FinetuneConfig(**cfg))
    # one tracker for the run: the library's records, then this evaluation and the figures
    with open_run_tracker(report_to, out, "finetune", cfg) as tracker:
        ft = finetune(base, obj, out=out, resume=resume, progress=progress, **with_report_to(finetune, tracker, cfg))
        if not writes():
            return None

        out = Path(out)
        label = "expected reward" if objective == "expected" else f"{tail} CVaR (β = {level:g})"
        ckpt.write_json(out / RUN_INFO, {"command": "finetune", "task": task_name, "base_run": str(base_run),
                                         "reward": reward_name, "objective": objective, "level": level,
                                         "tail": tail, "smoothing": smoothing, "lam": cfg["lam"]})
        b_stats, xb, rb = evaluate(base, reward, ev, cfg["seed"])
        f_stats, xf, rf = evaluate(ft, reward, ev, cfg["seed"], base=base)
        evaluation = {"config": asdict(ev), "seed": cfg["seed"] + EVAL_SEED_OFFSET,
                      "base": b_stats, "finetuned": f_stats}
        panels, hists = {"base": xb, f"fine-tuned ({label})": xf}, {"base": rb, "fine-tuned": rf}
        task = toy2d.get_task(task_name) if task_name else None
        exact = exact_tilt(task, reward, cfg["lam"]) if objective == "expected" else None
        if exact is not None:
            g = torch.Generator().manual_seed(cfg["seed"] + EVAL_SEED_OFFSET)
            y, y2 = exact.sample(ev.n_eval, generator=g), exact.sample(ev.n_eval, generator=g)
            ry = reward(y)
            evaluation["exact_tilt"] = {
                "energy_distance_finetuned": energy_distance(xf, y),
                "energy_distance_base": energy_distance(xb, y),
                "energy_distance_noise_floor": energy_distance(y2, y),
                "kl": exact_tilt_kl(task, reward, cfg["lam"]),
                "diversity": mean_pairwise_distance(y[:2000]),
                **{f"reward_{k}": v for k, v in reward_summary(ry.float()).items()},
            }
            panels["exact tilt"] = y
            hists["exact tilt"] = ry

        metrics_path = out / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        metrics["evaluation"] = evaluation
        ckpt.write_json(metrics_path, metrics)

        plots_mod = plots()
        if plots_mod is not None:
            title = f"{reward!r}, {label}, λ = {cfg['lam']:g}"
            plots_mod.plot_samples(out / "before_after.png", panels, title=title, density=reward)
            plots_mod.plot_training(out / "training.png", out / "log.jsonl", title=f"Adjoint Matching: {label}")
            plots_mod.plot_reward_hist(out / "reward_hist.png", hists, level=level if objective == "cvar" else 0.1)
        samples = {"base": (xb, rb), "finetuned": (xf, rf)}
        if exact is not None:
            samples["exact tilt"] = (y, ry)
        track_results(tracker, out, FIGURES,
                      {k: evaluation[k] for k in ("base", "finetuned", "exact_tilt") if k in evaluation})
        return {**evaluation, "_samples": samples}


def finetune_flags(s, no_defaults: bool = False) -> None:
    """The flags of `tiltflow finetune` (no_defaults: every default None, to see what was given)."""
    d = (lambda v: None) if no_defaults else (lambda v: v)  # noqa: E731
    base_run_flag(s, required=False)
    s.add_argument("--config", default=None,
                   help="a TOML or YAML run config for a diffusers base (run_config.py: base, reward, prompts, "
                        "validation, ...) instead of --run; the flags given here override its values")
    s.add_argument("--reward", default=d("linear"), help=f"one of: {', '.join(rewards_mod.REWARDS)}; with "
                   "--config: latent_mean, clip_score, pickscore, aesthetic (default: linear)")
    s.add_argument("--objective", default=d("expected"), choices=("expected", "cvar"),
                   help="expected reward, or CVaR of the reward (tail-aware) (default: expected)")
    s.add_argument("--level", type=float, default=d(0.1), help="CVaR tail mass β in (0, 1] (default: 0.1)")
    s.add_argument("--tail", default=d("right"), choices=("right", "left"), help="CVaR tail (default: right)")
    s.add_argument("--smoothing", type=float, default=d(0.0),
                   help="softplus width τ of the CVaR hinge in stage 2 (default: 0, the exact hinge)")
    add_config_flags(s, FinetuneConfig, no_defaults=no_defaults)
    add_config_flags(s, EvalConfig, no_defaults=no_defaults)
    s.add_argument("--out", default=d("runs/ft"), help="run folder (default: runs/ft; with --config: its `out`)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    progress_flags(s)
    report_to_flag(s, d("none"))


def cmd_finetune_config(args) -> int:
    """`finetune --config run.toml`: a diffusers base, with the given flags overriding the file."""
    from .. import run_config
    values = run_config.read(args.config)
    explicit = argparse.ArgumentParser(add_help=False)
    finetune_flags(explicit, no_defaults=True)
    given, _ = explicit.parse_known_args(getattr(args, "argv", None) or [])
    run_keys = {f.name for f in fields(run_config.RunConfig)}
    for k, v in vars(given).items():
        if v is None or k in ("config", "run", "no_progress", "report_to") or (k == "resume" and not v):
            continue
        if k in run_keys or k in FinetuneConfig.__dataclass_fields__:
            values[k] = v
        elif k in EvalConfig.__dataclass_fields__:
            raise ValueError(f"--{k.replace('_', '-')} evaluates 2-D runs and does not apply with --config")
    run, ft = run_config.split(values)
    if args.no_progress and writes():
        print(f"tiltflow finetune: {run} {FinetuneConfig(**ft)}")
    report_to = given.report_to if given.report_to is not None else ft.pop("report_to", "none")
    run_config.run_finetune(run, ft, progress=not args.no_progress, report_to=report_to)
    if writes():
        extra = ", validation/" if run.validation_every else ""
        print(f"wrote {run.out}/: model.safetensors, lora.safetensors (with lora_rank), run_config.json, "
              f"metrics.json, log.jsonl{extra}")
    return 0


def cmd_finetune(args) -> int:
    if args.config is not None:
        if args.run is not None:
            raise ValueError("pass either --run (a tiltflow run folder) or --config (a TOML or YAML run config), not both")
        return cmd_finetune_config(args)
    if args.run is None:
        raise ValueError("finetune needs --run (a run folder holding model.safetensors) or --config run.toml")
    cfg = config_dict(build(FinetuneConfig, config_from(args, FinetuneConfig)))
    ev = build(EvalConfig, config_from(args, EvalConfig))
    res = run_finetune(args.run, args.out, args.reward, args.objective, args.level, args.tail,
                       args.smoothing, cfg, ev, args.resume, not args.no_progress, args.report_to)
    if res is None:
        return 0
    print_eval_table({"base": res["base"], "fine-tuned": res["finetuned"]})
    if "exact_tilt" in res:
        print_exact_tilt(res["exact_tilt"], "fine-tuned")
    print(f"wrote {args.out}/: model.safetensors, metrics.json, log.jsonl, before_after.png, "
          "training.png, reward_hist.png")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("finetune", help="fine-tune a run's model toward a reward (expected or CVaR)",
                       description="Fine-tune the model of --run by Adjoint Matching; writes a run folder with "
                                   "before_after.png, training.png, reward_hist.png and an evaluation in metrics.json; "
                                   "or fine-tune a diffusers pipeline as the TOML or YAML run config --config says.")
    finetune_flags(s)
    s.set_defaults(func=cmd_finetune)
