"""Would a heavy-atom state, with each atom's hydrogen count in its type, give a de novo base with
useful validity on a CPU where the explicit-hydrogen state does not?

The design task's state (tasks.design) has 27 nodes: heavy atoms, their hydrogens and absent
nodes. Its base reaches about 1 % validity after 3000 iterations (32 min on one thread). Most
failures are hydrogens: atoms too close, or too far from every heavy atom (a one-off count on 256
samples of the stored base: 99 with a hydrogen over 1.6 Å from every heavy atom, 119 over-valent).
This benchmark is the prototype of the alternative, outside the library:

  state     9 nodes × (3 coordinates + 11 type channels), TYPE_SCALE · one-hot over
            none, C0–C3, N0–N2, O0–O1, F0 (element and number of attached hydrogens), built from
            the same conformers (tasks.design.load_dataset) with the hydrogens dropped;
  decoding  bonds between heavy atoms from distances (RDKit's DetermineConnectivity), then bond
            orders by exhaustive search for an assignment that gives every atom its neutral valence
            (C 4, N 3, O 2, F 1) with its hydrogens; valid = such an assignment exists, RDKit
            sanitises the molecule and it is one fragment;
  model     SE3Velocity (64 × 4, the design base's width and depth) with the equivariant coupling,
            batch 64, lr 1e-3, evaluated every --eval-every iterations on 512 ODE samples (50 Heun
            steps): validity, uniqueness, novelty against the training molecules, atom stability
            (atoms whose neighbours and hydrogens fit a valence).

Writes results/design_heavy_atoms.json.

    python benchmarks/design_heavy_atoms.py                 # 40000 iterations, about 40 min on one thread
    python benchmarks/design_heavy_atoms.py --iters 2000 --eval-every 1000   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tiltflow.methods.pretrain import pretrain  # noqa: E402
from tiltflow.models.se3 import SE3Velocity  # noqa: E402
from tiltflow.tasks import design  # noqa: E402

from _common import RESULTS, setup_torch, write_json  # noqa: E402

TYPES = ("none", "C0", "C1", "C2", "C3", "N0", "N1", "N2", "O0", "O1", "F0")
NODES = design.MAX_HEAVY
VALENCE = {"C": 4, "N": 3, "O": 2, "F": 1}
Z = {"C": 6, "N": 7, "O": 8, "F": 9}


def heavy_states(x: torch.Tensor) -> torch.Tensor:
    """Design states (n, 27, 9) of the data -> heavy-atom states (n, NODES, 3 + len(TYPES))."""
    from rdkit.rdBase import BlockLogs
    out = torch.zeros(x.shape[0], NODES, 3 + len(TYPES))
    with BlockLogs():
        for row, mol in zip(out, design.decode(x)):
            heavy = [a for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
            pos = torch.as_tensor(mol.GetConformer().GetPositions()[[a.GetIdx() for a in heavy]], dtype=torch.float32)
            row[: len(heavy), :3] = pos - pos.mean(0)
            for k, a in enumerate(heavy):
                h = sum(n.GetAtomicNum() == 1 for n in a.GetNeighbors())
                row[k, 3 + TYPES.index(f"{a.GetSymbol()}{h}")] = design.TYPE_SCALE
            row[len(heavy):, 3] = design.TYPE_SCALE
    return out


def _extra_orders(n_atoms: int, edges: list, need: list) -> list | None:
    """Extra bond orders b_e ∈ {0, 1, 2} (bond order 1 + b_e) with Σ_{e ∋ i} b_e = need[i] for every
    atom i, by depth-first search over the edges; None when there is none."""
    need = list(need)
    left = [sum(1 for e in edges if i in e) for i in range(n_atoms)]     # edges of i not yet assigned
    b = [0] * len(edges)

    def search(k: int) -> bool:
        if k == len(edges):
            return not any(need)
        i, j = edges[k]
        left[i] -= 1
        left[j] -= 1
        for v in (2, 1, 0):
            if need[i] >= v and need[j] >= v and need[i] - v <= 2 * left[i] and need[j] - v <= 2 * left[j]:
                need[i] -= v
                need[j] -= v
                b[k] = v
                if search(k + 1):
                    return True
                need[i] += v
                need[j] += v
        left[i] += 1
        left[j] += 1
        return False

    return b if search(0) else None


def decode_one(xi: torch.Tensor):
    """(Mol or None, atoms, stable atoms) of one heavy-atom state (NODES, 3 + len(TYPES))."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds
    t = xi[:, 3:].argmax(-1)
    keep = t != 0
    names = [TYPES[k] for k in t[keep].tolist()]
    if not names:
        return None, 0, 0
    hs = [int(s[1:]) for s in names]
    conn = design._atoms_mol([Z[s[0]] for s in names], xi[keep, :3].double().numpy())
    try:
        rdDetermineBonds.DetermineConnectivity(conn)
    except (ValueError, RuntimeError):
        return None, len(names), 0
    need = [VALENCE[s[0]] - h - conn.GetAtomWithIdx(i).GetDegree() for i, (s, h) in enumerate(zip(names, hs))]
    stable = sum(v == 0 for v in need)          # single bonds already fill these atoms' valence
    if min(need) < 0:
        return None, len(names), stable
    edges = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in conn.GetBonds()]
    extra = _extra_orders(len(names), edges, need)
    if extra is None:
        return None, len(names), stable
    kinds = {0: Chem.BondType.SINGLE, 1: Chem.BondType.DOUBLE, 2: Chem.BondType.TRIPLE}
    rw = Chem.RWMol(conn)
    for (i, j), v in zip(edges, extra):
        rw.GetBondBetweenAtoms(i, j).SetBondType(kinds[v])
    for i, h in enumerate(hs):
        rw.GetAtomWithIdx(i).SetNumExplicitHs(h)
    mol = rw.GetMol()
    try:
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError):
        return None, len(names), len(names)
    return (mol if len(Chem.GetMolFrags(mol)) == 1 else None), len(names), len(names)


