"""Conformer ensembles of one molecule, with RDKit force-field rewards and quality checks.

    task = conformers("CCO", n=256, seed=0)       # ETKDG + MMFF94 relaxation, cached on disk
    task.data                                      # (n, atoms * 3) float32, mean-free, Å
    r = task.reward("mmff")                        # r(x) = −E_MMFF94(x) in kcal/mol, with ∇_x r
    task.validity(x); task.diversity(x); task.write_sdf(x, "out.sdf")

Coordinates carry explicit hydrogens, in the atom order of `task.mol`, and are centred on the
unweighted mean of the atoms (the mean-free subspace an E(3)-equivariant flow runs in).
RDKit molecules are the exchange type: `task.to_mol(x)` gives one Mol with a conformer per
sample. RDKit is an optional dependency (`pip install 'tiltflow[mol]'`), imported on first use.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import validation

CACHE_VERSION = 1     # bump when the generation recipe changes, so old caches are not reused
# Validity tolerances for angles and planarity: a margin times the largest deviation the relaxed
# reference ensemble shows, but never below a floor, since MMFF minima of rigid groups deviate by
# almost nothing (a planar ring: ~1e-3 Å) and a tolerance of a few times that rejects any sample.
TOL_MARGIN = 2.0
ANGLE_FLOOR_DEG = 10.0
PLANAR_FLOOR = 0.1    # Å, largest distance of a group's atom from its best-fit plane
MAX_AUTOMORPHISMS = 1000   # symmetry-aware RMSD minimises over at most this many atom permutations


def _rdkit():
    try:
        import rdkit
        from rdkit import Chem
        from rdkit.Chem import AllChem
    except ImportError as e:  # pragma: no cover - exercised only without rdkit
        raise ImportError("tiltflow.tasks.molecules needs RDKit: pip install 'tiltflow[mol]'") from e
    return rdkit, Chem, AllChem


def nci_smiles(index: int = 0) -> str:
    """SMILES number `index` of the NCI set that RDKit ships (Data/NCI/first_5K.smi; no download)."""
    _, Chem, _ = _rdkit()
    from rdkit import RDConfig
    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    lines = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(lines):
        raise ValueError(f"index must be an integer in [0, {len(lines)}), got {index!r}")
    return lines[index]


def _read_molecule(source):
    """An RDKit Mol (no hydrogens added yet) from a Mol, a SMILES string or a .smi/.sdf/.mol file."""
    _, Chem, _ = _rdkit()
    if isinstance(source, Chem.Mol):
        return Chem.Mol(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"smiles_or_path must be a SMILES string, a file path or an RDKit Mol, "
                         f"got {type(source).__name__}")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".sdf", ".mol", ".smi", ".smiles", ".txt"):
        if not path.is_file():
            raise ValueError(f"molecule file {str(path)!r} does not exist")
        if suffix in (".sdf", ".mol"):
            mol = next(iter(Chem.SDMolSupplier(str(path), removeHs=False)), None)
        else:
            first = next((ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()), None)
            mol = Chem.MolFromSmiles(first) if first else None
        if mol is None:
            raise ValueError(f"could not read a molecule from the first entry of {str(path)!r}")
        return mol
    mol = Chem.MolFromSmiles(str(source))
    if mol is None:
        raise ValueError(f"{str(source)!r} is neither a valid SMILES string nor a .smi/.sdf/.mol file")
    return mol


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("TILTFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tiltflow")
    return Path(root) / "molecules"


@dataclass(frozen=True)
class MolGraph:
    """The molecular graph a conditional velocity network sees.

    atomic_numbers: (atoms,) int64; bonds: (n_bonds, 2) int64 atom indices; bond_orders:
    (n_bonds,) float32 (1, 1.5 aromatic, 2, 3). `types` maps each atom to an index into
    `elements` (the sorted distinct atomic numbers), for one-hot embeddings. chiral: the molecule
    has a specified tetrahedral stereocentre, so its network must be SE(3)- rather than
    E(3)-equivariant (`EGNNVelocity.from_graph` reads it; an E(3) network samples both hands).
    """

    atomic_numbers: torch.Tensor
    bonds: torch.Tensor
    bond_orders: torch.Tensor
    chiral: bool = False

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def elements(self) -> list[int]:
        return sorted(set(self.atomic_numbers.tolist()))

    @property
    def types(self) -> torch.Tensor:
        lookup = {z: i for i, z in enumerate(self.elements)}
        return torch.tensor([lookup[z] for z in self.atomic_numbers.tolist()], dtype=torch.long)


class _MMFFEnergy(torch.autograd.Function):
    """E(x) for a batch of coordinates through RDKit's MMFF94; backward uses RDKit's analytic ∇E."""

    @staticmethod
    def forward(ctx, x, ff):
        pos = x.detach().to("cpu", torch.float64).numpy()
        e = np.empty(pos.shape[0])
        g = np.empty_like(pos)
        for b in range(pos.shape[0]):
            p = pos[b].tolist()
            e[b] = ff.CalcEnergy(p)
            g[b] = ff.CalcGrad(p)
        ctx.save_for_backward(torch.as_tensor(g, dtype=x.dtype, device=x.device))
        return torch.as_tensor(e, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out[:, None] * g, None


class MMFFReward:
    """r(x) = −E_MMFF94(x) / scale, E in kcal/mol; x: (batch, atoms * 3) or (batch, atoms, 3) in Å.

    Differentiable: the gradient is RDKit's analytic MMFF gradient (kcal/mol/Å). Non-bonded
    pairs are chosen once, at the reference conformer, within `nonbonded_cutoff` Å (RDKit's
    default of 100 Å keeps every pair of a small molecule).
    """

    name = "mmff"

    def __init__(self, mol, scale: float = 1.0, nonbonded_cutoff: float = 100.0):
        _, Chem, AllChem = _rdkit()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.mol, self.scale = Chem.Mol(mol), float(scale)
        props = AllChem.MMFFGetMoleculeProperties(self.mol)
        if props is None:
            raise ValueError("MMFF94 has no parameters for this molecule; use a torch reward on the "
                             "coordinates instead (e.g. task.reward('rg'))")
        self.ff = AllChem.MMFFGetMoleculeForceField(self.mol, props, nonBondedThresh=nonbonded_cutoff)
        self.n_atoms = self.mol.GetNumAtoms()

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E_MMFF94 in kcal/mol, (batch,), differentiable."""
        return _MMFFEnergy.apply(_flat_coords(x, self.n_atoms), self.ff)

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return -self.energy(x) / self.scale

    def __repr__(self) -> str:
        return f"MMFFReward(scale={self.scale})"


