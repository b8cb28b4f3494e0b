"""MLP velocity network for vector data, with a sinusoidal time embedding."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    """t: (batch,) in [0, 1] -> (batch, dim) sinusoidal features at geometric frequencies."""

    def __init__(self, dim: int = 32, max_freq: float = 100.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2)))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class MLPVelocity(nn.Module):
    """v(x, t, cond): x (batch, dim), t (batch,), cond (batch, cond_dim) or None -> (batch, dim).

    Input is [x, emb(t), cond]; SiLU hidden layers. `zero_init` zeroes the output layer so the
    network starts as v ≡ 0 (used for residual controls on top of a base velocity).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...] = (256, 256, 256), time_dim: int = 32,
                 cond_dim: int = 0, zero_init: bool = False):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim, self.hidden, self.time_dim, self.cond_dim = dim, tuple(hidden), time_dim, cond_dim
        self.embed = TimeEmbedding(time_dim)
        layers, width = [], dim + time_dim + cond_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return {"class": "MLPVelocity", "dim": self.dim, "hidden": list(self.hidden),
                "time_dim": self.time_dim, "cond_dim": self.cond_dim}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x, self.embed(t.to(x.dtype))]
        if self.cond_dim:
            if cond is None:
                raise ValueError(f"this network expects cond of shape (batch, {self.cond_dim}), got None")
            if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (x.shape[0], self.cond_dim):
                raise ValueError(f"cond must have shape ({x.shape[0]}, {self.cond_dim}) (batch, cond_dim), "
                                 f"got {tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
            parts.append(cond.to(x.dtype))
        return self.out(self.body(torch.cat(parts, dim=1)))
