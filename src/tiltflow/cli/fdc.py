"""`tiltflow fdc`: Flow Density Control, maximising a utility of the whole distribution
F(p) − λ·D(p‖p_base) for a run's model."""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from .. import rewards as rewards_mod
from ..methods.fdc import FDCConfig, fdc
from ..methods.finetune import FinetuneConfig
from ..models.flow_model import FlowModel
from .flags import (add_config_flags, base_run_flag, build, config_dict, config_from, optional_float,
                    run_folder_flags, with_report_to)
from .runs import (EVAL_SEED_OFFSET, RUN_INFO, load_model, open_run_tracker, plots, print_config, run_info,
                   track_results, writes)

FDC_UTILITIES = ("entropy", "mean-variance", "cvar", "novelty", "design", "diversity", "expected")


def make_utility(args, base: FlowModel):
    from .. import utilities as u
    name = args.utility
    if name not in FDC_UTILITIES:
        raise ValueError(f"unknown utility {name!r}; valid: {', '.join(FDC_UTILITIES)}")
    if name == "entropy":
        return u.Entropy()
    if name == "design":
        return u.ExperimentDesign(reg=args.reg)
    if name == "diversity":
        return u.KernelDiversity(args.bandwidth)
    if name == "novelty":   # novelty with respect to what the pretrained model generates
        return u.Novelty(base.sample(1000, steps=50, seed=args.seed + EVAL_SEED_OFFSET), args.bandwidth)
    reward = rewards_mod.get_reward(args.reward)
    if name == "mean-variance":
        return u.MeanVariance(reward, kappa=args.kappa)
    if name == "cvar":
        return u.CVaRUtility(reward, level=args.level, tail=args.tail)
    return u.ExpectedRewardUtility(reward)


def make_divergence(args):
    from .. import divergences as d
    if args.divergence == "kl":
        return d.KL()
    if args.divergence == "renyi":
        return d.Renyi(alpha=args.alpha)
    if args.divergence == "ot":
        return d.OT(p=2)
    raise ValueError(f"unknown divergence {args.divergence!r}; valid: kl, renyi, ot")


def cmd_fdc(args) -> int:
    outer = config_dict(build(FDCConfig, config_from(args, FDCConfig)))
    inner = config_dict(build(FinetuneConfig, config_from(args, FinetuneConfig, skip=("lam",))), skip=("lam",))
    base = load_model(args.run, inner["device"])
    utility, divergence = make_utility(args, base), make_divergence(args)
    if args.no_progress:
        print_config("fdc", FDCConfig(**outer))
    with open_run_tracker(args.report_to, args.out, "fdc", {**outer, **inner}) as tracker:    # records, then figure
        ft = fdc(base, utility, divergence, out=args.out, resume=args.resume, progress=not args.no_progress,
                 **with_report_to(fdc, tracker, {**outer, **inner}))
        if not writes():        # under torchrun only rank 0 writes, prints and plots
            return 0
        out = Path(args.out)
        ckpt.write_json(out / RUN_INFO, {"command": "fdc", "task": run_info(args.run).get("task"),
                                         "base_run": str(args.run), "utility": args.utility,
                                         "divergence": args.divergence, "lam": outer["lam"]})
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        print(f"{'outer':>5} {'utility':>10} {'divergence':>11} {'objective':>10} {'KL':>8}")
        for r in log:
            cells = [f"{r.get(k):.4f}" if isinstance(r.get(k), float) else "—" for k in ("utility", "divergence", "objective", "kl")]
            print(f"{r['outer']:>5} {cells[0]:>10} {cells[1]:>11} {cells[2]:>10} {cells[3]:>8}")
        plots_mod = plots()
        if plots_mod is not None and len(base.shape) == 1 and base.shape[0] == 2:
            seed = inner["seed"] + EVAL_SEED_OFFSET
            plots_mod.plot_samples(out / "before_after.png",
                                   {"base": base.sample(2000, steps=50, seed=seed),
                                    f"FDC ({args.utility})": ft.sample(2000, steps=50, seed=seed)},
                                   title=f"FDC: {utility!r} − {outer['lam']:g}·{divergence!r}")
        track_results(tracker, out, ["before_after.png"])
    print(f"wrote {args.out}/: model.safetensors, log.jsonl, metrics.json, outer_01/ …, before_after.png")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("fdc", help="Flow Density Control: a utility of the whole distribution",
                       description="Maximise F(p) − λ·D(p‖p_base) for the model of --run by a sequence of "
                                   "Adjoint Matching runs (one per outer iteration); writes a run folder with "
                                   "log.jsonl (utility, divergence, KL per outer iteration) and before_after.png.")
    base_run_flag(s)
    s.add_argument("--utility", default="entropy",
                   help=f"one of: {', '.join(FDC_UTILITIES)} (default: entropy)")
    s.add_argument("--divergence", default="kl", help="kl, renyi or ot (W2² with POT potentials) (default: kl)")
    s.add_argument("--alpha", type=float, default=0.5, help="Rényi order α ≠ 1 (default: 0.5)")
    s.add_argument("--reward", default="linear",
                   help=f"reward of mean-variance, cvar, expected: {', '.join(rewards_mod.REWARDS)} (default: linear)")
    s.add_argument("--kappa", type=float, default=1.0, help="mean-variance weight κ in E r − κ Var r (default: 1)")
    s.add_argument("--level", type=float, default=0.1, help="CVaR tail mass β in (0, 1] (default: 0.1)")
    s.add_argument("--tail", default="left", choices=("right", "left"), help="CVaR tail (default: left, risk-averse)")
    s.add_argument("--bandwidth", type=float, default=0.5, help="kernel width of novelty and diversity (default: 0.5)")
    s.add_argument("--reg", type=float, default=1e-3, help="ε in log det(E φφᵀ + εI) of design (default: 0.001)")
    add_config_flags(s, FDCConfig, skip=("step",))
    s.add_argument("--step", type=optional_float, default=None,
                   help="mirror step γ; none: 1/(λ + curvature of the utility) (default: none)")
    add_config_flags(s, FinetuneConfig, skip=("lam",))
    run_folder_flags(s, "runs/fdc", "continue from the last finished outer iteration")
    s.set_defaults(func=cmd_fdc)
