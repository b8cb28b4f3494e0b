"""`tiltflow digits`: the offline image task. A class-conditional U-Net flow on scikit-learn's 8×8
digits, fine-tuned toward r(x, d) = log p_clf(d | x) of an in-repo classifier (expected reward,
right or left CVaR, or FDC with entropy)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from ..methods.fdc import fdc
from ..methods.finetune import finetune
from ..methods.pretrain import pretrain
from ..objectives import CVaR, ExpectedReward
from ..validation import in_interval, non_negative, one_of, positive, positive_int
from .flags import (add_config_flags, build, config_dict, config_from, positive_ints, resolve_deprecated,
                    run_folder_flags, with_report_to)
from .runs import EVAL_SEED_OFFSET, RUN_INFO, load_model, open_run_tracker, prepare_run, track_results, writes

DIGITS_OBJECTIVES = ("expected", "right-cvar", "left-cvar", "fdc-entropy")


@dataclass
class DigitsConfig:
    """The offline image task: a class-conditional U-Net flow on scikit-learn's 8×8 digits,
    fine-tuned toward r(x, d) = log p_clf(d | x) of an in-repo classifier (saved as config.json)."""
    objective: str = "left-cvar"          # expected, right-cvar, left-cvar or fdc-entropy (FDC of E r + α·H)
    digit: int | None = None              # one digit 0..9; none: all ten, one prompt per micro-batch (fdc-entropy needs one)
    lam: float = 0.05                     # KL weight λ (reward units: nats of log-probability)
    level: float = 0.1                    # CVaR tail mass β
    alpha: float = 0.02                   # entropy weight α of fdc-entropy
    iters_outer: int = 1                  # FDC outer iterations (one reaches the optimum for E r + α·H with KL)
    pretrain_iters: int = 1500            # optimiser steps of the U-Net's flow-matching pretraining
    pretrain_batch_size: int = 128
    channels: tuple = (16, 32)            # U-Net widths at 8×8 and 4×4
    iters: int = 100                      # Adjoint Matching iterations (per FDC outer iteration)
    batch_size: int = 32                  # trajectories per iteration (one digit each)
    steps: int = 20                       # memoryless-SDE steps per trajectory
    lr: float = 1e-4                      # fine-tuning learning rate
    n_offline: int = 1000                 # base samples for the CVaR threshold (stage 1)
    per_digit: int = 100                  # evaluation samples per digit
    eval_steps: int = 50                  # Heun steps of the evaluation samples
    n_kl: int = 64                        # paths per digit of the path-KL estimate; 0 skips
    seed: int = 0
    device: str = "auto"                  # auto: the GPU when there is one, else the CPU
    pretrain_steps: int | None = field(default=None, metadata={"deprecated": "pretrain_iters"})

    def __post_init__(self):
        resolve_deprecated(self)
        one_of(self.objective, "objective", DIGITS_OBJECTIVES)
        if self.digit is not None and (isinstance(self.digit, bool) or not isinstance(self.digit, int)
                                       or not 0 <= self.digit <= 9):
            raise ValueError(f"digit must be in 0..9 (or none for all ten), got {self.digit}")
        if self.objective == "fdc-entropy" and self.digit is None:
            raise ValueError("objective fdc-entropy needs one digit (fdc takes no condition): pass --digit D")
        positive(self.lam, "lam")
        in_interval(self.level, "level", 0.0, 1.0)
        non_negative(self.alpha, "alpha")
        for name in ("iters_outer", "pretrain_iters", "pretrain_batch_size", "iters", "batch_size", "steps",
                     "n_offline", "eval_steps"):
            positive_int(getattr(self, name), name)
        positive_ints(self.channels, "channels")
        positive(self.lr, "lr")
        positive_int(self.per_digit, "per_digit", minimum=2)      # diversity compares pairs
        positive_int(self.n_kl, "n_kl", minimum=0)
        positive_int(self.seed, "seed", minimum=0)


def print_table(models: dict) -> None:
    cols = [("reward_mean", "mean r"), ("cvar_left_10", "left 10%"), ("cvar_right_10", "right 10%"),
            ("accuracy", "accuracy"), ("diversity", "diversity"), ("kl_path", "KL (path)")]
    print("model".ljust(11) + "".join(h.rjust(11) for _, h in cols))
    for name, st in models.items():
        print(name.ljust(11) + "".join(f"{st[k]:11.4f}" if st.get(k) is not None else "—".rjust(11) for k, _ in cols))


def cmd_digits(args) -> int:
    from ..tasks import digits     # scikit-learn is optional: imported only here

    cfg = build(DigitsConfig, config_from(args, DigitsConfig))
    out = Path(args.out)
    progress = not args.no_progress
    if writes():        # under torchrun only rank 0 prints, evaluates and writes
        print(f"tiltflow digits: {cfg}")
    prepare_run(out, config_dict(cfg), args.resume,
                resumable_keys=("pretrain_iters", "pretrain_steps", "iters", "iters_outer"))
    clf = digits.classifier()                 # seed 0 for every run: rewards comparable across runs
    timings, t = {}, time.perf_counter()
    if args.base_run is not None:
        base = load_model(args.base_run, cfg.device)
        if base.shape != digits.SHAPE or base.config()["net"].get("class") != "SmallUNetVelocity":
            raise ValueError(f"--base-run {args.base_run} does not hold a digits model (SmallUNetVelocity on "
                             f"(1, 8, 8)); its model has shape {base.shape}")
    else:
        base = digits.pretrain_base(cfg.pretrain_iters, channels=cfg.channels, batch_size=cfg.pretrain_batch_size,
                                    seed=cfg.seed, device=cfg.device, out=out / "pre", resume=args.resume,
                                    progress=progress, **with_report_to(pretrain, args.report_to, {}))
    timings["pretrain_s"] = time.perf_counter() - t
    t = time.perf_counter()
    common = dict(iters=cfg.iters, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                  device=cfg.device, out=out / "ft", resume=args.resume, progress=progress)
    chosen = list(range(10)) if cfg.digit is None else [cfg.digit]
    with open_run_tracker(args.report_to, out / "ft", "digits", config_dict(cfg)) as tracker:   # records, results
        if cfg.objective == "fdc-entropy":
            utility = digits.RewardEntropy(digits.DigitReward(clf, cfg.digit), alpha=cfg.alpha)
            ft = fdc(digits.bind_digit(base, cfg.digit), utility, lam=cfg.lam, iters_outer=cfg.iters_outer,
                     n_eval=cfg.per_digit, eval_steps=cfg.eval_steps, n_kl=0, init="copy",
                     **with_report_to(fdc, tracker, common))
        else:
            r = digits.DigitReward(clf)
            obj = ExpectedReward(r) if cfg.objective == "expected" else \
                CVaR(r, level=cfg.level, tail=cfg.objective.split("-")[0])
            where = {"prompts": digits.prompts()} if cfg.digit is None else {"cond": digits.one_hot([cfg.digit])}
            ft = finetune(base, obj, lam=cfg.lam, n_offline=cfg.n_offline, **where,
                          **with_report_to(finetune, tracker, common))
        timings["finetune_s"] = time.perf_counter() - t
        if not writes():
            return 0
        seed = cfg.seed + EVAL_SEED_OFFSET
        ev = dict(per_digit=cfg.per_digit, digits=chosen, steps=cfg.eval_steps, seed=seed, n_kl=cfg.n_kl)
        models = {"base": digits.evaluate(base, clf, **{**ev, "n_kl": 0}),
                  "finetuned": digits.evaluate(ft, clf, base=base, **ev)}
        models["base"]["kl_path"] = 0.0
        ckpt.write_json(out / "metrics.json", {"config": config_dict(cfg), "models": models, "timings": timings})
        ckpt.write_json(out / RUN_INFO, {"command": "digits", "objective": cfg.objective})
        written = ["metrics.json", "pre/" if args.base_run is None else None, "ft/"]
        try:
            xb, _ = digits.sample(base, 8, chosen, cfg.eval_steps, seed)
            xf, _ = digits.sample(ft, 8, chosen, cfg.eval_steps, seed)
            digits.plot_grids(out / "before_after.png", {"base": xb, cfg.objective: xf}, ncols=8,
                              title=f"digits {'0-9' if cfg.digit is None else cfg.digit}: {cfg.objective}, λ = {cfg.lam:g}")
            written.append("before_after.png")
        except ImportError as e:
            print(f"note: skipping before_after.png: {e}", file=sys.stderr)
        track_results(tracker, out / "ft", [(out / "before_after.png").resolve()], models)
    print(f"\ndigits {'0-9' if cfg.digit is None else cfg.digit}, {cfg.per_digit} ODE samples per digit; "
          "r = log p_clf(requested digit | x):")
    print_table(models)
    print(f"wrote {args.out}/: {', '.join(w for w in written if w)}")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("digits", help="8×8 digits: pretrain a class-conditional U-Net flow, fine-tune toward a classifier",
                       description="Pretrain a class-conditional U-Net flow on scikit-learn's 8×8 digits (or reuse "
                                   "--base-run), fine-tune it toward r(x, d) = log p_clf(d | x) of an in-repo "
                                   "classifier by expected reward, right or left CVaR (TFFT) or FDC with entropy, and "
                                   "write metrics.json and before_after.png (image grids). Needs scikit-learn: "
                                   "pip install 'tiltflow[digits]'.")
    add_config_flags(s, DigitsConfig)
    s.add_argument("--base-run", dest="base_run", default=None,
                   help="run folder whose model.safetensors is a pretrained digits model (skips pretraining)")
    run_folder_flags(s, "runs/digits")
    s.set_defaults(func=cmd_digits)