class RadiusOfGyration:
    """r(x) = sign · R_g(x), R_g = sqrt(mean_i |x_i − x̄|²) over atoms (Å); sign −1 rewards compactness."""

    name = "rg"

    def __init__(self, n_atoms: int, sign: float = -1.0):
        self.n_atoms, self.sign = n_atoms, float(sign)

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        c = _flat_coords(x, self.n_atoms).reshape(x.shape[0], self.n_atoms, 3)
        c = c - c.mean(dim=1, keepdim=True)
        return self.sign * c.pow(2).sum(-1).mean(-1).clamp_min(1e-12).sqrt()

    def __repr__(self) -> str:
        return f"RadiusOfGyration(sign={self.sign})"


class DistanceTarget:
    """r(x) = −Σ_k (|x_i − x_j| − d_k)²: squared deviations of atom-pair distances from targets (Å).

    pairs: [(i, j, d), ...] with atom indices i, j and target distance d > 0.
    """

    name = "distance"

    def __init__(self, n_atoms: int, pairs):
        pairs = [(int(i), int(j), float(d)) for i, j, d in pairs]
        if not pairs:
            raise ValueError("pairs must name at least one (i, j, distance) triple")
        for i, j, d in pairs:
            if not (0 <= i < n_atoms and 0 <= j < n_atoms and i != j):
                raise ValueError(f"pairs: atom indices must be distinct and in [0, {n_atoms}), got ({i}, {j})")
            if not d > 0:
                raise ValueError(f"pairs: target distance must be positive, got {d} for ({i}, {j})")
        self.n_atoms, self.pairs = n_atoms, pairs
        self._i = torch.tensor([p[0] for p in pairs])
        self._j = torch.tensor([p[1] for p in pairs])
        self._d = torch.tensor([p[2] for p in pairs])

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        c = _flat_coords(x, self.n_atoms).reshape(x.shape[0], self.n_atoms, 3)
        dist = (c[:, self._i] - c[:, self._j]).pow(2).sum(-1).clamp_min(1e-12).sqrt()   # (batch, K)
        return -(dist - self._d.to(dist)).pow(2).sum(-1)

    def __repr__(self) -> str:
        return f"DistanceTarget(pairs={self.pairs})"


def dihedral(c: torch.Tensor, i: int, j: int, k: int, l: int) -> torch.Tensor:
    """Dihedral angle φ ∈ (−π, π] of atoms i-j-k-l; c: (batch, atoms, 3) -> (batch,).

    φ = atan2(|b₂|·b₁·(n₂), n₁·n₂) with b₁ = x_j − x_i, b₂ = x_k − x_j, b₃ = x_l − x_k,
    n₁ = b₁ × b₂, n₂ = b₂ × b₃ (the IUPAC sign convention, as RDKit's GetDihedralRad).
    """
    b1, b2, b3 = c[:, j] - c[:, i], c[:, k] - c[:, j], c[:, l] - c[:, k]
    n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
    y = (b2.norm(dim=-1, keepdim=True) * b1 * n2).sum(-1)
    return torch.atan2(y, (n1 * n2).sum(-1))


