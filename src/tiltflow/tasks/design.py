"""De novo molecules as one continuous state: encoding, a small 3-D data set, RDKit evaluation.

    data = load_dataset()                          # NCI molecules ≤ 9 heavy atoms, ETKDG + MMFF94
    data.train                                     # (n, N_MAX, 3 + K) float32
    mols = decode(x)                               # RDKit Mols with 3-D hydrogens, or None
    evaluate(x, data.train_smiles)                 # validity, uniqueness, novelty, stability, QED…
    dipole(x)                                      # Gasteiger-charge dipole |Σ q_i r_i| in e·Å

A molecule is a tensor (N_MAX, 3 + K) over its heavy atoms: x[:, :3] coordinates in Å, present
atoms centred on their mean and absent nodes at the origin (so the mean over all N_MAX nodes is
0), and x[:, 3:] = TYPE_SCALE · one_hot(type) over TYPES. A type is an element with the number
of hydrogens bonded to it ("C2" is a CH₂ carbon, "O1" a hydroxyl oxygen); "none" marks an absent
node. Hydrogens are not nodes: their count is in the type, their positions are placed by RDKit
when a state is decoded. Node order: heavy atoms in RDKit order, then absent nodes.

Decoding takes the argmax type, drops "none" nodes, connects heavy atoms from their distances
(RDKit's DetermineConnectivity) and looks for bond orders 1–3 that give every atom its neutral
valence with its hydrogens (C 4, N 3, O 2, F 1), by exhaustive search; when they exist, the
molecule is sanitised and hydrogens are added at 3-D positions (Chem.AddHs(addCoords=True)),
and chirality is read from the coordinates. Molecules are identified by canonical SMILES without
hydrogens and without stereo (`smiles`), the graph-level identity that novelty and uniqueness
count. RDKit is an optional dependency (`pip install 'tiltflow[mol]'`), imported on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..metrics import cvar
from ..tracking import get_logger
from ..validation import in_interval, optional, positive_int
from .molecules import _cache_dir, _rdkit

ELEMENTS = ("C", "N", "O", "F")   # heavy elements the data set admits
VALENCES = {"C": 4, "N": 3, "O": 2, "F": 1}          # neutral valences: bond orders + hydrogens
MAX_HYDROGENS = {"C": 3, "N": 2, "O": 1, "F": 0}      # attached H a type can hold (CH₄, NH₃, H₂O excluded)
TYPES = ("none",) + tuple(f"{e}{h}" for e in ELEMENTS for h in range(MAX_HYDROGENS[e] + 1))
MAX_HEAVY = 9
N_MAX = MAX_HEAVY     # one node per heavy atom
K = len(TYPES)        # 11
TYPE_SCALE = 2.0
TEST_FRACTION = 0.1
MMFF_MAX_ITERS = 2000
CACHE_VERSION = 2     # bump when the recipe below changes, so old caches are not reused
                      # (2: heavy-atom state with hydrogen counts in the type; 1 held explicit H nodes)

_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_log = get_logger(__name__)


# --- encoding --------------------------------------------------------------------------------
def atom_type(atom) -> str:
    """The state's type of an RDKit heavy atom, e.g. "C2"; ValueError when the state cannot hold it."""
    sym, h = atom.GetSymbol(), atom.GetTotalNumHs(includeNeighbors=True)
    where = f"atom {atom.GetIdx()} ({sym}"
    if sym not in ELEMENTS:
        raise ValueError(f"{where}): element {sym!r}; the design state holds only {list(ELEMENTS)} (and H)")
    if atom.GetFormalCharge() or atom.GetNumRadicalElectrons():
        raise ValueError(f"{where}): formal charge {atom.GetFormalCharge()}, radical electrons "
                         f"{atom.GetNumRadicalElectrons()}; the design state holds neutral closed-shell atoms")
    if h > MAX_HYDROGENS[sym]:
        raise ValueError(f"{where}) has {h} hydrogens; a {sym} type holds at most {MAX_HYDROGENS[sym]}")
    return f"{sym}{h}"


