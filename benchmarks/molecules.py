"""Molecules: how do expected-reward and tail-aware (TFFT, left/right CVaR) fine-tuning on −MMFF94
energy change the energies, validity and diversity of conformers, on three molecules of growing size?

Three molecules (default ethanol CCO, 9 atoms; glycine NCC(=O)O, 10; L-alanine C[C@@H](C(=O)O)N,
13, with explicit H): 512 ETKDG + MMFF94 conformers each; an EGNN velocity (64 hidden, 4 layers)
pretrained by conditional flow matching (`tilt.pretrain(task.data, network="egnn", cond=task.graph)`,
lr 2e-3, EMA 0.999; 800 steps of batch 128); then Adjoint Matching fine-tuning (20 iterations of
batch 32, 20 SDE steps, lr 5e-4, λ = 100; 256 evaluation samples) (`init="copy"`, so the fine-tuned velocity
stays E(3)-equivariant) with r = −E_MMFF94 (kcal/mol) under ExpectedReward and TFFT
(`tilt.CVaR(r, level=β, tail=...)`) right and left at β ∈ {0.05, 0.1, 0.2}, all at the same λ,
iterations, batch, lr and seed. For each model, on ODE samples: energy quantiles (5/25/50/75/95 %),
left/right CVaR of r at 5/10/20 % (worst / best β fraction of −energy), validity (bond lengths
within 15 % of the data's, bond angles and planar groups within the data's spread (`task.check`),
no clashes below 0.7 × the van der Waals contact, stereo kept), mean pairwise symmetry-aware
RMSD, COV/MAT against the data (heavy atoms, δ = 0.5 Å); and wall seconds of each fine-tuning run
and per iteration (TFFT's stage 1, sampling the offline base set and solving for η*, is inside its
run). Chiral molecules (L-alanine) get the SE(3) network (`chiral=True`, from `task.graph`); as in
`tiltflow molecules`, each model's wrong-handed draws are mirrored (`task.mirror_to_reference`)
before evaluation, and the share drawn with the reference handedness, before mirroring, is
recorded as `handedness_share_drawn` (None without stereocentres).

Writes results/molecules.json and results/molecules.png (results/molecules_quick.* with --quick).

    python benchmarks/molecules.py            # ~15 min on one thread (shared machine)
    python benchmarks/molecules.py --quick    # smoke test, ethanol only (~20 s)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import tiltflow as tilt
from tiltflow.models import FlowModel
from tiltflow.tasks import molecules

from _common import RESULTS, environment, setup_torch

MOLECULES = {"ethanol": "CCO", "glycine": "NCC(=O)O", "alanine": "C[C@@H](C(=O)O)N"}
LEVELS = (0.05, 0.1, 0.2)


def pretrain_egnn(task, steps: int, batch: int, seed: int) -> tuple[FlowModel, float]:
    """Conditional flow matching of an EGNN (64 hidden, 4 layers) on the conformers."""
    t0 = time.perf_counter()
    model = tilt.pretrain(task.data, steps, network="egnn", cond=task.graph, hidden=(64,) * 4,
                          batch_size=batch, lr=2e-3, seed=seed, progress=False)
    return model, time.perf_counter() - t0


def evaluate(task, x) -> dict:
    """task.evaluate plus the 25 % and 75 % energy quantiles (over finite samples)."""
    ev = task.evaluate(x)
    c = x[torch.isfinite(x).all(dim=1)]
    e = task.energy(c).numpy()
    for q in (0.25, 0.75):
        ev[f"energy_q{int(q * 100):02d}"] = float(np.quantile(e, q))
    ev["worst10_energy"] = -ev["reward_cvar_left_0.1"]   # mean energy of the worst 10 % (kcal/mol)
    return ev


def evaluate_model(task, model, n: int) -> dict:
    """`evaluate` on n ODE samples (50 steps, seed 1) after mirroring the wrong-handed draws of a
    chiral molecule, with the share drawn with the reference handedness before the mirroring."""
    x = model.sample(n, steps=50, seed=1)
    drawn = float(task.handedness(x).double().mean()) if task.graph.chiral else None
    ev = evaluate(task, task.mirror_to_reference(x))
    ev["handedness_share_drawn"] = drawn
    return ev


def run_molecule(name: str, smiles: str, args, cfg: dict) -> dict:
    task = molecules.conformers(smiles, n=512, seed=0)
    out = {"smiles": smiles, "atoms": task.n_atoms, "models": {}}
    out["models"]["data"] = evaluate(task, task.data[:cfg["n_eval"]])
    base, t_pre = pretrain_egnn(task, cfg["pre_steps"], 128, seed=0)
    out["pretrain_seconds"] = t_pre
    out["models"]["base"] = evaluate_model(task, base, cfg["n_eval"])
    print(name, task.n_atoms, "atoms; pretrain", round(t_pre, 1), "s; base worst10",
          round(out["models"]["base"]["worst10_energy"], 1), flush=True)

    reward = task.reward("mmff")
    methods = [("expected", tilt.ExpectedReward(reward))]
    methods += [(f"{tail}_{b:g}", tilt.CVaR(reward, level=b, tail=tail))
                for tail in ("right", "left") for b in cfg["levels"]]
    for label, objective in methods:
        t0 = time.perf_counter()
        ft = tilt.finetune(base, objective, lam=args.lam, **cfg["ft"], progress=False)
        seconds = time.perf_counter() - t0
        ev = evaluate_model(task, ft, cfg["n_eval"])
        ev["seconds"] = seconds
        ev["seconds_per_iteration"] = seconds / cfg["ft"]["iters"]
        out["models"][label] = ev
        print(f"  {label:10s} worst10 {ev['worst10_energy']:9.1f}  q50 {ev['energy_q50']:7.1f}  "
              f"q05 {ev['energy_q05']:7.1f}  valid {ev['rate_valid']:.3f}  rmsd {ev['diversity_rmsd']:.3f}  "
              f"COV-R {ev['cov_r']:.2f}  MAT-R {ev['mat_r']:.2f}  {ev['seconds_per_iteration']:.2f} s/it", flush=True)
    m = out["models"]
    b = m["base"]
    out["answer"] = {
        "worst10_energy": {k: v["worst10_energy"] for k, v in m.items()},
        "validity": {k: v["rate_valid"] for k, v in m.items()},
        "handedness_share": {k: v["handedness_share"] for k, v in m.items()},     # None: no stereocentre
        "handedness_share_drawn": {k: v["handedness_share_drawn"] for k, v in m.items() if k != "data"},
        "cov_r": {k: v["cov_r"] for k, v in m.items()},
        "mat_r": {k: v["mat_r"] for k, v in m.items()},
        "diversity_rmsd": {k: v["diversity_rmsd"] for k, v in m.items()},
        "left_0.1_beats_expected_on_worst10": m["left_0.1"]["worst10_energy"] < m["expected"]["worst10_energy"],
        "validity_change_vs_base": {k: v["rate_valid"] - b["rate_valid"] for k, v in m.items() if k != "data"},
        "diversity_change_vs_base": {k: v["diversity_rmsd"] - b["diversity_rmsd"] for k, v in m.items() if k != "data"},
    }
    return out


def plot(results: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mols = list(results["molecules"])
    fig, axes = plt.subplots(len(mols), 3, figsize=(13, 3.1 * len(mols)), squeeze=False)
    for i, mol in enumerate(mols):
        m = results["molecules"][mol]["models"]
        names = [k for k in m if k != "data"]
        colors = ["0.5", "C0"] + ["C3"] * len(results["levels"]) + ["C2"] * len(results["levels"])
        colors = colors[:len(names)]
        for j, (key, label) in enumerate([("worst10_energy", "worst-10 % mean energy (kcal/mol)"),
                                          ("rate_valid", "validity rate"),
                                          ("diversity_rmsd", "RMSD diversity (Å)")]):
            ax = axes[i, j]
            vals = [m[k][key] for k in names]
            ax.bar(range(len(names)), vals, color=colors)
            ax.axhline(m["data"][key], color="k", ls="--", lw=1, label="data")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
            if key == "worst10_energy" and min(vals) > 0:
                ax.set_yscale("log")
            ax.set_title(f"{mol} ({results['molecules'][mol]['atoms']} atoms): {label}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"EGNN + Adjoint Matching on −MMFF94, λ = {results['lam']:g}; grey base, blue expected, "
                 "red TFFT right, green TFFT left (β = 0.05, 0.1, 0.2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecules", nargs="+", default=list(MOLECULES),
                    help=f"names from {list(MOLECULES)} or SMILES")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lam", type=float, default=100.0)
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    setup_torch(1)
    quick = args.quick
    mols = ["ethanol"] if quick and args.molecules == list(MOLECULES) else args.molecules
    iters = args.iters or (2 if quick else 20)
    cfg = {"pre_steps": 30 if quick else 800, "n_eval": 64 if quick else 256, "levels": LEVELS,
           "ft": dict(iters=iters, batch_size=16 if quick else 32, steps=20, lr=5e-4, init="copy",
                      n_offline=64 if quick else 256, seed=0)}
    results = {"question": __doc__.split("\n\n")[0], "environment": environment(), "lam": args.lam,
               "levels": list(LEVELS), "finetune": cfg["ft"], "pretrain_steps": cfg["pre_steps"],
               "pretrain_batch": 128, "network": "EGNN 64x4", "n_conformers": 512,
               "n_eval": cfg["n_eval"], "sample_steps": 50, "quick": quick, "molecules": {}}
    stem = "molecules_quick" if quick else "molecules"
    RESULTS.mkdir(exist_ok=True)
    t_all = time.perf_counter()
    for mol in mols:
        smiles = MOLECULES.get(mol, mol)
        results["molecules"][mol] = run_molecule(mol, smiles, args, cfg)
        results["total_seconds"] = time.perf_counter() - t_all
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))   # after each molecule
    plot(results, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / (stem + '.json')} and .png; total {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
