"""A small class-conditional U-Net velocity for small images (the 8×8 digits task).

v(x, t, cond): x (batch, channels, size, size), t (batch,), cond (batch, num_classes) one-hot
(or a (1, num_classes) row shared by the batch) -> like x. Two resolutions (size and size/2),
residual blocks whose features are shifted and scaled by an embedding of t plus an embedding of
the class (FiLM), one skip connection. Small on purpose: the digits task pretrains and
fine-tunes on one CPU thread in minutes.

The diffusers adapter's `UNetVelocity` (models/diffusers_adapter.py) wraps a foreign U-Net; this
one is tiltflow's own, hence the different name.
"""

from __future__ import annotations

import torch
from torch import nn

from .mlp import TimeEmbedding


def _groups(c: int) -> int:
    return 8 if c % 8 == 0 else 1


class _ResBlock(nn.Module):
    """h -> h + conv(SiLU(FiLM(GroupNorm(conv(SiLU(GroupNorm(h))))))), FiLM from the embedding."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, h, emb):
        y = self.conv1(self.act(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        y = self.norm2(y) * (1 + scale) + shift
        y = self.conv2(self.act(y))
        return self.skip(h) + y


class SmallUNetVelocity(nn.Module):
    """Class-conditional U-Net velocity for images (batch, channels, size, size), size even.

    channels=(c1, c2): widths at full and half resolution. num_classes=0 makes it unconditional
    (cond must then be None). The output convolution is zero-initialised so the untrained net is
    v ≡ 0 (a common choice for diffusion U-Nets; training starts from the prior's mean flow).
    """

    def __init__(self, size: int = 8, in_channels: int = 1, channels: tuple[int, int] = (32, 64),
                 num_classes: int = 10, time_dim: int = 32, emb_dim: int = 64):
        super().__init__()
        if size <= 0 or size % 2:
            raise ValueError(f"size must be a positive even integer, got {size}")
        if len(channels) != 2 or any(c <= 0 for c in channels):
            raise ValueError(f"channels must be two positive widths (full, half resolution), got {channels!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.size, self.in_channels, self.channels = size, in_channels, tuple(int(c) for c in channels)
        self.num_classes, self.time_dim, self.emb_dim = num_classes, time_dim, emb_dim
        c1, c2 = self.channels
        self.time = nn.Sequential(TimeEmbedding(time_dim), nn.Linear(time_dim, emb_dim), nn.SiLU(),
                                  nn.Linear(emb_dim, emb_dim))
        # a linear map of a one-hot vector is a class-embedding table
        self.label = nn.Linear(num_classes, emb_dim, bias=False) if num_classes else None
        self.inp = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = _ResBlock(c1, c1, emb_dim)
        self.pool = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid1 = _ResBlock(c2, c2, emb_dim)
        self.mid2 = _ResBlock(c2, c2, emb_dim)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, c1, 3, padding=1))
        self.up1 = _ResBlock(2 * c1, c1, emb_dim)
        self.out = nn.Sequential(nn.GroupNorm(_groups(c1), c1), nn.SiLU(), nn.Conv2d(c1, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.size, self.size)

    def config(self) -> dict:
        return {"class": "SmallUNetVelocity", "size": self.size, "in_channels": self.in_channels,
                "channels": list(self.channels), "num_classes": self.num_classes,
                "time_dim": self.time_dim, "emb_dim": self.emb_dim}

    def _cond(self, cond, n: int, dtype) -> torch.Tensor | None:
        if not self.num_classes:
            if cond is not None:
                raise ValueError("this network is unconditional (num_classes=0); pass cond=None")
            return None
        if cond is None:
            raise ValueError(f"this network expects cond of shape (batch, {self.num_classes}) (one-hot class), got None")
        if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[1] != self.num_classes \
                or n % max(cond.shape[0], 1) or (cond.shape[0] not in (1, n) and not bool((cond == cond[:1]).all())):
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"cond must have shape ({n}, {self.num_classes}) or (1, {self.num_classes}) "
                             f"(one-hot class), got {shape}")
        # m equal rows for n = k·m samples: a one-row condition that a solver repeated per time
        return cond.to(dtype) if cond.shape[0] == n else cond[:1].to(dtype).expand(n, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        emb = self.time(t.to(x.dtype))
        c = self._cond(cond, x.shape[0], x.dtype)
        if c is not None:
            emb = emb + self.label(c)
        h1 = self.down1(self.inp(x), emb)
        h = self.mid2(self.mid1(self.pool(h1), emb), emb)
        h = self.up1(torch.cat([self.up(h), h1], dim=1), emb)
        return self.out(h)


class FixedCondVelocity(nn.Module):
    """v(x, t) = net(x, t, c) with one condition row c fixed: a conditional net seen as an
    unconditional one (for methods that take no condition, e.g. fdc). cond must be None.

    c: (1, cond_dim), stored as a buffer so it is saved with the weights.
    """

    def __init__(self, net: nn.Module, cond):
        super().__init__()
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if cond.ndim == 1:
            cond = cond[None]
        if cond.ndim != 2 or cond.shape[0] != 1:
            raise ValueError(f"cond must be one row (1, cond_dim), got shape {tuple(cond.shape)}")
        self.net = net
        self.register_buffer("cond", cond.clone())
        self.dim = getattr(net, "dim", None)

    def config(self) -> dict:
        return {"class": "FixedCondVelocity", "net": self.net.config(), "cond": self.cond[0].tolist()}

    def forward(self, x, t, cond=None):
        if cond is not None:
            raise ValueError("this network has its condition fixed (FixedCondVelocity); pass cond=None")
        return self.net(x, t, self.cond.to(x.dtype))
