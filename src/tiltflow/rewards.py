"""Ready-made differentiable rewards.

A reward is any callable `r(x, cond=None) -> (batch,)`; the classes here are small examples
with closed forms, used by the 2-D tasks and the CLI. `check_reward` validates a user's reward
before it is handed to a solver. Image rewards (CLIPScore, PickScore, Aesthetic, Weighted sums,
Decoded for latents) live in image_rewards.py and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType

import torch

# image rewards on pixels and latents (image_rewards.py; transformers is imported only when one is built)
from .image_rewards import Aesthetic, CLIPScore, Decoded, ImageReward, PickScore, Weighted  # noqa: F401
from .validation import finite, positive


def _param(v, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64)
    if t.ndim != ndim or t.numel() == 0:
        want = "(d,)" if ndim == 1 else "(d, d)"
        raise ValueError(f"{name} must have shape {want}, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _flat(x: torch.Tensor, d: int) -> torch.Tensor:
    """x: (batch, *dims) with d entries per sample -> (batch, d)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or math.prod(x.shape[1:]) != d:
        raise ValueError(
            f"x must have shape (batch, *dims) with {d} entries per sample, "
            f"got shape {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], d)


def _fmt(t: torch.Tensor) -> str:
    return repr(t.tolist())


class Linear:
    """r(x) = a·x.  a: (d,); x: (batch, *dims) with d entries; returns (batch,)."""

    name = "linear"

    def __init__(self, a):
        self.a = _param(a, "a", 1)

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return _flat(x, self.a.shape[0]) @ self.a.to(x)

    def __repr__(self) -> str:
        return f"Linear(a={_fmt(self.a)})"


class Quadratic:
    """r(x) = −½ xᵀAx + b·x.  A: (d, d); b: (d,) or None (zero); returns (batch,)."""

    name = "quadratic"

    def __init__(self, A, b=None):
        self.A = _param(A, "A", 2)
        d = self.A.shape[0]
        if self.A.shape != (d, d):
            raise ValueError(f"A must be square, got shape {tuple(self.A.shape)}")
        self.b = torch.zeros(d, dtype=torch.float64) if b is None else _param(b, "b", 1)
        if self.b.shape != (d,):
            raise ValueError(f"b must have shape ({d},) like A, got shape {tuple(self.b.shape)}")

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        x = _flat(x, self.A.shape[0])
        return -0.5 * ((x @ self.A.to(x).T) * x).sum(dim=1) + x @ self.b.to(x)

    def __repr__(self) -> str:
        return f"Quadratic(A={_fmt(self.A)}, b={_fmt(self.b)})"


class NegSquaredDistance:
    """r(x) = −|x − p|² / scale.  point p: (d,); scale > 0; returns (batch,)."""

    name = "neg_squared_distance"

    def __init__(self, point, scale: float = 1.0):
        self.point = _param(point, "point", 1)
        self.scale = positive(scale, "scale")

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        x = _flat(x, self.point.shape[0])
        return -((x - self.point.to(x)) ** 2).sum(dim=1) / self.scale

    def __repr__(self) -> str:
        return f"NegSquaredDistance(point={_fmt(self.point)}, scale={self.scale:g})"


class GaussianBump:
    """r(x) = height · exp(−|x − c|² / (2 width²)).  center c: (d,); width > 0; height finite;
    returns (batch,)."""

    name = "gaussian_bump"

    def __init__(self, center, width: float = 0.5, height: float = 1.0):
        self.center = _param(center, "center", 1)
        self.width = positive(width, "width")
        self.height = finite(height, "height")

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        x = _flat(x, self.center.shape[0])
        sq = ((x - self.center.to(x)) ** 2).sum(dim=1)
        return self.height * torch.exp(-sq / (2.0 * self.width**2))

    def __repr__(self) -> str:
        c, w, h = _fmt(self.center), self.width, self.height
        return f"GaussianBump(center={c}, width={w:g}, height={h:g})"


def _linear() -> Linear:
    return Linear((1.0, 0.5))


def _quadratic() -> Quadratic:
    return Quadratic(torch.eye(2))


def _bump() -> GaussianBump:
    return GaussianBump((1.5, 1.5), width=0.5, height=1.0)


def _right() -> Linear:
    return Linear((1.0, 0.0))  # r(x) = x₁


# 2-D rewards by name for the CLI; read-only so the module holds no mutable state.
REWARDS: MappingProxyType[str, Callable[[], Callable]] = MappingProxyType(
    {"linear": _linear, "quadratic": _quadratic, "bump": _bump, "right": _right}
)


def get_reward(name: str):
    """The 2-D reward registered under `name` in REWARDS, freshly constructed."""
    if not isinstance(name, str) or name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid names are {', '.join(sorted(REWARDS))}")
    return REWARDS[name]()


def check_reward(
    reward: Callable, x: torch.Tensor, cond=None, need_grad: bool = False
) -> torch.Tensor:
    """Call `reward` on x and check that it behaves like a reward: a tensor of shape (batch,)
    with finite values and, if `need_grad`, differentiable with respect to x (solvers need
    ∇_x r). x is not modified; with `need_grad` the reward sees a detached copy that requires
    grad. `cond` is passed on only when it is not None, so `lambda x: ...` works.

    x: (batch, *dims). Returns the values (batch,).
    """
    if not callable(reward):
        raise ValueError(
            f"reward must be callable as reward(x, cond=None), got {type(reward).__name__}"
        )
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (batch, *dims) with batch >= 1, got {shape}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf; check the samples before the reward")
    if need_grad:
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point to take gradients, got dtype {x.dtype}")
        if not x.requires_grad:  # a caller that wants ∇_x r passes a leaf that requires grad
            x = x.detach().clone().requires_grad_(True)
    values = reward(x) if cond is None else reward(x, cond=cond)

    batch = x.shape[0]
    if not isinstance(values, torch.Tensor):
        raise ValueError(
            f"reward must return a torch.Tensor of shape ({batch},), got {type(values).__name__}"
        )
    if tuple(values.shape) != (batch,):
        raise ValueError(
            f"reward must return shape ({batch},) (one value per sample), got "
            f"{tuple(values.shape)}; reduce over all non-batch dimensions"
        )
    if values.device != x.device:
        raise ValueError(f"reward returned values on {values.device} for samples on {x.device}; "
                         "compute the reward on the samples' device (move its parameters with .to(device))")
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise ValueError(f"reward returned {bad} NaN or inf values out of {batch}")
    if need_grad and not values.requires_grad:
        raise ValueError(
            "reward output has no gradient with respect to x; compute it with torch operations "
            "on x (no .detach(), .item(), numpy or torch.no_grad())"
        )
    return values
