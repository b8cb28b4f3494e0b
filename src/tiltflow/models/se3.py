"""SE(3)-equivariant velocity for de novo molecules: coordinates and continuous atom types of N nodes.

The state of one molecule is x (N, 3 + K): x[:, :3] coordinates in Å, x[:, 3:] K continuous type
channels (a scaled one-hot in the data, "none" marking an absent node; see tasks/design.py). The
network is a fully connected EGNN (Satorras et al. 2021, as in the continuous FlowMol / EQGAT
models) whose messages see only invariants (types through the node features, squared distances,
the time embedding) and whose coordinate update adds the chirality term of `egnn._EGNNLayer`:

    x_i ← x_i + 1/(N−1) Σ_j [ φ_x(m_ij) (x_i − x_j) / (|x_ij| + 1) + φ_c(m_ij) (x̄_i × x̄_j) / (s_i s_j) ],

x̄ the coordinates centred on the node mean, s_i = √(|x̄_i|² + 1). Hence, for a proper rotation
R (det +1), a translation a and a permutation P of the nodes,

    v_x(R x + a) = R v_x(x),  v_c(R x + a) = v_c(x),  v(P x) = P v(x),

but not for a reflection (the cross product is a pseudo-vector), so a chiral molecule and its
mirror image get different probabilities. The learned coordinate velocity is projected to zero
node mean; as in `EGNNVelocity`, the centroid c = mean_i x_i of an input off the mean-free
subspace is carried to zero by the exact rectified-flow centroid velocity −c / (1 − t + ε).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import validation
from .egnn import CENTROID_EPS, _EGNNLayer
from .mlp import TimeEmbedding


class SE3Velocity(nn.Module):
    """v(x, t): x (batch, n_nodes, 3 + n_types) or flattened (batch, n_nodes * (3 + n_types)),
    t (batch,) -> the same shape; coordinate part SE(3)-equivariant and mean-free, type part
    SE(3)-invariant, both permutation-equivariant over nodes. `cond` is not used.
    """

    def __init__(self, n_nodes: int = 27, n_types: int = 6, hidden: int = 64, layers: int = 4, time_dim: int = 32):
        super().__init__()
        validation.positive_int(n_types, "n_types")
        validation.positive_int(hidden, "hidden")
        validation.positive_int(layers, "layers")
        validation.positive_int(time_dim, "time_dim")
        validation.positive_int(n_nodes, "n_nodes", minimum=2)      # messages need a pair
        self.n_nodes, self.n_types = n_nodes, n_types
        self.hidden, self.n_layers, self.time_dim = hidden, layers, time_dim
        self.shape = (n_nodes, 3 + n_types)
        # for pretrain(coupling="equivariant"): nodes may be permuted, the first 3 columns rotated
        self.symmetry = {"nodes": n_nodes, "coords": 3, "permute": True}
        self.dim = n_nodes * (3 + n_types)
        self.register_buffer("mask", 1.0 - torch.eye(n_nodes))
        self.embed_time = TimeEmbedding(time_dim)
        self.embed = nn.Sequential(nn.Linear(n_types + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(_EGNNLayer(hidden, edge_dim=0, chiral=True) for _ in range(layers))
        self.type_out = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, n_types))

    def config(self) -> dict:
        return {"class": "SE3Velocity", "n_nodes": self.n_nodes, "n_types": self.n_types, "hidden": self.hidden,
                "layers": self.n_layers, "time_dim": self.time_dim}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if x.ndim == 2 and x.shape[1] == self.dim:
            return self.forward(x.reshape(x.shape[0], *self.shape), t).reshape(x.shape)
        if x.ndim != 3 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (batch, {self.n_nodes}, {3 + self.n_types}) or "
                             f"(batch, {self.dim}), got {tuple(x.shape)}")
        b = x.shape[0]
        t = t.to(x.dtype)
        pos, types = x[..., :3], x[..., 3:]
        c = pos.mean(dim=1, keepdim=True)
        pos = pos - c
        te = self.embed_time(t)[:, None].expand(b, self.n_nodes, -1)
        h0 = self.embed(torch.cat([types, te], dim=-1))
        h, y = h0, pos
        mask = self.mask.to(x.dtype)
        for layer in self.layers:
            h, y = layer(h, y, None, mask)
        v_pos = y - pos
        v_pos = v_pos - v_pos.mean(dim=1, keepdim=True)
        # exact centroid velocity of the rectified path with mean-free data (egnn module docstring)
        v_pos = v_pos - c / (1.0 - t + CENTROID_EPS)[:, None, None]
        v_types = self.type_out(torch.cat([h, h0], dim=-1))
        return torch.cat([v_pos, v_types], dim=-1)