class TorsionTarget:
    """r(x) = Σ_k [cos(φ_k(x) − φ*_k) − 1]: 0 at the target torsions, smooth and 2π-periodic.

    torsions: [(i, j, k, l, φ* in degrees), ...].
    """

    name = "torsion"

    def __init__(self, n_atoms: int, torsions):
        torsions = [(int(a), int(b), int(c), int(d), float(phi)) for a, b, c, d, phi in torsions]
        if not torsions:
            raise ValueError("torsions must name at least one (i, j, k, l, degrees) tuple")
        for t in torsions:
            if len(set(t[:4])) != 4 or not all(0 <= a < n_atoms for a in t[:4]):
                raise ValueError(f"torsions: four distinct atom indices in [0, {n_atoms}) needed, got {t[:4]}")
        self.n_atoms, self.torsions = n_atoms, torsions

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        c = _flat_coords(x, self.n_atoms).reshape(x.shape[0], self.n_atoms, 3)
        out = torch.zeros(x.shape[0], dtype=c.dtype, device=c.device)
        for i, j, k, l, phi in self.torsions:
            out = out + torch.cos(dihedral(c, i, j, k, l) - math.radians(phi)) - 1.0
        return out

    def __repr__(self) -> str:
        return f"TorsionTarget(torsions={self.torsions})"


class NoGradientReward:
    """A score computed by RDKit on each conformer, without gradients: for evaluation only.

    fn(mol) -> float receives an RDKit Mol holding one conformer. Calling it on coordinates that
    require grad (as gradient-based solvers do) raises a ValueError naming the alternatives.
    """

    def __init__(self, task: "ConformerTask", fn, name: str | None = None):
        self.task, self.fn = task, fn
        self.name = name or getattr(fn, "__name__", "rdkit score")

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            raise ValueError(
                f"reward {self.name!r} is computed by RDKit without gradients, but this solver needs "
                "∇_x r. Use a differentiable reward instead: task.reward('mmff') (−MMFF94 energy), "
                "task.reward('rg') (radius of gyration), or a reward written in torch operations on the "
                "coordinates; or keep this score for evaluation (call it under torch.no_grad()) or with a "
                "gradient-free method.")
        mols = self.task.to_mol(x)
        vals = [float(self.fn(_one_conformer(mols, i))) for i in range(x.shape[0])]
        return torch.tensor(vals, dtype=x.dtype, device=x.device)


def _one_conformer(mol, conf_id: int):
    from rdkit import Chem
    m = Chem.Mol(mol, confId=conf_id)
    return m


def _flat_coords(x, n_atoms: int) -> torch.Tensor:
    """(batch, atoms * 3) or (batch, atoms, 3) -> (batch, atoms * 3); ValueError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or math.prod(x.shape[1:]) != 3 * n_atoms or (x.ndim == 3 and x.shape[2] != 3) or x.ndim > 3:
        raise ValueError(f"x must have shape (batch, {3 * n_atoms}) or (batch, {n_atoms}, 3), "
                         f"got {tuple(x.shape)}")
    return x.reshape(x.shape[0], 3 * n_atoms)


def kabsch_rmsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RMSD after optimal rotation and translation (Kabsch); x, y: (..., atoms, 3) -> (...,).

    Proper rotations only (det +1): a mirror image is not superimposed onto its enantiomer.
    """
    x = x - x.mean(dim=-2, keepdim=True)
    y = y - y.mean(dim=-2, keepdim=True)
    h = x.transpose(-1, -2) @ y                                     # (..., 3, 3)
    u, s, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(u @ vt))
    s = torch.cat([s[..., :2], (s[..., 2] * d)[..., None]], dim=-1)
    # |x|² + |y|² − 2 Σ σ_i (with the last σ signed) is the minimal squared distance
    msd = (x.pow(2).sum((-1, -2)) + y.pow(2).sum((-1, -2)) - 2 * s.sum(-1)) / x.shape[-2]
    return msd.clamp_min(0).sqrt()


