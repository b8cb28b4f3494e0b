"""Differentiable rewards of de novo molecule states: a learned property and the MMFF94 energy.

    predictor, report = train_predictor(load_dataset(), "dipole")   # report: held-out MAE, R², ...
    predictor, report = cached_predictor("dipole")     # a 4-seed PredictorEnsemble, trained once, cached
    r = PropertyReward(predictor)          # r(x) = predictor(x), ∇ wrt coordinates and type channels
    r = EnergyReward(clip=100.0)           # r(x) = −E_MMFF94(decode(x)), ∇ wrt present coordinates
    save_predictor(predictor, path, report); load_predictor(path)     # safetensors, no pickle

States are design.py's: x (batch, N_MAX, 3 + K), one node per heavy atom, coordinates in Å then
TYPE_SCALE·one-hot type channels (element and attached hydrogens; "none" marks an absent node).
The property labels are computed by RDKit on the data (Gasteiger-charge dipole, Crippen logP);
the predictor is the differentiable stand-in the fine-tuning solvers need, with its held-out
error reported next to it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..training import Trainer, cosine
from ..validation import finite, non_negative, one_of, positive, positive_int
from .design import K, N_MAX, TYPE_SCALE, TYPES
from .molecules import _cache_dir, _MMFFEnergy, _rdkit

__all__ = [
    "INVALID_ENERGY",
    "PROPERTIES",
    "EnergyReward",
    "PredictorEnsemble",
    "PropertyPredictor",
    "PropertyReward",
    "cached_predictor",
    "fit_predictor",
    "load_predictor",
    "property_labels",
    "save_predictor",
    "train_predictor",
]

FORMAT = "tiltflow-property-predictor-1"
PROPERTIES = ("dipole", "logp", "qed")
READOUTS = ("dipole", "sum")
# the energy (kcal/mol) charged to a state that does not decode or that MMFF94 cannot type: far
# above relaxed small molecules (about −50 … +100) and clashing but decodable ones (10²–10³)
INVALID_ENERGY = 1000.0


def _states(x, name: str = "x") -> torch.Tensor:
    """x as (batch, N_MAX, 3 + K); a flat (batch, N_MAX·(3 + K)) is reshaped; ValueError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (batch, {N_MAX}, {3 + K}), "
                         f"got {type(x).__name__}")
    if x.ndim == 2 and x.shape[1] == N_MAX * (3 + K):
        x = x.reshape(x.shape[0], N_MAX, 3 + K)
    if x.ndim != 3 or tuple(x.shape[1:]) != (N_MAX, 3 + K):
        raise ValueError(f"{name} must have shape (batch, {N_MAX}, {3 + K}) (nodes, 3 coordinates + {K} type "
                         f"channels {TYPES}) or (batch, {N_MAX * (3 + K)}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


# --- the predictor ----------------------------------------------------------------------------

class PropertyPredictor(nn.Module):
    """An E(3)-invariant network of a state: x (batch, N_MAX, 3 + K) -> (batch,) property.

    Continuous-filter message passing (SchNet) over all N_MAX nodes, absent ones included (their
    "none" channel tells the network), fully connected: node features start from the type
    channels; layer l adds m_i = Σ_{j≠i} W_l·rbf(d_ij) ⊙ V_l h_j (a filter linear in rbf, n_rbf
    Gaussians of the distance d_ij on [0, cutoff] Å) through a residual MLP. Only distances and
    types enter, so the output is invariant to rotations, reflections, translations and node
    permutations.

    readout "sum": y = mean + std · Σ_i f(h_i), for additive properties (Crippen logP is a sum of
    atom contributions). readout "dipole": learned partial charges q_i = f(h_i) − mean_j f(h_j)
    (neutral, so translation invariant) and y = std · |Σ_i q_i x_i|, the form of the Gasteiger
    dipole.
    `mean`, `std`: the training labels' statistics (buffers, saved with the weights).
    """

    def __init__(self, hidden: int = 64, layers: int = 4, n_rbf: int = 24, cutoff: float = 10.0,
                 readout: str = "dipole", property: str = "dipole"):
        super().__init__()
        self.hidden, self.layers = positive_int(hidden, "hidden"), positive_int(layers, "layers")
        self.n_rbf, self.cutoff = positive_int(n_rbf, "n_rbf", 2), positive(cutoff, "cutoff")
        self.readout, self.property = one_of(readout, "readout", READOUTS), str(property)
        self.embed = nn.Linear(K, hidden)
        self.filters = nn.ModuleList(nn.Linear(n_rbf, hidden, bias=False) for _ in range(layers))
        self.values = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))
        self.updates = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("centres", torch.linspace(0.0, self.cutoff, n_rbf))
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))
        self.gamma = 0.5 / float(self.centres[1] - self.centres[0]) ** 2   # Gaussians one spacing wide

    def config(self) -> dict:
        return {"hidden": self.hidden, "layers": self.layers, "n_rbf": self.n_rbf, "cutoff": self.cutoff,
                "readout": self.readout, "property": self.property}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, N_MAX, 3 + K) (or flat) -> (batch,)."""
        x = _states(x)
        pos, types = x[..., :3], x[..., 3:] / TYPE_SCALE
        diff = pos[:, :, None] - pos[:, None, :]
        # the epsilon keeps ∇d finite where two nodes coincide (absent nodes all sit at the origin)
        d = (diff.pow(2).sum(-1) + 1e-8).sqrt()                                # (batch, N, N)
        rbf = torch.exp(-self.gamma * (d[..., None] - self.centres).pow(2))    # (batch, N, N, n_rbf)
        off_diag = 1.0 - torch.eye(N_MAX, dtype=x.dtype, device=x.device)
        rbf = rbf * off_diag[:, :, None]
        # m_ih = Σ_j (Σ_k rbf_ijk W_hk) v_jh = Σ_k W_hk (Σ_j rbf_ijk v_jh): contracting j first is one
        # bmm per layer and never builds the (batch, N, N, hidden) filter tensor
        rbf_t = rbf.transpose(2, 3).reshape(x.shape[0], N_MAX * self.n_rbf, N_MAX)
        h = self.embed(types)
        for filt, value, update in zip(self.filters, self.values, self.updates):
            t = torch.bmm(rbf_t, value(h)).view(x.shape[0], N_MAX, self.n_rbf, self.hidden)
            m = (t * filt.weight.T).sum(2) / math.sqrt(N_MAX)
            h = h + update(torch.cat([h, m], dim=-1))
        f = self.head(h)[..., 0]                                               # (batch, N)
        if self.readout == "sum":
            return self.mean + self.std * f.sum(-1)
        q = f - f.mean(-1, keepdim=True)
        mu = (q[..., None] * pos).sum(1)                                       # (batch, 3)
        return (mu.pow(2).sum(-1) * self.std ** 2 + 1e-8).sqrt()


class PredictorEnsemble(nn.Module):
    """The mean of PropertyPredictors of one property trained from different seeds:
    x (batch, N_MAX, 3 + K) -> (batch,). Averaging removes most of the seed-to-seed spread of
    a predictor's held-out error, which is large on a few hundred training molecules."""

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, PropertyPredictor) for m in members):
            raise ValueError("members must be a non-empty list of PropertyPredictors")
        if len({json.dumps(m.config(), sort_keys=True) for m in members}) != 1:
            raise ValueError("members must share one architecture and property (config())")
        self.members = nn.ModuleList(members)
        self.property, self.readout = members[0].property, members[0].readout

    def config(self) -> dict:
        return {**self.members[0].config(), "members": len(self.members)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, N_MAX, 3 + K) (or flat) -> (batch,)."""
        return torch.stack([m(x) for m in self.members]).mean(0)


PREDICTORS = (PropertyPredictor, PredictorEnsemble)


def save_predictor(predictor: PropertyPredictor | PredictorEnsemble, path, report: dict | None = None) -> Path:
    """Write weights, architecture and (optionally) the training report to one safetensors file."""
    from safetensors.torch import save_file
    if not isinstance(predictor, PREDICTORS):
        raise ValueError(f"predictor must be a PropertyPredictor or PredictorEnsemble, got {type(predictor).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in predictor.state_dict().items()}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "config": json.dumps(predictor.config()),
                                           "report": json.dumps(report or {})})
    os.replace(tmp, path)
    return path


def load_predictor(path, device=None) -> PropertyPredictor | PredictorEnsemble:
    """Rebuild a predictor written by `save_predictor` (nothing is unpickled); its report is `.report`."""
    from safetensors.torch import load_file
    from ..checkpoint import read_metadata
    meta = read_metadata(path, FORMAT, "property predictor", "predictor")
    config = json.loads(meta["config"])
    members = config.pop("members", None)
    predictor = (PropertyPredictor(**config) if members is None
                 else PredictorEnsemble(PropertyPredictor(**config) for _ in range(members)))
    predictor.load_state_dict(load_file(str(path)), strict=True)
    predictor.report = json.loads(meta.get("report", "{}"))
    return predictor.eval().to(device) if device is not None else predictor.eval()


# --- training ---------------------------------------------------------------------------------

def property_labels(x: torch.Tensor, property: str = "dipole") -> np.ndarray:
    """RDKit labels of states x: (n, N_MAX, 3 + K) -> (n,) float64, NaN where RDKit fails.

    Computed on the decoded molecules by design.properties, as design.evaluate scores samples:
    "dipole" (Gasteiger-charge dipole, e·Å), "logp" (Crippen), "qed".
    """
    one_of(property, "property", PROPERTIES)
    from .design import properties
    return np.asarray(properties(_states(x).detach().cpu())[property], dtype=np.float64)


def _fit_report(predictor, x, y) -> dict:
    with torch.no_grad():
        pred = torch.cat([predictor(b) for b in x.split(256)]).double().numpy()
    err = pred - y
    std = float(y.std())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())), "label_std": std,
            "r2": float(1.0 - (err ** 2).mean() / max(std ** 2, 1e-30)), "n": int(len(y))}


def fit_predictor(x_train: torch.Tensor, y_train, x_test: torch.Tensor, y_test, *, readout: str = "dipole",
                  property: str = "custom", iters: int = 2000, seed: int = 0, batch_size: int = 64,
                  lr: float = 2e-3, hidden: int = 64, layers: int = 4, coord_noise: float = 0.05,
                  type_noise: float = 0.2, members: int = 1,
                  progress: bool = False) -> tuple[PropertyPredictor | PredictorEnsemble, dict]:
    """Train a PropertyPredictor by mean squared error on (x_train, y_train); report on the test set.
    members > 1: that many, from seeds seed, seed + 1, …, averaged (a PredictorEnsemble).

    x_*: (n, N_MAX, 3 + K); y_*: (n,) labels (NaN rows are dropped). Each batch is augmented with
    Gaussian noise of std `coord_noise` Å on the coordinates and `type_noise` on the type channels
    (the reward sees generated states, whose type channels are not exactly one-hot); labels stay
    those of the clean states. Adam with a cosine learning rate from `lr` to lr/100, gradient norm
    clipped at 1, through training.Trainer. Report: held-out mae, rmse, label_std, r2, n; the
    train-set mae; n_train, members and train_seconds; with members > 1 each member's held-out
    mae (member_mae).
    """
    one_of(readout, "readout", READOUTS)
    positive_int(iters, "iters"), positive_int(batch_size, "batch_size")
    positive(lr, "lr"), non_negative(coord_noise, "coord_noise"), non_negative(type_noise, "type_noise")
    xs, ys = [], []
    for name, xx, yy in (("train", x_train, y_train), ("test", x_test, y_test)):
        xx = _states(xx, f"x_{name}").detach().to("cpu", torch.float32)
        yy = np.asarray(yy, dtype=np.float64).reshape(-1)
        if yy.shape[0] != xx.shape[0]:
            raise ValueError(f"y_{name} must hold one label per state ({xx.shape[0]}), got {yy.shape[0]}")
        keep = np.isfinite(yy)
        if keep.sum() < 2:
            raise ValueError(f"y_{name} needs at least 2 finite labels, got {int(keep.sum())}")
        xs.append(xx[torch.as_tensor(keep)])
        ys.append(yy[keep])
    (x_train, x_test), (y_train, y_test) = xs, ys
    y = torch.as_tensor(y_train, dtype=torch.float32)
    std = float(y.std())
    if not std > 0:
        raise ValueError(f"y_train must vary to be learned, got {len(y)} labels all equal to {float(y[0])}")
    members = positive_int(members, "members")
    t0 = time.perf_counter()
    fits = []
    for k in range(members):
        with torch.random.fork_rng(devices=[]):   # the initial weights from the seed, the caller's RNG untouched
            torch.manual_seed(seed + k)           # (batches and noise come from `gen`)
            predictor = PropertyPredictor(hidden, layers, readout=readout, property=property)
        predictor.std.fill_(std)
        if readout == "sum":
            predictor.mean.fill_(float(y.mean()))
        fits.append(_fit_one(predictor, x_train, y, std, seed + k, iters, batch_size, lr, coord_noise, type_noise,
                             progress))
    seconds = time.perf_counter() - t0
    predictor = fits[0] if members == 1 else PredictorEnsemble(fits).eval()
    report = {"property": property, "readout": readout, "iters": iters, "members": members,
              **_fit_report(predictor, x_test, y_test),
              "train_mae": _fit_report(predictor, x_train, y_train)["mae"], "n_train": int(len(y_train)),
              "train_seconds": seconds}
    if members > 1:
        report["member_mae"] = [_fit_report(m, x_test, y_test)["mae"] for m in fits]
    predictor.report = report
    return predictor, report


def _fit_one(predictor, x_train, y, std, seed, iters, batch_size, lr, coord_noise, type_noise, progress):
    """Train one PropertyPredictor in place (see fit_predictor) and return it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)

    def step(it):
        idx = torch.randint(len(x_train), (batch_size,), generator=gen)
        xb = x_train[idx]
        noise = torch.randn(xb.shape, generator=gen)
        xb = xb + noise * torch.tensor([coord_noise] * 3 + [type_noise] * K)
        loss = ((predictor(xb) - y[idx]) / std).pow(2).mean()     # MSE in units of the label std
        loss.backward()
        return {"loss": float(loss.detach())}, {}

    trainer = Trainer("predictor", params=predictor.parameters(), opt=opt, modules={"predictor": predictor},
                      gens={0: gen}, iters=iters, config={"iters": iters}, lr_at=cosine(lr, lr / 100, iters),
                      grad_clip=1.0, max_nonfinite=20, checkpoint_every=iters, progress=progress,
                      log_when=lambda done: done % 100 == 0)
    predictor.train()
    trainer.run(step)
    return predictor.eval()