def encode(mol, conf_id: int = -1) -> torch.Tensor:
    """One molecule with a 3-D conformer -> (N_MAX, 3 + K) float32.

    Hydrogens may be atoms (Chem.AddHs) or implicit; either way only their count enters the
    heavy atom's type. Heavy atoms in RDKit order, then absent nodes; coordinates of the heavy
    atoms centred on their unweighted mean (mean-free state).
    """
    _, Chem, _ = _rdkit()
    if not isinstance(mol, Chem.Mol):
        raise ValueError(f"mol must be an RDKit Mol, got {type(mol).__name__}")
    if mol.GetNumConformers() == 0:
        raise ValueError("mol has no conformer; embed it first (AllChem.EmbedMolecule)")
    heavy = [a for a in mol.GetAtoms() if a.GetAtomicNum() != 1]
    types = [atom_type(a) for a in heavy]
    if not heavy:
        raise ValueError("mol has no heavy atom; the design state holds molecules of 1 to N_MAX heavy atoms")
    if len(heavy) > N_MAX:
        raise ValueError(f"mol has {len(heavy)} heavy atoms, more than N_MAX = {N_MAX}")
    pos = mol.GetConformer(conf_id).GetPositions()[[a.GetIdx() for a in heavy]]
    pos = pos - pos.mean(axis=0)
    x = torch.zeros(N_MAX, 3 + K, dtype=torch.float32)
    x[: len(heavy), :3] = torch.as_tensor(pos, dtype=torch.float32)
    index = [TYPES.index(t) for t in types] + [0] * (N_MAX - len(heavy))
    x[torch.arange(N_MAX), 3 + torch.tensor(index)] = TYPE_SCALE
    return x


