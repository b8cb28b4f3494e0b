"""Does the chiral EGNN, trained longer, draw L-alanine with the reference handedness by itself
(≥ 95 % of samples, before any mirroring)?

L-alanine C[C@@H](C(=O)O)N with explicit hydrogens (13 atoms), 128 ETKDG + MMFF94 conformers
(tasks.molecules.conformers, seed 0). Network: EGNNVelocity.from_graph (the cross-product term and
the pseudoscalar signed volumes that a molecule with a stereocentre switches on), 32 hidden × 3
layers; flow matching at batch 64, lr 2e-3 (tilt.pretrain), for each of two seeds. Every
--every iterations: 500 ODE samples (50 Heun steps), the share with the reference handedness
(task.handedness) and, after task.mirror_to_reference, the share then (which must be 1 where
every draw is a whole enantiomer). The stages are one run resumed (constant learning rate after
the warm-up), so the curve is the single run's.

Writes results/alanine_handedness.json and alanine_handedness.png.

    python benchmarks/alanine_handedness.py                # 24 000 iterations × 2 seeds, ~20 min on 2 cores
    python benchmarks/alanine_handedness.py --iters 2000 --every 1000 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import tiltflow as tilt  # noqa: E402
from tiltflow.tasks import molecules  # noqa: E402

from _common import RESULTS, save_figure, setup_torch, write_json  # noqa: E402

L_ALANINE = "C[C@@H](C(=O)O)N"
SETTINGS = {"conformers": 128, "hidden": 32, "layers": 3, "batch_size": 64, "lr": 2e-3, "n_eval": 500,
            "eval_steps": 50, "eval_seed": 1}


def curve(seed: int, iters: int, every: int, out: Path) -> list[dict]:
    """The handedness share of one seed's run after every `every` iterations up to `iters`."""
    setup_torch(1)
    task = molecules.conformers(L_ALANINE, n=SETTINGS["conformers"], seed=0)
    rows, train_s = [], 0.0
    for done in range(every, iters + 1, every):
        t = time.perf_counter()
        model = tilt.pretrain(task.data, done, network="egnn", cond=task.graph,
                              hidden=(SETTINGS["hidden"],) * SETTINGS["layers"], batch_size=SETTINGS["batch_size"],
                              lr=SETTINGS["lr"], seed=seed, n_eval=0, out=out / f"seed{seed}", resume=True,
                              progress=False, checkpoint_every=1000)
        train_s += time.perf_counter() - t
        x = model.sample(SETTINGS["n_eval"], steps=SETTINGS["eval_steps"], seed=SETTINGS["eval_seed"])
        drawn = float(task.handedness(x).double().mean())
        mirrored = float(task.handedness(task.mirror_to_reference(x)).double().mean())
        rows.append({"iters": done, "train_s": train_s, "share_drawn": drawn, "share_after_mirroring": mirrored})
        print(f"seed {seed}: {done} iterations, {train_s / 60:.1f} min: {drawn:.1%} drawn with the reference "
              f"handedness, {mirrored:.1%} after mirroring", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=24000)
    ap.add_argument("--every", type=int, default=4000)
    ap.add_argument("--seeds", default="0,1", help="comma-separated; one process each")
    ap.add_argument("--out", type=Path, default=RESULTS / "runs" / "alanine_handedness",
                    help="run folders (resumable; default results/runs/alanine_handedness)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with mp.get_context("spawn").Pool(len(seeds)) as pool:
        curves = pool.starmap(curve, [(s, args.iters, args.every, args.out) for s in seeds])
    out = {"question": __doc__.split("\n\n")[0], "molecule": L_ALANINE, "settings": SETTINGS,
           "seeds": {str(s): c for s, c in zip(seeds, curves)},
           "first_iters_at_95": {str(s): next((r["iters"] for r in c if r["share_drawn"] >= 0.95), None)
                                 for s, c in zip(seeds, curves)}}
    write_json("alanine_handedness", out)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: figure skipped (pip install 'tiltflow[plot]')")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, c in zip(seeds, curves):
        ax.plot([r["iters"] for r in c], [r["share_drawn"] for r in c], "o-", label=f"seed {s}")
    ax.axhline(0.95, color="k", ls="--", label="95 %")
    ax.axhline(0.5, color="grey", ls=":", label="chance")
    ax.set_xlabel("flow-matching iterations")
    ax.set_ylabel("share drawn with the reference handedness")
    ax.set_title("L-alanine, chiral EGNN 32×3, before mirroring")
    ax.legend()
    save_figure(fig, "alanine_handedness")


if __name__ == "__main__":
    main()