def train_predictor(data, property: str = "dipole", iters: int = 2000, seed: int = 0,
                    **kwargs) -> tuple[PropertyPredictor | PredictorEnsemble, dict]:
    """Train a predictor of an RDKit property on design data; report its held-out error.

    data: design.DesignData (.train, .test states). property: "dipole" (Gasteiger dipole, the
    dipole readout), "logp" (Crippen) or "qed" (both the sum readout); labels by property_labels.
    kwargs: fit_predictor's. Returns (predictor in eval mode, report) with the test split's mae,
    label_std and r2 (see fit_predictor).
    """
    one_of(property, "property", PROPERTIES)
    y_train, y_test = property_labels(data.train, property), property_labels(data.test, property)
    readout = "dipole" if property == "dipole" else "sum"
    return fit_predictor(data.train, y_train, data.test, y_test, readout=readout, property=property,
                         iters=iters, seed=seed, **kwargs)


def cached_predictor(property: str = "dipole", data=None, iters: int = 2000, seed: int = 0, *, members: int = 4,
                     cache_dir=None, use_cache: bool = True) -> tuple[PropertyPredictor | PredictorEnsemble, dict]:
    """The predictor of `property` trained on the design data: loaded from the cache, or trained
    once by train_predictor and saved there. Returns (predictor, report). members: an ensemble of
    that many seeds (default 4; about 50 s each on one CPU thread at iters=2000).

    data: design.DesignData (default load_dataset(cache_dir)). The file is
    `design-predictor-<property>-<key>.safetensors` beside the data (`cache_dir`, default
    $TILTFLOW_CACHE/molecules or ~/.cache/tiltflow/molecules), keyed by the data's recipe,
    property, iters, seed, members and this module's FORMAT.
    """
    one_of(property, "property", PROPERTIES)
    members = positive_int(members, "members")
    if data is None:
        from .design import load_dataset
        data = load_dataset(cache_dir)
    recipe = {k: v for k, v in data.recipe.items() if k != "build_seconds"}   # timing is not content
    key = hashlib.sha256(f"{FORMAT}|{property}|{iters}|{seed}|{members}|{json.dumps(recipe, sort_keys=True)}"
                         .encode()).hexdigest()[:16]
    path = _cache_dir(cache_dir) / f"design-predictor-{property}-{key}.safetensors"
    if use_cache and path.is_file():
        predictor = load_predictor(path)
        return predictor, predictor.report
    predictor, report = train_predictor(data, property, iters=iters, seed=seed, members=members)
    if use_cache:
        save_predictor(predictor, path, report)
    return predictor, report