def _check_state(x) -> torch.Tensor:
    """x: (n, N_MAX, 3 + K) tensor -> detached float64 CPU copy; ValueError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (n, {N_MAX}, {3 + K}), got {type(x).__name__}")
    if x.ndim != 3 or tuple(x.shape[1:]) != (N_MAX, 3 + K):
        raise ValueError(f"x must have shape (n, {N_MAX}, {3 + K}), got {tuple(x.shape)}; "
                         "use x[None] for one molecule")
    return x.detach().to("cpu", torch.float64)


def _atoms(xi: torch.Tensor):
    """One state (N_MAX, 3 + K) -> (types of its present nodes (m,), positions (m, 3)), or None
    when it has non-finite entries."""
    if not bool(torch.isfinite(xi).all()):
        return None
    t = xi[:, 3:].argmax(dim=-1)
    keep = t != 0
    return [TYPES[k] for k in t[keep].tolist()], xi[keep, :3].numpy()


def _atoms_mol(types, pos):
    """A Mol of bare heavy atoms (no bonds, no hydrogens) with one conformer at pos (m, 3)."""
    _, Chem, _ = _rdkit()
    from rdkit.Geometry import Point3D
    rw = Chem.RWMol()
    for t in types:
        a = Chem.Atom(_Z[t[0]])
        a.SetNoImplicit(True)
        rw.AddAtom(a)
    conf = Chem.Conformer(len(types))
    for i, p in enumerate(pos):
        conf.SetAtomPosition(i, Point3D(*map(float, p)))
    rw.AddConformer(conf, assignId=True)
    return rw.GetMol()


_MAX_SEARCH = 100_000


def _extra_orders(n_atoms: int, edges: list, need: list) -> list | None:
    """Extra bond orders b_e ∈ {0, 1, 2} (bond order 1 + b_e) with Σ_{e ∋ i} b_e = need[i] for
    every atom i, by depth-first search over the edges (pruned: an atom can still take at most
    2 per unassigned edge); None when there is none, or none within _MAX_SEARCH nodes (a guard
    for odd generated geometries; the data need a few dozen)."""
    need = list(need)
    visits = [0]
    left = [0] * n_atoms                   # edges of each atom not yet assigned
    for i, j in edges:
        left[i] += 1
        left[j] += 1
    b = [0] * len(edges)

    def search(k: int) -> bool:
        if k == len(edges):
            return not any(need)
        visits[0] += 1
        if visits[0] > _MAX_SEARCH:
            return False
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


def _bonded(types, pos):
    """(molecule or None, stable (m,) bool) for heavy atoms of `types` at pos (m, 3).

    The molecule: heavy atoms bonded by distance with bond orders that give every atom its
    neutral valence (VALENCES) together with its hydrogens, hydrogen counts set, sanitised; None
    when connectivity fails, no such orders exist, or RDKit rejects the result. Fragments are
    kept. stable[i]: atom i's valence is exactly filled: all atoms when the orders exist, else
    the atoms whose single bonds and hydrogens already fill it.
    """
    _, Chem, _ = _rdkit()
    from rdkit.Chem import rdDetermineBonds
    if len(types) == 0:
        return None, np.zeros(0, bool)
    mol = _atoms_mol(types, pos)
    try:
        rdDetermineBonds.DetermineConnectivity(mol)
    except (ValueError, RuntimeError):
        return None, np.zeros(len(types), bool)
    # need_i = valence − hydrogens − degree: what double and triple bonds must still supply
    need = [VALENCES[t[0]] - int(t[1:]) - mol.GetAtomWithIdx(i).GetDegree() for i, t in enumerate(types)]
    edges = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    extra = _extra_orders(len(types), edges, need) if min(need) >= 0 else None
    if extra is None:
        return None, np.array([v == 0 for v in need], bool)
    order = (Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE)
    rw = Chem.RWMol(mol)
    for (i, j), v in zip(edges, extra):
        rw.GetBondBetweenAtoms(i, j).SetBondType(order[v])
    for i, t in enumerate(types):
        rw.GetAtomWithIdx(i).SetNumExplicitHs(int(t[1:]))
    mol = rw.GetMol()
    try:
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError):
        return None, np.ones(len(types), bool)
    return mol, np.ones(len(types), bool)


def _with_hydrogens(mol):
    """mol (heavy atoms, sanitised, one conformer) -> a copy with hydrogen atoms at 3-D positions
    (RDKit's AddHs(addCoords=True): after the heavy atoms, each bonded to one) and stereo
    assigned from the coordinates."""
    _, Chem, _ = _rdkit()
    m = Chem.AddHs(mol, addCoords=True)
    Chem.AssignStereochemistryFrom3D(m)
    return m


def decode(x) -> list:
    """States x: (n, N_MAX, 3 + K) -> n RDKit Mols with explicit H and a conformer, or None.

    Heavy atom i of a molecule is the i-th present node (same coordinates); hydrogens follow,
    placed by RDKit. None where the state is non-finite, empty or has no valence-exact bond
    orders (see the module docstring). Disconnected fragments are kept; `evaluate` counts them
    as invalid.
    """
    _rdkit()
    from rdkit.rdBase import BlockLogs
    x = _check_state(x)
    out = []
    with BlockLogs():   # failures are expected for generated states; they become None
        for xi in x:
            atoms = _atoms(xi)
            mol = None if atoms is None else _bonded(*atoms)[0]
            out.append(None if mol is None else _with_hydrogens(mol))
    return out


# --- the data set ----------------------------------------------------------------------------
def smiles(mol) -> str:
    """Canonical SMILES without hydrogens and stereo: the identity of a molecular graph."""
    _, Chem, _ = _rdkit()
    m = Chem.Mol(mol)
    Chem.RemoveStereochemistry(m)   # else RemoveHs keeps an H that defines a C=N bond's stereo
    return Chem.MolToSmiles(Chem.RemoveHs(m), isomericSmiles=False)


def passes_filter(smiles_string: str) -> bool:
    """Whether a SMILES enters the data set: it parses, is one fragment of at most MAX_HEAVY heavy
    atoms, and every heavy atom has a type in TYPES (C/N/O/F, neutral, no radical, at most
    MAX_HYDROGENS attached hydrogens)."""
    _, Chem, _ = _rdkit()
    from rdkit.rdBase import BlockLogs
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles_string)
    if mol is None or len(Chem.GetMolFrags(mol)) != 1 or mol.GetNumAtoms() > MAX_HEAVY:
        return False
    try:
        for a in mol.GetAtoms():
            atom_type(a)
    except ValueError:
        return False
    return True


def split_of(smiles_string: str) -> str:
    """"test" for about TEST_FRACTION of molecules, else "train": the first 8 bytes of the
    SHA-256 of the canonical SMILES as a number in [0, 1), so a molecule's side never depends
    on which other molecules are in the set."""
    u = int.from_bytes(hashlib.sha256(smiles_string.encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < TEST_FRACTION else "train"


def _nci_path() -> Path:
    _rdkit()
    from rdkit import RDConfig
    return Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


@dataclass(frozen=True)
class DesignData:
    """Conformers of small molecules, split by molecule.

    train, test: (n_train | n_test, N_MAX, 3 + K) float32 states; train_molecule,
    test_molecule: (n_train | n_test,) int64 index of each row's molecule in train_smiles /
    test_smiles (canonical, no H, no stereo); recipe: how the set was filtered and generated.
    """

    train: torch.Tensor
    test: torch.Tensor
    train_molecule: torch.Tensor
    test_molecule: torch.Tensor
    train_smiles: list
    test_smiles: list
    recipe: dict

    def __repr__(self) -> str:
        return (f"DesignData(train={tuple(self.train.shape)} from {len(self.train_smiles)} molecules, "
                f"test={tuple(self.test.shape)} from {len(self.test_smiles)} molecules)")


def _build(conformers_per_molecule: int, seed: int, max_molecules: int | None) -> tuple[dict, dict]:
    """Filter the NCI set, embed and relax conformers; tensors and a JSON-able description."""
    rdkit, Chem, AllChem = _rdkit()
    from rdkit.rdBase import BlockLogs
    start = time.perf_counter()
    lines = [ln.split()[0] for ln in _nci_path().read_text().splitlines() if ln.strip()]
    chosen, seen = [], set()
    with BlockLogs():
        for s in lines:
            if not passes_filter(s):
                continue
            key = smiles(Chem.MolFromSmiles(s))
            if key in seen:     # stereoisomers and repeated entries are one graph
                continue
            seen.add(key)
            chosen.append((s, key))
    n_passed = len(chosen)
    if max_molecules is not None:
        chosen = chosen[:max_molecules]
    _log.info("design data: %d NCI molecules pass the filter; embedding %d × %d conformers",
              n_passed, len(chosen), conformers_per_molecule)
    rows = {"train": [], "test": []}
    index = {"train": [], "test": []}
    names = {"train": [], "test": []}
    failed, not_converged, mismatched = [], 0, 0
    with BlockLogs():
        for s, key in chosen:
            mol = Chem.AddHs(Chem.MolFromSmiles(s))
            params = AllChem.ETKDGv3()
            params.randomSeed = seed + 1   # RDKit's randomSeed 0 repeats one conformer
            ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=conformers_per_molecule, params=params))
            res = AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=MMFF_MAX_ITERS) if ids else []
            if len(ids) < conformers_per_molecule or not res:
                failed.append(s)
                continue
            not_converged += sum(int(c != 0) for c, _ in res)
            states = [encode(mol, i) for i in ids]
            # a conformer whose geometry decodes to another graph would teach the flow a wrong label
            good = [xi for xi, m in zip(states, decode(torch.stack(states))) if m is not None and smiles(m) == key]
            mismatched += len(states) - len(good)
            if not good:
                failed.append(s)
                continue
            side = split_of(key)
            index[side] += [len(names[side])] * len(good)
            names[side].append(key)
            rows[side] += good
    empty = torch.zeros(0, N_MAX, 3 + K)
    tensors = {
        side: torch.stack(rows[side]) if rows[side] else empty for side in ("train", "test")
    } | {f"{side}_molecule": torch.tensor(index[side], dtype=torch.int64) for side in ("train", "test")}
    recipe = {
        "source": "RDKit's NCI set, RDConfig.RDDataDir/NCI/first_5K.smi (ships with RDKit, no download)",
        "rdkit_version": rdkit.__version__,
        "filter": (f"parses; one fragment; heavy atoms only {'/'.join(ELEMENTS)}; no formal charge or "
                   f"radical; ≤ {MAX_HEAVY} heavy atoms, each with at most {MAX_HYDROGENS} hydrogens; "
                   "duplicates by canonical SMILES without stereo removed (first kept)"),
        "nci_entries": len(lines),
        "molecules_passing_filter": n_passed,
        "max_molecules": max_molecules,
        "conformers": (f"{conformers_per_molecule} per molecule: ETKDGv3 (randomSeed = seed + 1) on the "
                       f"NCI SMILES with explicit H, then MMFF94 relaxation (maxIters {MMFF_MAX_ITERS})"),
        "conformers_per_molecule": conformers_per_molecule,
        "seed": seed,
        "roundtrip": ("conformers whose heavy-atom state does not decode (connectivity from distances, "
                      "valence-exact bond orders) to the molecule's canonical SMILES are dropped"),
        "conformers_dropped_roundtrip": mismatched,
        "conformers_mmff_not_converged": not_converged,
        "molecules_failed": failed,
        "split": (f"by molecule: test when the first 8 bytes of SHA-256(canonical SMILES) / 2^64 "
                  f"< {TEST_FRACTION}"),
        "state": (f"(N_MAX={N_MAX}, 3+K={3 + K}) per molecule, one node per heavy atom: Å coordinates of the "
                  f"heavy atoms (from the conformer with hydrogens) centred on their mean, absent nodes at 0; "
                  f"{TYPE_SCALE} · one-hot over {list(TYPES)} (element and attached hydrogens)"),
        "train_molecules": len(names["train"]), "test_molecules": len(names["test"]),
        "train_conformers": len(rows["train"]), "test_conformers": len(rows["test"]),
        "cache_version": CACHE_VERSION,
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    _log.info("design data: %d train / %d test molecules, %d / %d conformers in %.1f s",
              recipe["train_molecules"], recipe["test_molecules"], recipe["train_conformers"],
              recipe["test_conformers"], recipe["build_seconds"])
    return tensors, {"train_smiles": names["train"], "test_smiles": names["test"], "recipe": recipe}


def load_dataset(cache_dir=None, conformers_per_molecule: int = 8, seed: int = 0, *,
                 max_molecules: int | None = None, use_cache: bool = True) -> DesignData:
    """The design data set (see the module docstring), built once and cached on disk.

    Cache: `design-<key>.safetensors` (states and row → molecule indices) and `.json` (SMILES,
    recipe) under `cache_dir` (default $TILTFLOW_CACHE/molecules or ~/.cache/tiltflow/molecules),
    keyed by CACHE_VERSION, the RDKit version, conformers_per_molecule, seed and max_molecules
    (the first max_molecules molecules passing the filter, in file order; for quick tests).
    """
    rdkit, _, _ = _rdkit()
    from safetensors.torch import load_file, save_file
    conformers_per_molecule = positive_int(conformers_per_molecule, "conformers_per_molecule")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31 - 2:
        raise ValueError(f"seed must be an integer in [0, 2**31 - 2), got {seed!r}")
    max_molecules = optional(positive_int, max_molecules, "max_molecules")
    key = hashlib.sha256(f"design|{CACHE_VERSION}|{rdkit.__version__}|{conformers_per_molecule}|{seed}|"
                         f"{max_molecules}".encode()).hexdigest()[:16]
    stem = _cache_dir(cache_dir) / f"design-{key}"
    tpath, jpath = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if use_cache and tpath.is_file() and jpath.is_file():
        tensors, meta = load_file(str(tpath)), json.loads(jpath.read_text())
    else:
        tensors, meta = _build(conformers_per_molecule, seed, max_molecules)
        if use_cache:
            stem.parent.mkdir(parents=True, exist_ok=True)
            for path, write in ((jpath, lambda p: p.write_text(json.dumps(meta, indent=1))),
                                (tpath, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))):
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                write(tmp)
                os.replace(tmp, path)
    return DesignData(train=tensors["train"], test=tensors["test"],
                      train_molecule=tensors["train_molecule"], test_molecule=tensors["test_molecule"],
                      train_smiles=list(meta["train_smiles"]), test_smiles=list(meta["test_smiles"]),
                      recipe=dict(meta["recipe"]))


# --- evaluation ------------------------------------------------------------------------------
def _sanitized(mol):
    """A sanitised copy of mol, or None when RDKit rejects it."""
    if mol is None:
        return None
    _, Chem, _ = _rdkit()
    m = Chem.Mol(mol)
    try:
        Chem.SanitizeMol(m)
    except (ValueError, RuntimeError):
        return None
    return m


def _dipole_of(mol) -> float:
    """|Σ q_i (r_i − r̄)| in e·Å with Gasteiger charges q_i, over all atoms of a sanitised Mol
    with a conformer; NaN when a charge is undefined."""
    from rdkit.Chem import rdPartialCharges
    from rdkit.rdBase import BlockLogs
    _, Chem, _ = _rdkit()
    m = Chem.Mol(mol)
    with BlockLogs():
        rdPartialCharges.ComputeGasteigerCharges(m)
    q = np.array([a.GetDoubleProp("_GasteigerCharge") for a in m.GetAtoms()])
    r = m.GetConformer().GetPositions()
    # centring makes the value independent of the origin even when Σ q is not exactly 0
    return float(np.linalg.norm(q @ (r - r.mean(axis=0)))) if np.isfinite(q).all() else math.nan


def _mols(x_or_mols) -> list:
    if isinstance(x_or_mols, torch.Tensor):
        return decode(x_or_mols)
    if isinstance(x_or_mols, (list, tuple)):
        return list(x_or_mols)
    raise ValueError(f"expected states (n, {N_MAX}, {3 + K}) or a list of RDKit Mols, got {type(x_or_mols).__name__}")


def dipole(x_or_mols) -> np.ndarray:
    """Gasteiger-charge dipole magnitude |Σ q_i r_i| in e·Å (1 e·Å ≈ 4.80 D), for evaluation.

    x_or_mols: states (n, N_MAX, 3 + K) (decoded first) or n RDKit Mols with explicit H and a
    conformer. Returns (n,) float64, NaN where a molecule does not decode or sanitise.
    Not differentiable (numpy; charges depend on the decoded bonds).
    """
    return np.array([math.nan if (m := _sanitized(mol)) is None else _dipole_of(m) for mol in _mols(x_or_mols)])


def properties(mols) -> dict:
    """Per-molecule properties of RDKit Mols (None allowed): name -> (n,) float64, NaN where a
    molecule is None or does not sanitise.

    "qed" (RDKit QED), "logp" (Crippen), "dipole" (Gasteiger, e·Å), "heavy_atoms".
    """
    from rdkit.Chem import Crippen, QED
    _, Chem, _ = _rdkit()
    out = {k: np.full(len(mols), math.nan) for k in ("qed", "logp", "dipole", "heavy_atoms")}
    for i, mol in enumerate(_mols(mols)):
        m = _sanitized(mol)
        if m is None:
            continue
        heavy = Chem.RemoveHs(m)
        out["qed"][i] = QED.qed(heavy)
        out["logp"][i] = Crippen.MolLogP(heavy)
        out["dipole"][i] = _dipole_of(m)
        out["heavy_atoms"][i] = heavy.GetNumAtoms()
    return out


def evaluate(x, train_smiles=None, level: float = 0.1) -> dict:
    """Independent RDKit checks of generated states x: (n, N_MAX, 3 + K). Returns floats:

    decoded: fraction that decode (valence-exact bond orders exist and RDKit sanitises the
    molecule); validity: fraction that decode and form one fragment (the data are single
    molecules); uniqueness: distinct canonical SMILES among valid / valid; novelty: fraction of
    the distinct valid SMILES not in train_smiles (NaN without it); atom_stability: fraction of
    atoms whose valence (VALENCES) is exactly filled by bond orders and hydrogens (all atoms of
    a molecule with valence-exact orders; else those filled by single bonds to their neighbours
    by distance); molecule_stability: fraction of molecules with every atom stable;
    <prop>_mean and <prop>_cvar_left / _cvar_right at tail mass `level` over valid molecules for
    qed, logp and dipole (NaN with fewer than one valid). Ratios over nothing are NaN.
    """
    _, Chem, _ = _rdkit()
    from rdkit.rdBase import BlockLogs
    level = in_interval(level, "level", 0.0, 1.0)
    x = _check_state(x)
    n = x.shape[0]
    mols, stable_atoms, n_atoms, stable_mols = [], 0, 0, 0
    with BlockLogs():
        for xi in x:
            atoms = _atoms(xi)
            mol, stable = _bonded(*atoms) if atoms is not None else (None, np.zeros(0, bool))
            mols.append(mol)
            stable_atoms += int(stable.sum())
            n_atoms += len(stable)
            stable_mols += int(len(stable) > 0 and bool(stable.all()))
        valid = [_with_hydrogens(m) for m in mols if m is not None and len(Chem.GetMolFrags(m)) == 1]
    unique = {smiles(m) for m in valid}
    out = {"n": n, "decoded": sum(m is not None for m in mols) / n, "validity": len(valid) / n,
           "uniqueness": len(unique) / len(valid) if valid else math.nan,
           "novelty": math.nan,
           "atom_stability": stable_atoms / n_atoms if n_atoms else math.nan,
           "molecule_stability": stable_mols / n}
    if train_smiles is not None and unique:
        with BlockLogs():
            known = {smiles(m) for s in train_smiles if (m := Chem.MolFromSmiles(s)) is not None}
        out["novelty"] = len(unique - known) / len(unique)
    props = properties(valid)
    for name in ("qed", "logp", "dipole"):
        v = props[name][np.isfinite(props[name])]
        out[f"{name}_mean"] = float(v.mean()) if len(v) else math.nan
        for tail in ("left", "right"):
            out[f"{name}_cvar_{tail}"] = cvar(torch.as_tensor(v), level, tail) if len(v) else math.nan
    return out


# --- output ----------------------------------------------------------------------------------
def to_sdf(x, path) -> Path:
    """Write each state of x: (n, N_MAX, 3 + K) as an SDF record with explicit H and 3-D
    coordinates: the decoded molecule (hydrogens placed by RDKit), or its bare heavy atoms
    without bonds or hydrogens where decoding fails (property "valid" 0/1, "smiles" when valid).
    Non-finite states are skipped."""
    _, Chem, _ = _rdkit()
    from rdkit.rdBase import BlockLogs
    x = _check_state(x)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = Chem.SDWriter(str(tmp))
    try:
        with BlockLogs():
            for i, (xi, mol) in enumerate(zip(x, decode(x))):
                atoms = _atoms(xi)
                if atoms is None:
                    continue
                # decode's molecules are sanitised already; a failure is written as its bare atoms
                record = mol if mol is not None else _atoms_mol(*atoms)
                record.SetProp("_Name", f"sample {i}")
                record.SetIntProp("valid", int(mol is not None))
                if mol is not None:
                    record.SetProp("smiles", smiles(mol))
                writer.write(record)
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def draw(mols, path, n: int = 12, per_row: int = 4) -> Path | None:
    """A PNG grid of the first n valid molecules (2-D depictions, SMILES as legends).

    mols: RDKit Mols (None skipped) or states (batch, N_MAX, 3 + K). Needs Pillow; without it
    a warning says so and nothing is written (returns None).
    """
    _, Chem, _ = _rdkit()
    n = positive_int(n, "n")
    per_row = positive_int(per_row, "per_row")
    try:
        import PIL  # noqa: F401  (MolsToGridImage renders through Pillow)
    except ImportError:
        warnings.warn(f"draw: Pillow is not installed, so {str(path)!r} was not written; pip install pillow",
                      stacklevel=2)
        return None
    from rdkit.Chem import Draw
    shown = []
    for mol in _mols(mols):
        m = _sanitized(mol)
        if m is not None:
            m = Chem.RemoveHs(m)
            m.RemoveAllConformers()    # depict in 2-D rather than project the 3-D coordinates
            shown.append(m)
        if len(shown) == n:
            break
    if not shown:
        raise ValueError("draw: none of the molecules is valid, nothing to draw")
    img = Draw.MolsToGridImage(shown, molsPerRow=per_row, subImgSize=(250, 200),
                               legends=[smiles(m) for m in shown], returnPNG=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(str(path))
    return path


# --- the generative model --------------------------------------------------------------------

def network(hidden: int = 64, layers: int = 4):
    """The velocity network of the design task: SE3Velocity over N_MAX nodes and K type channels
    (coordinates SE(3)- but not reflection-equivariant, so chirality can be learned)."""
    from ..models.se3 import SE3Velocity
    return SE3Velocity(n_nodes=N_MAX, n_types=K, hidden=hidden, layers=layers)


def pretrain(iters: int = 40000, *, data: DesignData | None = None, hidden: int = 64, layers: int = 4,
             batch_size: int = 64, lr: float = 1e-3, lr_warmup: int = 100, coupling: str = "equivariant",
             seed: int = 0, **kwargs):
    """A base FlowModel of molecules: conditional flow matching of `network(hidden, layers)` on
    data.train (default: load_dataset()), by tilt.pretrain. coupling "equivariant" (default)
    aligns each noise draw to its molecule by a node permutation and a proper rotation
    (couplings.equivariant_pairing; SciPy, which [mol] installs); "independent" does not.
    kwargs: other pretrain options (out, resume, progress, report_to, ema, device, ...). Returns
    the EMA model; its samples are states (n, N_MAX, 3 + K) for decode / evaluate / to_sdf. The
    run's metrics.json holds no energy distance (n_eval=0: in this space it says little, and
    evaluate() says more). About 40 min on one CPU thread at the defaults."""
    from ..methods.pretrain import pretrain as flow_matching
    data = load_dataset() if data is None else data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = network(hidden, layers)
    return flow_matching(data.train, iters, network=net, batch_size=batch_size, lr=lr, lr_warmup=lr_warmup,
                         coupling=coupling, seed=seed, **{"n_eval": 0, **kwargs})


@torch.no_grad()
def sample(model, n: int, steps: int = 50, seed: int = 0, sde: bool = False) -> torch.Tensor:
    """n states (n, N_MAX, 3 + K) from `model` (ODE by Heun, or the memoryless SDE), on the CPU."""
    x = model.sample(positive_int(n, "n"), steps=steps, seed=seed, sde=sde)
    return x.reshape(n, N_MAX, 3 + K).float().cpu()