class ConformerTask:
    """Conformers of one molecule: data, graph, rewards, validity, diversity and SDF output.

    mol: RDKit Mol with explicit hydrogens (atom order = coordinate order); coords: (n, atoms, 3)
    float64 Å, mean-free; energies: (n,) MMFF94 kcal/mol of the relaxed conformers.
    """

    def __init__(self, mol, coords: np.ndarray, energies: np.ndarray, name: str = ""):
        _, Chem, _ = _rdkit()
        self.mol = Chem.Mol(mol)
        self.mol.RemoveAllConformers()
        self.coords = np.asarray(coords, dtype=np.float64)
        self.energies = np.asarray(energies, dtype=np.float64)
        self.name = name or Chem.MolToSmiles(Chem.RemoveHs(self.mol))
        self.n_atoms = self.mol.GetNumAtoms()
        self.dim = 3 * self.n_atoms
        bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in self.mol.GetBonds()]
        self._stereo = self._stereo_references()
        self.graph = MolGraph(
            atomic_numbers=torch.tensor([a.GetAtomicNum() for a in self.mol.GetAtoms()], dtype=torch.long),
            bonds=torch.tensor(bonds, dtype=torch.long).reshape(-1, 2),
            bond_orders=torch.tensor([b.GetBondTypeAsDouble() for b in self.mol.GetBonds()], dtype=torch.float32),
            chiral=self._stereo[0].shape[0] > 0,
        )
        # references for validity, from the relaxed data
        c = torch.as_tensor(self.coords)
        i, j = self.graph.bonds[:, 0], self.graph.bonds[:, 1]
        self.ref_bond_lengths = (c[:, i] - c[:, j]).norm(dim=-1).mean(0)          # (n_bonds,)
        topo = torch.as_tensor(Chem.GetDistanceMatrix(self.mol))
        iu = torch.triu_indices(self.n_atoms, self.n_atoms, offset=1)
        far = topo[iu[0], iu[1]] >= 3                  # 1-2 and 1-3 pairs are fixed by bonds and angles
        self._clash_pairs = iu[:, far]
        pt = Chem.GetPeriodicTable()
        rvdw = torch.tensor([pt.GetRvdw(z) for z in self.graph.atomic_numbers.tolist()], dtype=torch.float64)
        self._clash_vdw = rvdw[self._clash_pairs[0]] + rvdw[self._clash_pairs[1]]
        # bond angles and planar groups, with the largest deviation from the mean the data shows
        self._angles = _angle_triples(self.mol)                                     # (n_angles, 3)
        ang = _bond_angles(c, self._angles)                                         # (n, n_angles) rad
        self.ref_angles = ang.mean(0)
        self._angle_dev = (ang - self.ref_angles).abs().amax(0)
        self._planar = _planar_groups(self.mol)                                     # [(kind, atoms)]
        self._planar_dev = torch.stack([_plane_deviation(c, g) for _, g in self._planar], 1).amax(0) \
            if self._planar else torch.zeros(0, dtype=torch.float64)
        self._automorphisms = {}
        self._mmff = None

    # --- data ------------------------------------------------------------------------------
    @property
    def data(self) -> torch.Tensor:
        """(n, atoms * 3) float32, Å, mean-free."""
        return torch.as_tensor(self.coords, dtype=torch.float32).reshape(len(self.coords), self.dim)

    def __len__(self) -> int:
        return len(self.coords)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n conformers drawn with replacement: (n, atoms * 3)."""
        dev = None if generator is None else generator.device     # drawn on the generator's device
        idx = torch.randint(len(self.coords), (n,), generator=generator, device=dev)
        return self.data.to(dev)[idx]

    def _coords(self, x) -> torch.Tensor:
        return _flat_coords(x, self.n_atoms).detach().to("cpu", torch.float64).reshape(-1, self.n_atoms, 3)

    # --- rewards ---------------------------------------------------------------------------
    def reward(self, name: str = "mmff", **kwargs):
        """A reward callable r(x, cond=None) -> (batch,).

        "mmff": −MMFF94 energy in kcal/mol (kwargs: scale, nonbonded_cutoff), differentiable;
        "rg": −radius of gyration in Å (kwargs: sign=+1 rewards extended conformers);
        "distance": −Σ (d_ij − d*)² (kwargs: pairs=[(i, j, d*), ...], Å);
        "torsion": Σ [cos(φ − φ*) − 1] (kwargs: torsions=[(i, j, k, l, φ* degrees), ...]).
        For an RDKit score without gradients use `task.rdkit_reward(fn)` (evaluation only).
        """
        if name == "mmff":
            return MMFFReward(_with_conformer(self.mol, self.coords[0]), **kwargs)
        if name == "rg":
            return RadiusOfGyration(self.n_atoms, **kwargs)
        if name == "distance":
            return DistanceTarget(self.n_atoms, **kwargs)
        if name == "torsion":
            return TorsionTarget(self.n_atoms, **kwargs)
        raise ValueError(f"unknown molecular reward {name!r}; known: 'mmff', 'rg', 'distance', 'torsion' "
                         "(differentiable); "
                         "wrap an RDKit score without gradients with task.rdkit_reward(fn)")

    def rdkit_reward(self, fn, name: str | None = None) -> NoGradientReward:
        """Wrap fn(mol with one conformer) -> float as a reward for evaluation (no gradients)."""
        if not callable(fn):
            raise ValueError(f"fn must be callable as fn(mol) -> float, got {type(fn).__name__}")
        return NoGradientReward(self, fn, name)

    @torch.no_grad()
    def energy(self, x) -> torch.Tensor:
        """MMFF94 energies in kcal/mol: x (batch, atoms * 3) -> (batch,) float64."""
        if self._mmff is None:
            self._mmff = self.reward("mmff")
        return self._mmff.energy(self._coords(x))

    # --- checks ----------------------------------------------------------------------------
    def _stereo_references(self):
        """Tetrahedral centres and double bonds with stereo in the molecule, and their reference signs."""
        from rdkit import Chem
        c = torch.as_tensor(self.coords[0])
        centres, bonds = [], []
        for a in self.mol.GetAtoms():
            if a.GetChiralTag() != Chem.ChiralType.CHI_UNSPECIFIED and a.GetDegree() >= 3:
                nb = [n.GetIdx() for n in a.GetNeighbors()][:3]
                centres.append([a.GetIdx(), *nb])
        for b in self.mol.GetBonds():
            if b.GetBondType() == Chem.BondType.DOUBLE and b.GetStereo() != Chem.BondStereo.STEREONONE:
                s = list(b.GetStereoAtoms())
                if len(s) == 2:
                    bonds.append([s[0], b.GetBeginAtomIdx(), b.GetEndAtomIdx(), s[1]])
        centres = torch.tensor(centres, dtype=torch.long).reshape(-1, 4)
        bonds = torch.tensor(bonds, dtype=torch.long).reshape(-1, 4)
        return centres, bonds, _chirality(c[None], centres)[0], _cis(c[None], bonds)[0]

    def check(self, x, bond_tol: float = 0.15, clash_scale: float = 0.7, margin: float = TOL_MARGIN,
              angle_floor: float = ANGLE_FLOOR_DEG, planar_floor: float = PLANAR_FLOOR) -> dict:
        """Per-sample quality flags, each (batch,) bool.

        bonds: every bond length within a relative `bond_tol` of its mean in the relaxed data;
        angles: every bond angle i–j–k within max(margin · δ, angle_floor degrees) of its data
        mean, δ its largest deviation from that mean in the data; planarity: every sp2 centre with
        its three neighbours, aromatic ring and amide group (O=C–N with both ends' substituents) no
        farther than max(margin · δ, planar_floor Å) from its best-fit plane, δ as for angles;
        clashes: no pair of atoms three or more bonds apart closer than `clash_scale` times the
        sum of their van der Waals radii; stereo: every specified tetrahedral centre and E/Z
        double bond has the handedness of the reference conformer; valid: all five.
        """
        if not 0 < bond_tol < 1:
            raise ValueError(f"bond_tol must be in (0, 1), got {bond_tol!r}")
        if not 0 < clash_scale:
            raise ValueError(f"clash_scale must be positive, got {clash_scale!r}")
        validation.in_interval(margin, "margin", 1.0, math.inf, lo_open=False, hi_open=True)
        validation.non_negative(angle_floor, "angle_floor")
        validation.non_negative(planar_floor, "planar_floor")
        c = self._coords(x)
        i, j = self.graph.bonds[:, 0], self.graph.bonds[:, 1]
        dev = ((c[:, i] - c[:, j]).norm(dim=-1) / self.ref_bond_lengths - 1).abs()
        bonds_ok = (dev <= bond_tol).all(dim=1)
        angle_tol = (margin * self._angle_dev).clamp_min(math.radians(angle_floor))
        angles_ok = ((_bond_angles(c, self._angles) - self.ref_angles).abs() <= angle_tol).all(dim=1)
        planar_ok = torch.ones(c.shape[0], dtype=torch.bool)
        for (_, g), d in zip(self._planar, self._planar_dev.tolist()):
            planar_ok &= _plane_deviation(c, g) <= max(margin * d, planar_floor)
        p, q = self._clash_pairs
        clash_ok = ((c[:, p] - c[:, q]).norm(dim=-1) >= clash_scale * self._clash_vdw).all(dim=1)
        centres, dbonds, chi_ref, cis_ref = self._stereo
        stereo_ok = (_chirality(c, centres) == chi_ref).all(dim=1) & (_cis(c, dbonds) == cis_ref).all(dim=1)
        return {"bonds": bonds_ok, "angles": angles_ok, "planarity": planar_ok, "clashes": clash_ok,
                "stereo": stereo_ok, "valid": bonds_ok & angles_ok & planar_ok & clash_ok & stereo_ok}

    def validity(self, x, **kwargs) -> torch.Tensor:
        """(batch,) bool: bonds, angles, planarity, clashes and stereo all pass (see `check`)."""
        return self.check(x, **kwargs)["valid"]

    def handedness(self, x) -> torch.Tensor:
        """(batch,) bool: every specified tetrahedral centre has the reference conformer's handedness
        (the sign of the signed volume of its first three neighbours); all True without centres."""
        centres, _, chi_ref, _ = self._stereo
        return (_chirality(self._coords(x), centres) == chi_ref).all(dim=1)

    def mirror_to_reference(self, x) -> torch.Tensor:
        """x with every sample that is the reference's enantiomer (all specified centres inverted)
        replaced by its mirror image −x, the same conformer of the reference's handedness.

        Why it is sound: the prior, the MMFF94 energy and an E(3)-equivariant flow are all mirror
        symmetric, so under the learned density q an enantiomer and its mirror image are equally
        likely (q(−x) = q(x)); drawing from q and mirroring the wrong-handed draws samples q
        restricted to the reference's handedness (renormalised), which is the data's law when q
        fits it up to reflection. Samples with only some centres inverted (a diastereomer) are
        left as they are. x: (batch, atoms * 3) mean-free -> the same shape.
        """
        centres, _, chi_ref, _ = self._stereo
        c = self._coords(x)
        if centres.shape[0] == 0:
            return x
        chi = _chirality(c, centres)
        flip = (chi != chi_ref.to(chi.device)).all(dim=1)
        return torch.where(flip.reshape(-1, *[1] * (x.ndim - 1)).to(x.device), -x, x)

    # --- RMSD, diversity, coverage -----------------------------------------------------------
    def automorphisms(self, heavy_only: bool = False) -> torch.Tensor:
        """(A, m) atom permutations p that map the molecular graph onto itself (element and bond
        type kept; identity first), over the m heavy atoms (heavy_only, in index order) or all
        atoms; at most MAX_AUTOMORPHISMS of them."""
        if heavy_only not in self._automorphisms:
            from rdkit import Chem
            m = Chem.RWMol(self.mol)
            if heavy_only:      # removing from the end keeps the heavy atoms in index order
                for a in sorted((a.GetIdx() for a in m.GetAtoms() if a.GetAtomicNum() == 1), reverse=True):
                    m.RemoveAtom(a)
            m = m.GetMol()
            matches = m.GetSubstructMatches(m, uniquify=False, useChirality=False, maxMatches=MAX_AUTOMORPHISMS)
            ident = tuple(range(m.GetNumAtoms()))
            perms = [ident] + [p for p in matches if p != ident]
            self._automorphisms[heavy_only] = torch.tensor(perms[:MAX_AUTOMORPHISMS], dtype=torch.long)
        return self._automorphisms[heavy_only]

    def rmsd(self, x, y=None, heavy_only: bool = False, symmetry: bool = True) -> torch.Tensor:
        """(batch_x, batch_y) RMSD in Å after optimal proper rotation and translation (Kabsch),
        minimised over the molecule's automorphisms (symmetry=True: equivalent atoms, e.g. the
        hydrogens of a methyl group, may swap; symmetry=False matches atoms by index).
        x: (batch_x, atoms * 3); y: (batch_y, atoms * 3), default x. heavy_only: hydrogens left out.
        A mirror image is not superimposed on its enantiomer."""
        cx = self._coords(x)
        cy = cx if y is None else self._coords(y)
        if heavy_only:
            heavy = self.graph.atomic_numbers > 1
            cx, cy = cx[:, heavy], cy[:, heavy]
        perms = self.automorphisms(heavy_only) if symmetry else torch.arange(cx.shape[1])[None]
        bx, by, a = cx.shape[0], cy.shape[0], perms.shape[0]
        ii, jj = torch.meshgrid(torch.arange(bx), torch.arange(by), indexing="ij")
        ii, jj = ii.flatten(), jj.flatten()
        out = torch.empty(bx * by, dtype=torch.float64)
        chunk = max(1, 2_000_000 // (a * cx.shape[1]))      # pairs per batch: bounded memory
        for s in range(0, len(ii), chunk):
            u, w = cx[ii[s:s + chunk]][:, None], cy[jj[s:s + chunk]][:, perms]      # (P, 1|A, m, 3)
            out[s:s + chunk] = kabsch_rmsd(u.expand_as(w), w).amin(dim=1)
        return out.reshape(bx, by)

    def pairwise_rmsd(self, x, heavy_only: bool = False, symmetry: bool = True) -> torch.Tensor:
        """(batch, batch) RMSD in Å between samples, zero diagonal (see `rmsd`)."""
        out = self.rmsd(x, None, heavy_only, symmetry)
        out.fill_diagonal_(0.0)
        return torch.minimum(out, out.T)     # equal up to SVD rounding; exactly symmetric

    def diversity(self, x, heavy_only: bool = False, symmetry: bool = True) -> float:
        """Mean pairwise RMSD in Å over distinct pairs of samples (needs batch ≥ 2; see `rmsd`)."""
        c = self._coords(x)
        if c.shape[0] < 2:
            raise ValueError(f"diversity needs at least 2 samples, got {c.shape[0]}")
        m = self.pairwise_rmsd(c, heavy_only, symmetry)
        b = c.shape[0]
        return float(m.sum() / (b * (b - 1)))

    def cov_mat(self, x, delta: float = 0.5, reference=None, heavy_only: bool = True) -> dict:
        """Coverage and matching of samples x against a reference ensemble (as GeoDiff, Xu et al.
        2022, and torsional diffusion, Jing et al. 2022, report them), by symmetry-aware RMSD D (`rmsd`):

            COV-R = |{r : min_g D(g, r) ≤ δ}| / |S_r|,   MAT-R = mean_r min_g D(g, r)   (recall)
            COV-P = |{g : min_r D(g, r) ≤ δ}| / |S_g|,   MAT-P = mean_g min_r D(g, r)   (precision)

        x: (batch, atoms * 3); reference: (n_ref, atoms * 3), default the task's data; delta: δ in Å
        (0.5 Å heavy-atom RMSD as for GEOM-QM9). Returns floats cov_r, mat_r, cov_p, mat_p.
        """
        validation.positive(delta, "delta")
        ref = torch.as_tensor(self.coords) if reference is None else reference
        d = self.rmsd(x, ref, heavy_only=heavy_only)                       # (batch, n_ref)
        best_r, best_g = d.amin(0), d.amin(1)
        return {"cov_r": float((best_r <= delta).double().mean()), "mat_r": float(best_r.mean()),
                "cov_p": float((best_g <= delta).double().mean()), "mat_p": float(best_g.mean())}

    def evaluate(self, x) -> dict:
        """Energy quantiles, left/right CVaR of −E at 5/10/20 %, validity rates (`check`), the share
        with the reference handedness (None without stereocentres), symmetry-aware RMSD diversity
        and COV/MAT against the data (heavy atoms, δ = 0.5 Å; `cov_mat`).

        Samples with NaN or inf coordinates are counted in `n_nonfinite` and count as invalid;
        the other statistics are over the finite samples.
        """
        c = self._coords(x)
        finite = torch.isfinite(c).all(dim=(1, 2))
        n_all = c.shape[0]
        c = c[finite]
        if c.shape[0] == 0:
            raise ValueError(f"all {n_all} samples have NaN or inf coordinates")
        e = self.energy(c).numpy()
        flags = {k: v.double().sum() / n_all for k, v in self.check(c).items()}
        r = np.sort(-e)
        out = {"n": n_all, "n_nonfinite": int(n_all - len(e)), "energy_mean": float(e.mean()),
               **{f"energy_q{int(q * 100):02d}": float(np.quantile(e, q)) for q in (0.05, 0.5, 0.95)}}
        for b in (0.05, 0.1, 0.2):
            k = max(1, int(math.ceil(b * len(r))))
            out[f"reward_cvar_left_{b}"] = float(r[:k].mean())
            out[f"reward_cvar_right_{b}"] = float(r[-k:].mean())
        out.update({f"rate_{k}": float(v) for k, v in flags.items()})
        out["handedness_share"] = float(self.handedness(c).double().mean()) if self.graph.chiral else None
        out["diversity_rmsd"] = self.diversity(c) if len(e) > 1 else float("nan")
        out.update(self.cov_mat(c))
        return out

    # --- RDKit exchange --------------------------------------------------------------------
    def to_mol(self, x):
        """One RDKit Mol (explicit H) with a conformer per sample; x: (batch, atoms * 3) in Å."""
        from rdkit import Chem
        from rdkit.Geometry import Point3D
        c = self._coords(x).numpy()
        mol = Chem.Mol(self.mol)
        mol.RemoveAllConformers()
        for b in range(c.shape[0]):
            conf = Chem.Conformer(self.n_atoms)
            for a in range(self.n_atoms):
                conf.SetAtomPosition(a, Point3D(*c[b, a]))
            conf.SetId(b)
            mol.AddConformer(conf, assignId=False)
        return mol

    def write_sdf(self, x, path) -> Path:
        """Write each sample as an SDF record with its MMFF94 energy and validity flags."""
        from rdkit import Chem
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mol = self.to_mol(x)
        e = self.energy(x).tolist()
        flags = {k: v.tolist() for k, v in self.check(x).items()}
        tmp = path.with_name(path.name + ".tmp")
        writer = Chem.SDWriter(str(tmp))
        try:
            for b in range(len(e)):
                m = Chem.Mol(mol, confId=b)
                m.SetProp("_Name", f"{self.name} sample {b}")
                m.SetDoubleProp("MMFF94_energy_kcal_mol", e[b])
                for k, v in flags.items():
                    m.SetIntProp(f"valid_{k}" if k != "valid" else "valid", int(v[b]))
                writer.write(m)
        finally:
            writer.close()
        os.replace(tmp, path)
        return path

    def __repr__(self) -> str:
        return f"ConformerTask({self.name!r}, conformers={len(self)}, atoms={self.n_atoms})"


def _with_conformer(mol, coords):
    """A copy of `mol` holding one conformer at `coords` (atoms, 3)."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D
    m = Chem.Mol(mol)
    m.RemoveAllConformers()
    conf = Chem.Conformer(m.GetNumAtoms())
    for a, p in enumerate(np.asarray(coords, dtype=np.float64)):
        conf.SetAtomPosition(a, Point3D(*p))
    m.AddConformer(conf, assignId=True)
    return m


