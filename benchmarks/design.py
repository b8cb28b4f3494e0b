"""De novo molecule design: can tail-aware fine-tuning shape the distribution of a molecular property,
and what does an aggressive tail setting cost in validity?

Data: tasks.design (RDKit's NCI molecules with ≤ 9 heavy atoms, 8 ETKDG + MMFF94 conformers each,
split by molecule). Base: an SE(3)-equivariant flow (tasks.design.pretrain) trained on one CPU
thread; its checkpoint is benchmarks/results/design_base.safetensors (written by `--pretrain`, read
by every other run: `load_base()` below is how a script fetches it). Property: the Gasteiger-charge
dipole |Σ q_i r_i| (e·Å); the reward is a predictor of it trained on the training split
(tasks.design_rewards, held-out error in the JSON), checkpoint design_dipole.safetensors.
Models: base; expected reward at λ₁, λ₂; right CVaR (seek the most polar molecules) and left CVaR
(lift the least polar) at each of λ₁, λ₂ and β₁, β₂; FDC novelty (composition + property
space) at λ₁. Each is evaluated independently by RDKit on decoded ODE samples: the dipole's mean
and CVaRs (RDKit's, not the predictor's), validity, uniqueness, novelty, stability, QED, logP.

    python benchmarks/design.py --pretrain      # the base (about 45 min on one CPU thread)
    python benchmarks/design.py --pretrain --coupling independent --pretrain-iters 10000   # a comparison
    python benchmarks/design.py                 # the fine-tuning table (uses the stored base)
    python benchmarks/design.py --quick         # tiny settings, a smoke test

Writes benchmarks/results/design.json, design.png (the reward's histograms per model and validity
against the tail setting) and design_molecules_<model>.png (valid molecules of each model drawn by
RDKit); with --pretrain, design_pretrain.json (the base's validity during training).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

import tiltflow as tilt  # noqa: E402
from tiltflow.models import FlowModel  # noqa: E402
from tiltflow.tasks import design  # noqa: E402
from tiltflow.tasks import design_rewards as dr  # noqa: E402

RESULTS = ROOT / "results"
BASE = RESULTS / "design_base.safetensors"
PREDICTOR = RESULTS / "design_dipole.safetensors"

PRETRAIN = dict(iters=40000, hidden=64, layers=4, batch_size=64, lr=1e-3, lr_warmup=100, coupling="equivariant",
                seed=0)
CURVE = dict(every=10000, n_eval=512, eval_steps=50, seed=1)    # the base's validity during pretraining
FULL = dict(lams=(0.3, 0.1), levels=(0.2, 0.05), iters=40, batch_size=16, steps=10, n_loss_times=4, lr=1e-3,
            n_offline=512, n_eval=512, eval_steps=20, fdc_outer=1, predictor_iters=2000)
QUICK = dict(lams=(0.3, 0.1), levels=(0.2, 0.05), iters=2, batch_size=4, steps=4, n_loss_times=2, lr=2e-4,
             n_offline=16, n_eval=16, eval_steps=6, fdc_outer=1, predictor_iters=20)


def load_base(path: Path = BASE) -> FlowModel:
    """The stored base model (FlowModel.load: safetensors, architecture from the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run python benchmarks/design.py --pretrain first")
    return FlowModel.load(path).eval()


def pretrain(data, out: Path, settings: dict = PRETRAIN, stem: str = "design_pretrain", store: bool = True) -> dict:
    """Train a base in stages of CURVE["every"] iterations (one run, resumed: the learning rate
    is constant after warm-up, so the stages are the single run), evaluating CURVE["n_eval"] ODE
    samples after each; write the curve to <stem>.json and, with `store`, the final model to BASE."""
    rec = {"settings": settings, "curve_settings": CURVE, "curve": []}
    path = RESULTS / f"{stem}.json"
    if path.is_file():     # a longer run of the same settings keeps the points measured on the way
        old = json.loads(path.read_text())
        same = {k: v for k, v in old["settings"].items() if k != "iters"} == \
            {k: v for k, v in settings.items() if k != "iters"} and old["curve_settings"] == CURVE
        rec["curve"] = [row for row in old["curve"] if same and row["iters"] <= settings["iters"]]
    train_s = rec["curve"][-1]["train_s"] if rec["curve"] else 0.0
    model = None
    for done in range(CURVE["every"], settings["iters"] + 1, CURVE["every"]):
        if any(row["iters"] == done for row in rec["curve"]):
            continue
        t = time.perf_counter()
        model = design.pretrain(data=data, out=out, resume=True, checkpoint_every=1000, progress=False,
                                **{**settings, "iters": done})
        train_s += time.perf_counter() - t
        x = design.sample(model, CURVE["n_eval"], steps=CURVE["eval_steps"], seed=CURVE["seed"])
        row = {"iters": done, "train_s": train_s, **design.evaluate(x, data.train_smiles)}
        rec["curve"].append(row)
        print(f"{done} iterations, {train_s / 60:.1f} min: validity {row['validity']:.3f}, uniqueness "
              f"{row['uniqueness']:.2f}, novelty {row['novelty']:.2f}, atom stability {row['atom_stability']:.3f}",
              flush=True)
        path.write_text(json.dumps(rec, indent=1))
    if store:
        if model is None:     # every point was measured before: the finished run, read back
            model = design.pretrain(data=data, out=out, resume=True, progress=False, **settings)
        model.save(BASE)
    rec["final_loss"] = json.loads((out / "metrics.json").read_text()).get("final_loss")
    path.write_text(json.dumps(rec, indent=1))
    return rec


def predictor(data, iters: int):
    """The dipole predictor (a 4-seed ensemble, trained once and cached by tasks.design_rewards, a
    copy stored in results/) and its held-out report."""
    p, report = dr.cached_predictor("dipole", data, iters=iters, seed=0)
    if iters == FULL["predictor_iters"]:
        dr.save_predictor(p, PREDICTOR, report)
    return p, report


def composition_novelty(data, reward, bandwidth: float = 0.5):
    """Novelty in an invariant feature space: φ(x) = (soft atom-type counts, predicted dipole),
    log q_ref(x) = log mean_j N(φ(x); φ(y_j), h² I) over the training states y_j."""
    def phi(x):
        x = x.reshape(x.shape[0], design.N_MAX, 3 + design.K)
        counts = torch.softmax(x[..., 3:] * 2.0, -1)[..., 1:].sum(1)          # (batch, K − 1), no "none"
        return torch.cat([counts, reward(x)[:, None]], 1)
    with torch.no_grad():
        ref = torch.cat([phi(b) for b in data.train.split(512)])

    def log_q(x):
        f = phi(x)
        d2 = torch.cdist(f, ref.to(f)).pow(2)
        return torch.logsumexp(-d2 / (2 * bandwidth**2), 1) - math.log(ref.shape[0])
    return tilt.Novelty(log_q, bandwidth=bandwidth)


def evaluate(model, data, s: dict, reward, seed: int = 1) -> tuple[dict, torch.Tensor]:
    x = design.sample(model, s["n_eval"], steps=s["eval_steps"], seed=seed)
    rec = design.evaluate(x, data.train_smiles, level=0.1)
    with torch.no_grad():
        rec["predicted_dipole_mean"] = float(reward(x).mean())     # the reward itself, over all samples
    return rec, x


def runs(s: dict) -> list[tuple[str, str, float, float | None]]:
    (l1, l2), (b1, b2) = s["lams"], s["levels"]
    grid = [("expected", "expected", l1, None), ("expected", "expected", l2, None)]
    for tail in ("right", "left"):
        grid += [(f"cvar-{tail}", tail, lam, level) for lam in (l1, l2) for level in (b1, b2)]
    return grid + [("fdc-novelty", "novelty", l1, None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", action="store_true", help="train and store the base model, then stop")
    ap.add_argument("--coupling", choices=("equivariant", "independent"), default=PRETRAIN["coupling"],
                    help="with --pretrain: the base's coupling; another than the default trains a comparison "
                         "(design_pretrain_<coupling>.json, --pretrain-iters iterations) and stores no base")
    ap.add_argument("--pretrain-iters", type=int, default=PRETRAIN["iters"], help="with --pretrain and --coupling")
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke test; writes design_quick.*)")
    ap.add_argument("--base", type=Path, default=BASE, help=f"base model file (default: {BASE.name} in results/)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = design.load_dataset()
    if args.pretrain and args.coupling != PRETRAIN["coupling"]:
        rec = pretrain(data, ROOT.parent / "runs" / f"design_base_{args.coupling}",
                       {**PRETRAIN, "coupling": args.coupling, "iters": args.pretrain_iters},
                       f"design_pretrain_{args.coupling}", store=False)
        print(json.dumps(rec, indent=1))
        return
    if args.pretrain:
        rec = pretrain(data, ROOT.parent / "runs" / "design_base")
        print(json.dumps(rec, indent=1))
        return
    s = QUICK if args.quick else FULL
    stem = "design_quick" if args.quick else "design"
    base = load_base(args.base)
    pred, report = predictor(data, s["predictor_iters"])
    r = dr.PropertyReward(pred)
    out = {"question": __doc__.split("\n\n")[0], "settings": s, "pretrain": PRETRAIN,
           "base_checkpoint": str(BASE.relative_to(ROOT.parent)), "predictor": report,
           "data": {"train": list(data.train.shape), "test": list(data.test.shape),
                    "molecules": [len(data.train_smiles), len(data.test_smiles)]},
           "models": {}}
    samples = {}
    t = time.perf_counter()
    out["models"]["base"], samples["base"] = evaluate(base, data, s, r)
    out["models"]["base"]["time_s"] = time.perf_counter() - t
    ft_kw = dict(iters=s["iters"], batch_size=s["batch_size"], steps=s["steps"], n_loss_times=s["n_loss_times"],
                 lr=s["lr"], n_offline=s["n_offline"], progress=False, seed=0)
    for kind, tail, lam, level in runs(s):
        name = f"{kind}_{lam:g}" + (f"_{level:g}" if level is not None else "")    # e.g. cvar-right_0.3_0.05
        t = time.perf_counter()
        if kind == "fdc-novelty":
            # backtrack=0: the one outer step is kept whatever it does to F − λD, so the row shows
            # that step (with backtracking a rejected step would return the base unchanged)
            model = tilt.fdc(base, composition_novelty(data, r), lam=lam, iters_outer=s["fdc_outer"],
                             n_eval=s["n_eval"], eval_steps=s["eval_steps"], n_kl=8, backtrack=0, **ft_kw)
        elif kind == "expected":
            model = tilt.finetune(base, tilt.ExpectedReward(r), lam=lam, **ft_kw)
        else:
            model = tilt.finetune(base, tilt.CVaR(r, level=level, tail=tail), lam=lam, **ft_kw)
        rec, samples[name] = evaluate(model, data, s, r)
        rec.update(kind=kind, lam=lam, level=level, time_s=time.perf_counter() - t)
        out["models"][name] = rec
        print(f"{name:28s} dipole {rec['dipole_mean']:.3f} (CVaR₀.₁ left {rec['dipole_cvar_left']:.3f}, right "
              f"{rec['dipole_cvar_right']:.3f})  validity {rec['validity']:.2f}  uniqueness {rec['uniqueness']:.2f}"
              f"  {rec['time_s']:.0f} s", flush=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    figures({**out, "_reward": r}, samples, stem)


def figures(out: dict, samples: dict, stem: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: figures skipped (pip install 'tiltflow[plot]')")
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    reward = out["_reward"]
    for name in ("base", "expected_0.1", "cvar-right_0.3_0.05", "cvar-left_0.3_0.05", "fdc-novelty_0.3"):
        if name in samples:
            with torch.no_grad():
                d = reward(samples[name]).numpy()
            ax[0].hist(d, bins=40, histtype="step", density=True, label=name)
    ax[0].set_xlabel("predicted dipole (e·Å), the reward, over all samples")
    ax[0].legend(fontsize=7)
    for tail, marker in (("right", "o"), ("left", "s")):
        for lam, fill in zip(out["settings"]["lams"], ("full", "none")):
            pts = sorted((m["level"], m["validity"]) for m in out["models"].values()
                         if m.get("kind") == f"cvar-{tail}" and m["lam"] == lam)
            if pts:
                ax[1].plot(*zip(*pts), marker + "-", fillstyle=fill, label=f"{tail} CVaR, λ = {lam:g}")
    ax[1].axhline(out["models"]["base"]["validity"], color="k", ls="--", label="base")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("tail mass β (smaller = more aggressive)")
    ax[1].set_ylabel("validity (RDKit: decodes, sanitises, one fragment)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    for old in RESULTS.glob(f"{stem}_molecules_*.png"):     # a model without valid molecules leaves none
        old.unlink()
    for name, x in samples.items():      # one grid of molecules per model, side by side in the docs
        try:
            design.draw(x, RESULTS / f"{stem}_molecules_{name}.png", n=8)
        except ValueError:               # no valid molecule to draw
            pass


if __name__ == "__main__":
    main()