def evaluate(x: torch.Tensor, train_smiles: list) -> dict:
    from rdkit.rdBase import BlockLogs
    valid, atoms, stable = [], 0, 0
    with BlockLogs():
        for xi in x:
            mol, n, s = decode_one(xi)
            atoms, stable = atoms + n, stable + s
            if mol is not None:
                valid.append(design.smiles(mol))
    unique = set(valid)
    return {"n": x.shape[0], "validity": len(valid) / x.shape[0],
            "uniqueness": len(unique) / len(valid) if valid else float("nan"),
            "novelty": len(unique - set(train_smiles)) / len(unique) if unique else float("nan"),
            "atom_stability": stable / atoms if atoms else float("nan")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=40000)
    ap.add_argument("--eval-every", type=int, default=10000)
    ap.add_argument("--out", type=Path, default=RESULTS / "runs" / "design_heavy_atoms",
                    help="run folder (resumable; default results/runs/design_heavy_atoms)")
    args = ap.parse_args()
    setup_torch(1)
    data = design.load_dataset()
    t = time.perf_counter()
    train, test = heavy_states(data.train), heavy_states(data.test)
    out = {"question": __doc__.split("\n\n")[0], "types": list(TYPES),
           "settings": {"hidden": 64, "layers": 4, "batch_size": 64, "lr": 1e-3, "lr_warmup": 100,
                        "coupling": "equivariant", "seed": 0, "n_eval": 512, "eval_steps": 50},
           "data": {"train": list(train.shape), "test": list(test.shape), "build_s": time.perf_counter() - t},
           "data_eval": evaluate(test, data.train_smiles), "checkpoints": []}
    assert out["data_eval"]["validity"] == 1.0, "the decoder must read every data state back"
    s = out["settings"]
    train_s = 0.0
    for done in range(args.eval_every, args.iters + 1, args.eval_every):
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s["seed"])
            net = SE3Velocity(n_nodes=NODES, n_types=len(TYPES), hidden=s["hidden"], layers=s["layers"])
        model = pretrain(train, done, network=net, batch_size=s["batch_size"], lr=s["lr"], lr_warmup=s["lr_warmup"],
                         coupling=s["coupling"], seed=s["seed"], n_eval=0, out=args.out, resume=True, progress=False,
                         checkpoint_every=1000)
        train_s += time.perf_counter() - t
        x = model.sample(s["n_eval"], steps=s["eval_steps"], seed=1).reshape(s["n_eval"], NODES, -1)
        row = {"iters": done, "train_s": train_s, **evaluate(x, data.train_smiles)}
        out["checkpoints"].append(row)
        print(f"{done} iterations, {train_s / 60:.1f} min: validity {row['validity']:.3f}, uniqueness "
              f"{row['uniqueness']:.2f}, novelty {row['novelty']:.2f}, atom stability {row['atom_stability']:.3f}",
              flush=True)
        write_json("design_heavy_atoms", out)


if __name__ == "__main__":
    main()