def _angle_triples(mol) -> torch.Tensor:
    """(n_angles, 3) atom indices i, j, k of every bond angle i–j–k (i < k both bonded to j)."""
    triples = [(nb[a], atom.GetIdx(), nb[b]) for atom in mol.GetAtoms()
               for nb in [sorted(n.GetIdx() for n in atom.GetNeighbors())]
               for a in range(len(nb)) for b in range(a + 1, len(nb))]
    return torch.tensor(triples, dtype=torch.long).reshape(-1, 3)


def _bond_angles(c: torch.Tensor, triples: torch.Tensor) -> torch.Tensor:
    """Angles θ_ijk = atan2(|u × v|, u·v), u = x_i − x_j, v = x_k − x_j: (batch, n_angles) in radians."""
    u = c[:, triples[:, 0]] - c[:, triples[:, 1]]
    v = c[:, triples[:, 2]] - c[:, triples[:, 1]]
    return torch.atan2(torch.linalg.cross(u, v).norm(dim=-1), (u * v).sum(-1))


def _planar_groups(mol) -> list:
    """Atom groups that lie in one plane: [(kind, (m,) indices)] for each sp2 atom with three
    neighbours ("sp2": the atom and its neighbours), each aromatic ring ("aromatic") and each
    amide C(=O)–N ("amide": O, C, N and the other substituents of C and N)."""
    from rdkit import Chem
    groups = []
    for a in mol.GetAtoms():
        if a.GetHybridization() == Chem.HybridizationType.SP2 and a.GetDegree() == 3:
            groups.append(("sp2", [a.GetIdx(), *(n.GetIdx() for n in a.GetNeighbors())]))
    for ring in mol.GetRingInfo().AtomRings():
        if all(mol.GetAtomWithIdx(k).GetIsAromatic() for k in ring):
            groups.append(("aromatic", list(ring)))
    for _, c, n in mol.GetSubstructMatches(Chem.MolFromSmarts("[OX1]=[CX3]-[NX3]")):
        atoms = {c, n} | {x.GetIdx() for k in (c, n) for x in mol.GetAtomWithIdx(k).GetNeighbors()}
        groups.append(("amide", sorted(atoms)))
    return [(kind, torch.tensor(g, dtype=torch.long)) for kind, g in groups]