# --- rewards ----------------------------------------------------------------------------------

class PropertyReward:
    """r(x) = scale · predictor(x); x: (batch, N_MAX, 3 + K) -> (batch,), differentiable in x.

    The gradient reaches the coordinates and the type channels. The predictor is copied and frozen
    (eval mode, no parameter gradients), so fine-tuning never changes it. A negative scale rewards
    low values of the property.
    """

    name = "property"

    def __init__(self, predictor: PropertyPredictor | PredictorEnsemble, scale: float = 1.0):
        if not isinstance(predictor, PREDICTORS):
            raise ValueError(f"predictor must be a PropertyPredictor or PredictorEnsemble, "
                             f"got {type(predictor).__name__}")
        self.scale = finite(scale, "scale")
        self.predictor = copy.deepcopy(predictor).eval().requires_grad_(False)
        self.name = predictor.property

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        x = _states(x)
        if next(self.predictor.parameters()).device != x.device:
            self.predictor.to(x.device)
        p = next(self.predictor.parameters())
        return self.scale * self.predictor(x.to(p.dtype)).to(x.dtype)

    def __repr__(self) -> str:
        return f"PropertyReward({self.predictor.property!r}, scale={self.scale})"


class EnergyReward:
    """r(x) = −min(E_MMFF94(decode(x)), clip) / scale in kcal/mol; x: (batch, N_MAX, 3 + K) -> (batch,).

    Each state is decoded by design.decode (types by argmax, bonds from geometry) and scored by
    RDKit's MMFF94 with its heavy atoms at the present nodes' coordinates and its hydrogens
    relaxed (see `energy`); the gradient is RDKit's analytic one (tasks.molecules' MMFF function)
    on the heavy atoms, zero on absent nodes and on the type channels. A state that does not
    decode, holds a non-finite number, or that MMFF94 cannot type is charged `invalid_energy`
    (default INVALID_ENERGY = 1000 kcal/mol, so r = −1000/scale) with zero gradient. `clip`
    (kcal/mol, None = off) caps the energy so one exploding conformer does not dominate a batch
    (its gradient is then zero); it must not exceed invalid_energy, so an invalid state never
    scores better than a decodable one.
    """

    name = "mmff"

    def __init__(self, scale: float = 1.0, clip: float | None = None, invalid_energy: float = INVALID_ENERGY,
                 nonbonded_cutoff: float = 100.0, hydrogen_iters: int = 500):
        _rdkit()
        self.hydrogen_iters = positive_int(hydrogen_iters, "hydrogen_iters")
        self.scale = positive(scale, "scale")
        self.invalid_energy = finite(invalid_energy, "invalid_energy")
        self.clip = None if clip is None else finite(clip, "clip")
        if self.clip is not None and self.clip > self.invalid_energy:
            raise ValueError(f"clip must be at most invalid_energy = {self.invalid_energy} kcal/mol (else an "
                             f"undecodable state would score better than a clipped one), got {clip!r}")
        self.nonbonded_cutoff = positive(nonbonded_cutoff, "nonbonded_cutoff")

    def _force_field(self, mol):
        """(MMFF94 force field, its properties) of a decoded molecule, or None when MMFF cannot type it."""
        from rdkit.Chem import AllChem
        try:
            props = AllChem.MMFFGetMoleculeProperties(mol)
            if props is None:
                return None
            return AllChem.MMFFGetMoleculeForceField(mol, props, nonBondedThresh=self.nonbonded_cutoff), props
        except Exception:  # noqa: BLE001 — RDKit raises several types on molecules it cannot handle
            return None

    def _relax_hydrogens(self, mol, props, n_heavy: int) -> np.ndarray:
        """(atoms, 3) positions of mol with its heavy atoms (the first n_heavy) fixed and its
        hydrogens moved to a minimum of E_MMFF94 (L-BFGS from RDKit's placement, hydrogen_iters)."""
        _, Chem, AllChem = _rdkit()
        m = Chem.Mol(mol)     # Minimize moves the conformer it was built on
        # a force field of its own: RDKit zeroes the gradient of fixed points, and the energy's
        # gradient on the heavy atoms comes from the unconstrained one in `energy`
        ff = AllChem.MMFFGetMoleculeForceField(m, props, nonBondedThresh=self.nonbonded_cutoff)
        for i in range(n_heavy):
            ff.AddFixedPoint(i)
        ff.Minimize(maxIts=self.hydrogen_iters)
        return np.asarray(ff.Positions()).reshape(-1, 3)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E*(x) = min over hydrogen positions of E_MMFF94 in kcal/mol, heavy atoms at x's present
        nodes: (batch,), differentiable in the present coordinates; invalid_energy where the state
        does not decode or cannot be typed (not clipped).

        Hydrogens are not in the state, so they are relaxed: from RDKit's placement (design.decode)
        to a minimum of the energy with the heavy atoms fixed. At that minimum their forces vanish,
        so ∇E* wrt the heavy atoms is ∂E/∂r_heavy at the relaxed hydrogens (the envelope theorem),
        which is what is returned; it is exact to the relaxation's convergence.
        """
        from .design import decode
        x = _states(x)
        ok = torch.isfinite(x.detach()).flatten(1).all(1)
        # rows with NaN/inf are zeroed before RDKit sees them; their gradient is zero through where
        safe = torch.where(ok[:, None, None], x, torch.zeros_like(x))
        mols = decode(safe.detach().cpu())
        present = safe.detach()[..., 3:].argmax(-1) != TYPES.index("none")             # (batch, N)
        out = []
        for b, mol in enumerate(mols):
            field = self._force_field(mol) if bool(ok[b]) and mol is not None else None
            if field is None:
                # the zero-weighted term keeps the output in x's graph (a batch of invalid states
                # still has a gradient, zero) without carrying NaN: `safe` is finite
                out.append(safe[b, 0, 0] * 0.0 + self.invalid_energy)
                continue
            ff, props = field
            heavy = safe[b, present[b].nonzero()[:, 0], :3]       # (m, 3): decode keeps node order
            m = heavy.shape[0]
            h = torch.as_tensor(self._relax_hydrogens(mol, props, m)[m:], dtype=x.dtype, device=x.device)
            out.append(_MMFFEnergy.apply(torch.cat([heavy, h]).reshape(1, -1), ff)[0])
        return torch.stack(out)

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        e = self.energy(x)
        if self.clip is not None:
            e = e.clamp(max=self.clip)
        return -e / self.scale

    def __repr__(self) -> str:
        return f"EnergyReward(scale={self.scale}, clip={self.clip}, invalid_energy={self.invalid_energy})"
