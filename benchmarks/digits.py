"""Digits: what do expected reward, right/left CVaR (TFFT) and FDC with entropy do to an image flow?

The offline image task (tiltflow.tasks.digits): a class-conditional U-Net flow (channels 16/32)
pretrained on scikit-learn's 8×8 digits (train split), and the reward

    r(x, d) = log p_clf(d | x)        (in-repo CNN classifier, label smoothing 0.1, so r ≤ ≈ −0.1)

All methods fine-tune the same base toward the same digit d (default: the base's worst digit by
mean reward, chosen on a pilot sample), at the same λ, with the same Adjoint Matching settings:

  expected      tilt.ExpectedReward(r)                      p* ∝ p_base·exp(r/λ)
  tfft-right    tilt.CVaR(r, β, tail="right")               lift the best β of the rewards
  tfft-left     tilt.CVaR(r, β, tail="left")                lift the worst β (risk-averse)
  fdc-entropy   tilt.fdc(F = E r + α·H(p), KL, λ)           optimum p_base^{λ/(λ+α)}·exp(r/(λ+α))
                (tasks.digits.RewardEntropy; the model is bound to digit d: fdc takes no condition)

Table per model (n_eval ODE samples of digit d, Heun, eval_steps): mean reward, accuracy
(argmax = d), right and left CVaR at 5/10/20 %, diversity (mean pairwise distance of the
classifier's 64 penultimate features), and KL(fine-tuned ‖ base) of the memoryless chains
(exponential steps, Monte Carlo over n_kl paths; an upper bound on the KL of the samples).

Writes results/digits.json (table, settings, timings) and results/digits.png: one image grid
per model (rows of digit-d samples, the same noise for every model), base first.

    python benchmarks/digits.py            # full (~6 min on one thread of a busy 2-core machine)
    python benchmarks/digits.py --quick    # smoke test (~20 s)
    python benchmarks/digits.py --base benchmarks/results/digits_base.safetensors   # reuse the base

Also writes results/digits_base.safetensors (the pretrained base, 0.3 MB) for --base.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tiltflow as tilt  # noqa: E402
from tiltflow.tasks import digits  # noqa: E402

NAME = "digits"
FULL = dict(pretrain_steps=1000, iters=120, batch_size=32, steps=20, lr=1e-4, n_offline=512,
            n_eval=400, eval_steps=30, n_kl=128, fdc_outer=1)
QUICK = dict(pretrain_steps=200, iters=5, batch_size=16, steps=10, lr=1e-4, n_offline=64,
             n_eval=64, eval_steps=10, n_kl=16, fdc_outer=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--digit", type=int, default=None, help="target digit (default: the base's worst)")
    p.add_argument("--lam", type=float, default=0.05, help="KL weight λ of every method")
    p.add_argument("--level", type=float, default=0.1, help="CVaR tail mass β")
    p.add_argument("--alpha", type=float, default=0.01, help="entropy weight α of FDC")
    p.add_argument("--base", default=None, help="reuse a pretrained digits model file (skips pretraining)")
    args = p.parse_args(argv)
    _common.setup_torch(1)
    s = QUICK if args.quick else FULL
    timings, t_all = {}, time.perf_counter()
    clf = digits.classifier()

    t = time.perf_counter()
    if args.base:
        base = tilt.FlowModel.load(args.base)
    else:
        base = digits.pretrain_base(s["pretrain_steps"], channels=(16, 32), batch_size=128, seed=0, progress=False)
        base.save(_common.RESULTS / "digits_base.safetensors")
    timings["pretrain_s"] = time.perf_counter() - t

    # the target: the digit whose base samples the classifier likes least (pilot, other noise)
    d = args.digit
    pilot = None
    if d is None:
        per = {}
        r = digits.DigitReward(clf)
        for k in range(10):
            x, c = digits.sample(base, 32, [k], s["eval_steps"], seed=99 + k)
            with torch.no_grad():
                per[k] = float(r(x, c).mean())
        d = min(per, key=per.get)
        pilot = {"mean_reward_per_digit": per}
    print(f"target digit {d}")

    r_d = digits.DigitReward(clf)
    cond = digits.one_hot([d])
    am = dict(iters=s["iters"], batch_size=s["batch_size"], steps=s["steps"], lr=s["lr"], seed=0)
    models, times = {"base": base}, {}
    for name, obj in (("expected", tilt.ExpectedReward(r_d)),
                      ("tfft-right", tilt.CVaR(r_d, level=args.level, tail="right")),
                      ("tfft-left", tilt.CVaR(r_d, level=args.level, tail="left"))):
        t = time.perf_counter()
        models[name] = tilt.finetune(base, obj, lam=args.lam, cond=cond, n_offline=s["n_offline"],
                                     progress=False, **am)
        times[name] = time.perf_counter() - t
        print(f"{name}: {times[name]:.0f} s", flush=True)
    t = time.perf_counter()
    utility = digits.RewardEntropy(digits.DigitReward(clf, d), alpha=args.alpha)
    models["fdc-entropy"] = tilt.fdc(digits.bind_digit(base, d), utility, lam=args.lam,
                                     iters_outer=s["fdc_outer"], n_eval=s["n_eval"] // 4,
                                     eval_steps=s["eval_steps"], n_kl=0, progress=False, init="copy", **am)
    times["fdc-entropy"] = time.perf_counter() - t
    print(f"fdc-entropy: {times['fdc-entropy']:.0f} s", flush=True)
    timings["finetune_s"] = times

    t = time.perf_counter()
    table, grids = {}, {}
    for name, m in models.items():
        table[name] = digits.evaluate(m, clf, base=None if name == "base" else base, per_digit=s["n_eval"],
                                      digits=[d], steps=s["eval_steps"], seed=1000, n_kl=s["n_kl"])
        if name == "base":
            table[name]["kl_path"] = 0.0
        grids[name], _ = digits.sample(m, 48, [d], s["eval_steps"], seed=2000)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    cols = ["reward_mean", "reward_se", "accuracy", "cvar_left_05", "cvar_left_10", "cvar_left_20", "cvar_right_05",
            "cvar_right_10", "cvar_right_20", "diversity", "kl_path"]
    print(f"\ndigit {d}, λ = {args.lam:g}, β = {args.level:g}, α = {args.alpha:g}; {s['n_eval']} ODE samples each")
    print("model".ljust(13) + "".join(c.replace("cvar_", "").rjust(10) for c in cols))
    for name, row in table.items():
        print(name.ljust(13) + "".join(f"{row[c]:10.4f}" for c in cols))

    captions = {n: f"r̄ {row['reward_mean']:.3f}, left10 {row['cvar_left_10']:.2f}\n"
                   f"div {row['diversity']:.1f}, KL {row['kl_path']:.1f}" for n, row in table.items()}
    png = _common.RESULTS / (NAME + ("_quick" if args.quick else "") + ".png")
    digits.plot_grids(png, grids, ncols=8, captions=captions,
                      title=f"digit {d}: base and fine-tuned (λ = {args.lam:g}, CVaR β = {args.level:g}, "
                            f"FDC α = {args.alpha:g}); same noise in every panel")
    result = {"question": __doc__.splitlines()[0], "digit": d, "lam": args.lam, "level": args.level,
              "alpha": args.alpha, "settings": s, "pilot": pilot, "table": table, "timings": timings}
    _common.write_json(NAME + ("_quick" if args.quick else ""), result)
    print(f"wrote {png} and results/{NAME}{'_quick' if args.quick else ''}.json; total {timings['total_s']:.0f} s")


if __name__ == "__main__":
    main()