def _plane_deviation(c: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Largest distance in Å of the group's atoms from their least-squares plane: (batch,).

    The plane's normal is the eigenvector of the smallest eigenvalue of the group's covariance."""
    p = c[:, group]
    p = p - p.mean(dim=1, keepdim=True)
    normal = torch.linalg.eigh(p.transpose(1, 2) @ p).eigenvectors[..., 0]          # (batch, 3)
    return (p @ normal[..., None]).abs().amax(dim=(1, 2))


def _chirality(c: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Sign of the signed volume (n1 − c)·((n2 − c) × (n3 − c)) per centre: (batch, n_centres) bool."""
    if centres.shape[0] == 0:
        return torch.zeros(c.shape[0], 0, dtype=torch.bool)
    o = c[:, centres[:, 0]]
    v = torch.linalg.det(torch.stack([c[:, centres[:, k]] - o for k in (1, 2, 3)], dim=-2))
    return v > 0


def _cis(c: torch.Tensor, quads: torch.Tensor) -> torch.Tensor:
    """Whether the substituents a, d of a–b=c–d are on the same side (|dihedral| < 90°): (batch, n) bool."""
    if quads.shape[0] == 0:
        return torch.zeros(c.shape[0], 0, dtype=torch.bool)
    a, b, cc, d = (c[:, quads[:, k]] for k in range(4))
    axis = cc - b
    u = torch.linalg.cross(a - b, axis)
    w = torch.linalg.cross(d - cc, axis)
    return (u * w).sum(-1) > 0


def conformers(smiles_or_path, n: int = 256, seed: int = 0, *, max_iters: int = 2000,
               cache_dir=None, use_cache: bool = True) -> ConformerTask:
    """n conformers of one molecule by ETKDGv3 embedding and MMFF94 relaxation, cached on disk.

    smiles_or_path: SMILES, an RDKit Mol, or a .smi/.sdf/.mol file (its first molecule).
    Hydrogens are added explicitly; coordinates are centred (mean-free). The cache is an .npz
    file (no pickle) under `cache_dir` (default $TILTFLOW_CACHE/molecules or
    ~/.cache/tiltflow/molecules), keyed by the molecule, n, seed, max_iters and the RDKit version.
    """
    rdkit, Chem, AllChem = _rdkit()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**31 - 1), got {seed!r}")
    mol = Chem.AddHs(_read_molecule(smiles_or_path), addCoords=False)
    mol.RemoveAllConformers()
    # RDKit's JSON keeps atom order, explicit H and stereo flags exactly, unlike a SMILES round trip
    mol_json = Chem.MolToJSON(mol)
    key = hashlib.sha256(f"{CACHE_VERSION}|{rdkit.__version__}|{n}|{seed}|{max_iters}|{mol_json}".encode()).hexdigest()[:16]
    path = _cache_dir(cache_dir) / f"{key}.npz"
    if use_cache and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            cached = Chem.JSONToMols(str(z["mol_json"]))[0]
            Chem.SanitizeMol(cached)     # JSON leaves ring information unset; MMFF typing needs it
            return ConformerTask(cached, z["coords"], z["energies"], str(z["name"]))

    params = AllChem.ETKDGv3()
    params.randomSeed = seed + 1   # RDKit's randomSeed 0 repeats one conformer n times
    ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=n, params=params))
    if len(ids) < n:
        raise ValueError(f"ETKDG embedded only {len(ids)} of {n} conformers of "
                         f"{Chem.MolToSmiles(Chem.RemoveHs(mol))!r}; check the structure or lower n")
    res = AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=max_iters)
    if not res:
        raise ValueError("MMFF94 has no parameters for this molecule; conformers need MMFF relaxation")
    energies = np.array([e for _, e in res], dtype=np.float64)
    coords = np.stack([mol.GetConformer(i).GetPositions() for i in ids])
    coords -= coords.mean(axis=1, keepdims=True)
    name = Chem.MolToSmiles(Chem.RemoveHs(mol))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, coords=coords, energies=energies, mol_json=np.array(mol_json), name=np.array(name))
        os.replace(tmp, path)
    return ConformerTask(mol, coords, energies, name)


# tilt.tasks.molecules.design: de novo molecules (types and coordinates), the same module as
# tilt.tasks.design; imported last because it builds on this module's RDKit helpers
from . import design  # noqa: E402
