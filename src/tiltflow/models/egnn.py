"""E(3)-equivariant velocity for the atoms of one molecule (EGNN, Satorras et al. 2021).

The molecular graph is part of the network: atom types embed the nodes and bond orders label
the edges of a fully connected graph. Identical particles (DW-4, LJ-13) are the graph with one
atom type and no bonds (`EGNNVelocity.particles`), in any spatial dimension; the velocity is then
also permutation-equivariant. Coordinates enter only through differences x_i − x_j, so

    v(R x + a, t) = R v(x, t)  on the mean-free subspace (Σ_i x_i = 0),

for every rotation or reflection R and translation a. Off that subspace the velocity also
carries the centroid c = mean_i x_i to zero along the rectified-flow path x_t = t x_1 + (1 − t) x_0
with mean-free data: the exact centroid velocity there is −c / (1 − t), so samples drawn from a
full-space Gaussian prior end mean-free. The network uses −c / (1 − t + ε): its solution
c(t) = c_0 (1 − t + ε)/(1 + ε) is linear in t, so Euler, midpoint and Heun steps integrate it
exactly and c(1) = c_0 ε/(1 + ε) ≈ 1e-5 c_0 (with ε = 0, Heun's last step would evaluate 0/0).

Chirality. With reflections in its symmetry group the network maps a mirrored prior sample to the
mirrored output, so its samples of a chiral molecule are racemic: half of them have the wrong
handedness however long it trains. `chiral=True` (3-D only) adds to each layer's coordinate update
the cross-product term Σ_j φ_c(m_ij) (x̄_i × x̄_j) of the centred coordinates x̄; since
(Qa) × (Qb) = det(Q) Q (a × b), the term is a pseudo-vector: the velocity stays equivariant under
proper rotations and translations but not under reflections (SE(3), not E(3)).
A chiral network can represent a one-handed distribution; with the cross term alone learning it is
slow, because its messages are E(3)-invariant: no coefficient can tell the current handedness.
`pseudoscalar=True` (3-D only) gives every layer's messages the signed volumes

    χ_i = a·(b × c) / (|a| |b| |c| + ε),   a, b, c = x_j − x_i for i's first three bonded neighbours j

(in bond-list order; χ_i = 0 for atoms with fewer than three), which are invariant under rotations and
translations and change sign under reflections, so the velocity can depend on which hand x_t has,
and moves each such atom i along the pseudo-vector n_i = (x_b − x_a) × (x_c − x_a), the normal of
its neighbours' plane, the direction that inverts i, with a coefficient φ_n(h_i) of i's features.
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import TimeEmbedding

CENTROID_EPS = 1e-5      # ε of the centroid velocity −c / (1 − t + ε) (module docstring)
CHI_EPS = 1e-6            # ε of χ_i (module docstring): smooth where two atoms coincide
N_BOND_KINDS = 5          # edge labels: 0 not bonded, 1 single, 2 double, 3 triple, 4 aromatic


def _bond_kind(order: float) -> int:
    return {1.0: 1, 2.0: 2, 3.0: 3, 1.5: 4}.get(float(order), 1)


class _EGNNLayer(nn.Module):
    """m_ij = φ_e(h_i, h_j, |x_ij|², a_ij);  x_i += Σ_j x_ij φ_x(m_ij) / (|x_ij| + 1);  h_i += φ_h(h_i, Σ_j m_ij).

    chiral=True adds Σ_j φ_c(m_ij) (x̄_i × x̄_j) / (√(|x̄_i|² + 1) √(|x̄_j|² + 1)) to the coordinate
    update, x̄ = x − mean_i x_i (module docstring); edge_dim: width of the edge labels a_ij (0: none).
    pseudoscalar=True adds χ_i w_1 + χ_j w_2 to φ_e's first linear layer and φ_n(h_i) n_i / (|n_i| + 1)
    to the update of each atom i with three neighbours a, b, c, n_i = (x_b − x_a) × (x_c − x_a)
    (χ_i, n_i: module docstring).
    """

    def __init__(self, hidden: int, edge_dim: int = N_BOND_KINDS, chiral: bool = False, pseudoscalar: bool = False):
        super().__init__()
        self.pseudo = nn.Linear(2, hidden, bias=False) if pseudoscalar else None
        self.normal = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)) if pseudoscalar else None
        self.edge = nn.Sequential(nn.Linear(2 * hidden + 1 + edge_dim, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU())
        self.coord = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.cross = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)) if chiral else None
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, h, x, edge_attr, mask, chi=None, quads=None):
        # h: (B, N, H); x: (B, N, D); edge_attr: (N, N, K) or None; mask: (N, N) 1 off the diagonal;
        # chi: (B, N) signed volumes χ_i, used when pseudoscalar=True
        b, n, hid = h.shape
        diff = x[:, :, None] - x[:, None, :]                                  # x_i − x_j: (B, N, N, D)
        d2 = diff.pow(2).sum(-1, keepdim=True)
        # φ_e's first linear layer on [h_i, h_j, |x_ij|², a_ij] split into its blocks: the node
        # blocks are applied per node and broadcast over edges, so that O(N² H²) work becomes O(N H²)
        w, bias = self.edge[0].weight, self.edge[0].bias
        pre = (h @ w[:, :hid].T)[:, :, None] + (h @ w[:, hid:2 * hid].T)[:, None] + d2 * w[:, 2 * hid] + bias
        if edge_attr is not None:
            pre = pre + edge_attr @ w[:, 2 * hid + 1:].T
        if self.pseudo is not None:
            wc = self.pseudo.weight                                              # (H, 2): [w_1, w_2]
            pre = pre + chi[:, :, None, None] * wc[:, 0] + chi[:, None, :, None] * wc[:, 1]
        m = self.edge[1:](pre) * mask[..., None]
        # normalising by |x_ij| + 1 keeps coordinate updates bounded when atoms are far apart;
        # the 1e-12 keeps ∂|x_ii|/∂x finite on the (masked) diagonal, where 0·inf would give NaN
        dx = (diff * self.coord(m) / ((d2 + 1e-12).sqrt() + 1.0) * mask[..., None]).sum(2)
        if self.cross is not None:
            xc = x - x.mean(dim=1, keepdim=True)
            # |x̄_i × x̄_j| / (s_i s_j) < 1 with s_i = √(|x̄_i|² + 1), smooth where x̄_i = 0 (unlike |x̄_i|)
            s = (xc.pow(2).sum(-1, keepdim=True) + 1.0).rsqrt()                  # (B, N, 1)
            cross = torch.linalg.cross((xc * s)[:, :, None], (xc * s)[:, None])  # (B, N, N, 3)
            dx = dx + (cross * self.cross(m) * mask[..., None]).sum(2)
        if self.normal is not None and quads.shape[0]:
            # moving i along the normal of its neighbours' plane is what inverts it; χ alone (no
            # such term) left L-alanine at chance after 4000 iterations (one-off, docs/molecules.md)
            a, bb, c = (x[:, quads[:, k]] for k in (1, 2, 3))
            nv = torch.linalg.cross(bb - a, c - a)                                # n_i: (B, K, 3)
            nv = nv / (nv.norm(dim=-1, keepdim=True) + 1.0)                      # |n_i| < 1, smooth at 0
            dx = dx.index_add(1, quads[:, 0], (n - 1) * self.normal(h[:, quads[:, 0]]) * nv)
        x = x + dx / (n - 1)
        h = h + self.node(torch.cat([h, m.sum(2) / (n - 1)], dim=-1))
        return h, x


class EGNNVelocity(nn.Module):
    """v(x, t): x (batch, atoms * D) in Å, t (batch,) -> (batch, atoms * D), E(D)-equivariant.

    atomic_numbers: (atoms,); bonds: (n_bonds, 2) atom indices; bond_orders: (n_bonds,) with
    1, 2, 3 or 1.5 (aromatic); spatial_dim: D (3 for molecules). `cond` is not used: the graph
    is fixed at construction. chiral=True: SE(3)- instead of E(3)-equivariant (the cross-product
    term of the module docstring), needed for the samples of a chiral molecule to keep its
    handedness; D must be 3. pseudoscalar=True: the messages also see the signed volumes χ_i
    (module docstring), so they can depend on the handedness of x; D must be 3.
    """

    def __init__(self, atomic_numbers, bonds, bond_orders=None, hidden: int = 64, layers: int = 4,
                 time_dim: int = 32, spatial_dim: int = 3, chiral: bool = False, pseudoscalar: bool = False):
        super().__init__()
        z = torch.as_tensor(atomic_numbers, dtype=torch.long).flatten()
        bonds = torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
        n = z.shape[0]
        if n < 2:
            raise ValueError(f"an EGNN needs at least 2 atoms, got {n}")
        if bonds.numel() and (bonds.min() < 0 or bonds.max() >= n):
            raise ValueError(f"bonds must index atoms 0..{n - 1}, got values in [{int(bonds.min())}, {int(bonds.max())}]")
        orders = torch.ones(bonds.shape[0]) if bond_orders is None else torch.as_tensor(bond_orders, dtype=torch.float32)
        if orders.shape != (bonds.shape[0],):
            raise ValueError(f"bond_orders must have shape ({bonds.shape[0]},), got {tuple(orders.shape)}")
        if isinstance(spatial_dim, bool) or not isinstance(spatial_dim, int) or spatial_dim <= 0:
            raise ValueError(f"spatial_dim must be a positive integer, got {spatial_dim!r}")
        if not isinstance(chiral, bool):
            raise ValueError(f"chiral must be True or False, got {chiral!r}")
        if chiral and spatial_dim != 3:
            raise ValueError(f"chiral=True needs 3-D coordinates (a cross product), got spatial_dim={spatial_dim}")
        if not isinstance(pseudoscalar, bool):
            raise ValueError(f"pseudoscalar must be True or False, got {pseudoscalar!r}")
        if pseudoscalar and spatial_dim != 3:
            raise ValueError(f"pseudoscalar=True needs 3-D coordinates (a signed volume), got spatial_dim={spatial_dim}")
        self.chiral, self.pseudoscalar = chiral, pseudoscalar
        self.n_atoms, self.spatial_dim, self.dim = n, spatial_dim, spatial_dim * n
        # for pretrain(coupling="equivariant"): proper rotations always; node permutations only
        # when every atom is alike and unbonded (particles), else the graph fixes each atom's role
        self.symmetry = {"nodes": n, "coords": spatial_dim,
                         "permute": len(set(z.tolist())) == 1 and bonds.shape[0] == 0}
        self.hidden, self.n_layers, self.time_dim = int(hidden), int(layers), int(time_dim)
        self._graph = (z.tolist(), bonds.tolist(), orders.tolist())
        elements = sorted(set(z.tolist()))
        self.register_buffer("types", torch.tensor([elements.index(a) for a in z.tolist()]))
        kind = torch.zeros(n, n, dtype=torch.long)
        for (i, j), o in zip(bonds.tolist(), orders.tolist()):
            kind[i, j] = kind[j, i] = _bond_kind(o)
        self.register_buffer("edge_attr", nn.functional.one_hot(kind, N_BOND_KINDS).float())
        self.register_buffer("mask", 1.0 - torch.eye(n))
        if pseudoscalar:
            # (atom, first three neighbours in bond-list order) for every atom with at least three;
            # a non-persistent buffer: it moves with the module, state dicts keep their keys
            nbrs = [[] for _ in range(n)]
            for i, j in bonds.tolist():
                nbrs[i].append(j)
                nbrs[j].append(i)
            self.register_buffer("_quads", torch.tensor([[i, *nb[:3]] for i, nb in enumerate(nbrs) if len(nb) >= 3],
                                                        dtype=torch.long).reshape(-1, 4), persistent=False)
        self.embed_type = nn.Embedding(len(elements), self.hidden)
        self.embed_time = TimeEmbedding(self.time_dim)
        self.mix = nn.Linear(self.hidden + self.time_dim, self.hidden)
        self.layers = nn.ModuleList(_EGNNLayer(self.hidden, chiral=chiral, pseudoscalar=pseudoscalar)
                                    for _ in range(self.n_layers))

    @classmethod
    def from_graph(cls, graph, **kwargs) -> "EGNNVelocity":
        """From a `tiltflow.tasks.molecules.MolGraph` (task.graph); chiral and pseudoscalar default to
        `graph.chiral` (True when the molecule has a specified tetrahedral stereocentre)."""
        kwargs.setdefault("chiral", bool(getattr(graph, "chiral", False)))
        kwargs.setdefault("pseudoscalar", kwargs["chiral"])
        return cls(graph.atomic_numbers, graph.bonds, graph.bond_orders, **kwargs)

    @classmethod
    def particles(cls, n_particles: int, spatial_dim: int = 3, **kwargs) -> "EGNNVelocity":
        """n identical particles in `spatial_dim` dimensions: one type, no bonds, fully connected."""
        return cls([0] * n_particles, [], spatial_dim=spatial_dim, **kwargs)

    def config(self) -> dict:
        # "chiral" and "pseudoscalar" only when set: checkpoints written before an option load with
        # an equal config, and without the key the option is off, as it was when they were written
        z, bonds, orders = self._graph
        return {"class": "EGNNVelocity", "atomic_numbers": z, "bonds": bonds, "bond_orders": orders,
                "hidden": self.hidden, "layers": self.n_layers, "time_dim": self.time_dim,
                "spatial_dim": self.spatial_dim, **({"chiral": True} if self.chiral else {}),
                **({"pseudoscalar": True} if self.pseudoscalar else {})}

    def signed_volumes(self, pos: torch.Tensor) -> torch.Tensor:
        """χ_i of the module docstring: pos (batch, atoms, 3) -> (batch, atoms), 0 where i has < 3 neighbours."""
        q = self._quads
        a, b, c = (pos[:, q[:, k]] - pos[:, q[:, 0]] for k in (1, 2, 3))        # (B, K, 3) each
        vol = (a * torch.linalg.cross(b, c)).sum(-1)
        norms = a.norm(dim=-1) * b.norm(dim=-1) * c.norm(dim=-1)
        chi = pos.new_zeros(pos.shape[:2])
        return chi.index_copy(1, q[:, 0], vol / (norms + CHI_EPS))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        b = x.shape[0]
        pos = x.reshape(b, self.n_atoms, self.spatial_dim)
        c = pos.mean(dim=1, keepdim=True)
        pos = pos - c
        h = self.embed_type(self.types).to(x.dtype).expand(b, -1, -1)
        te = self.embed_time(t.to(x.dtype))[:, None].expand(b, self.n_atoms, -1)
        h = self.mix(torch.cat([h, te], dim=-1))
        chi = self.signed_volumes(pos) if self.pseudoscalar else None
        y = pos
        for layer in self.layers:
            h, y = layer(h, y, self.edge_attr.to(x.dtype), self.mask.to(x.dtype), chi,
                         self._quads if self.pseudoscalar else None)
        v = y - pos
        v = v - v.mean(dim=1, keepdim=True)
        # exact centroid velocity of the rectified path with mean-free data (module docstring)
        v = v - c / (1.0 - t.to(x.dtype) + CENTROID_EPS)[:, None, None]
        return v.reshape(b, self.dim)
