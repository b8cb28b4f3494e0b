"""How much shorter does the equivariant coupling make the conditional paths of flow matching on
molecules, and what does it cost per minibatch?

Equivariant flow matching (Klein, Krämer & Noé 2023) pairs each data state x1 with noise
x0 ~ N(0, I) aligned to it by the network's symmetry group: x0 ← g*·x0, g* ≈ argmin_g ‖g·x0 − x1‖²
(tilt.couplings.equivariant_pairing; pretrain(coupling="equivariant")). The conditional path
x_t = t x1 + (1 − t) x0 has squared length ‖x1 − x0‖², so its mean over pairs is the transport
cost the coupling lowers. Measured on
  design      the de novo states (27 nodes × (3 coordinates + 6 type channels)): node
              permutations and proper rotations;
  alanine     L-alanine conformers with a fixed graph (13 atoms × 3): proper rotations only;
with the independent pairing, rotation only, and permutation + rotation (where allowed), over
`--n` data rows and one noise draw each; and the wall time of aligning a batch of 64 on one thread.

Writes results/equivariant_coupling.json.

    python benchmarks/equivariant_coupling.py           # about a minute
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tiltflow.couplings import equivariant_pairing  # noqa: E402
from tiltflow.tasks import design, molecules  # noqa: E402

from _common import setup_torch, summary, time_call, write_json  # noqa: E402


def transport(x1: torch.Tensor, nodes: int, permute: bool | None, seed: int) -> dict:
    """Mean and quartiles of ‖x1 − x0‖² per state (the squared length of each conditional path)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(x1.shape, generator=g)
    if permute is not None:
        x0 = equivariant_pairing(x0, x1, nodes=nodes, permute=permute)
    c = (x1 - x0).reshape(x1.shape[0], -1).pow(2).sum(1)
    q = torch.quantile(c, torch.tensor([0.25, 0.5, 0.75]))
    return {"mean": float(c.mean()), "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="data rows per set (default 1024)")
    args = ap.parse_args()
    setup_torch(1)
    sets = {}
    data = design.load_dataset()
    x = data.train[torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(0))[:args.n]]
    sets["design"] = (x, design.N_MAX, True)
    task = molecules.conformers("C[C@@H](C(=O)O)N", n=512, seed=0)
    sets["alanine"] = (task.data[:args.n].reshape(-1, task.n_atoms, 3), task.n_atoms, False)
    out = {"question": __doc__.split("\n\n")[0], "n": args.n, "sets": {}}
    for name, (x1, nodes, can_permute) in sets.items():
        row = {"shape": list(x1.shape[1:]),
               "independent": transport(x1, nodes, None, seed=1),
               "rotation": transport(x1, nodes, False, seed=1)}
        if can_permute:
            row["permutation_rotation"] = transport(x1, nodes, True, seed=1)
        best = row.get("permutation_rotation", row["rotation"])
        row["ratio_to_independent"] = best["mean"] / row["independent"]["mean"]
        batch = x1[:64]
        noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(2))
        row["align_batch64"] = summary(time_call(lambda: equivariant_pairing(noise, batch, nodes=nodes,
                                                                             permute=can_permute), repeats=5))
        out["sets"][name] = row
        print(f"{name}: mean ‖x1 − x0‖² independent {row['independent']['mean']:.1f}, rotation "
              f"{row['rotation']['mean']:.1f}" + (f", permutation + rotation {row['permutation_rotation']['mean']:.1f}"
                                                  if can_permute else "")
              + f"; aligning 64 takes {row['align_batch64']['median_s'] * 1e3:.0f} ms", flush=True)
    write_json("equivariant_coupling", out)


if __name__ == "__main__":
    main()
