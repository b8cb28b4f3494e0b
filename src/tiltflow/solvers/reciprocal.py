"""What the non-adjoint-matching losses share: a batch of end points, the base bridge, one regression.

The tilted path law is P* = P_base · e^{r(X_1)/λ}/Z. The base is memoryless, so P* and P_base
have the same bridge given X_1, and for any affine path it is the interpolant's:

    X_t | X_1 ~ N(α_t X_1, β_t² I)                                        (reciprocal property)

The optimal control is u* = σ ∇log h_t, h_t(x) = E_base[e^{r(X_1)/λ} | X_t = x], and
∇log h_t = s*_t − s^base_t (tilted minus base score at time t). Each loss here writes an
unbiased estimate T of ∇log h_t(X_t) from a pair (X_1, X_t ~ bridge) drawn from P* and regresses

    L = mean ‖ (2/σ_t) (v_θ − v_base)(X_t, t) − σ_t T ‖²                    (same form as AM)

so all losses have the same minimiser v_θ = v_base + (σ²/2) ∇log h_t and differ only in the
variance of T. Pairs from P* are obtained from the current model's end points either as they
are (a fixed-point iteration, as Adjoint Sampling does) or reweighted by their Jarzynski weights
(estimators.py), which makes the pair law exactly P* up to self-normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import estimators
from ..models.flow_model import FlowModel
from .adjoint_matching import terminal_adjoint


@dataclass
class EndpointBatch:
    """End points of fresh model paths: x1 (B, *dims), r = g(X_1) (B,), a1 = −∇g(X_1)/λ (B, *dims),
    log_w (B,) Jarzynski log-weights or None, xs (steps + 1, B, *dims) float64 paths, grid."""
    x1: torch.Tensor
    r: torch.Tensor
    a1: torch.Tensor
    log_w: torch.Tensor | None
    xs: torch.Tensor
    grid: torch.Tensor


def endpoint_batch(ft: FlowModel, base: FlowModel, reward, lam: float, n: int, grid: torch.Tensor,
                   generator: torch.Generator, cond=None, weights: bool = False) -> EndpointBatch:
    """Roll out n paths of `ft` (no gradient), evaluate the reward gradient, optionally Jarzynski weights."""
    grid64 = grid.to(torch.float64)
    xs, log_q = estimators.path_rollout(ft, n, grid64, generator, cond)
    x1 = xs[-1].to(torch.get_default_dtype())
    a1, r = terminal_adjoint(reward, x1, lam, cond)
    log_w = None
    if weights:
        log_w = r.to(torch.float64) / lam + estimators.base_log_path(base, xs, grid64, cond) - log_q
    return EndpointBatch(x1, r, a1, log_w, xs, grid64)


def bridge_sample(path, x1: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """X_t = α_t X_1 + β_t ε, ε ~ N(0, I); x1: (B, *dims), t: (B,). Returns (x_t, ε)."""
    eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    shape = (-1, *([1] * (x1.ndim - 1)))
    a, b = path.alpha(t).to(x1).reshape(shape), path.beta(t).to(x1).reshape(shape)
    return a * x1 + b * eps, eps


def loss_time_values(grid: torch.Tensor, n_times: int | None, batch: int, generator: torch.Generator):
    """Times for the regression: k interior grid times (k = n_times or all), each paired with
    every end point. Returns t (k·B,) and the index of the end point of each row (k·B,)."""
    interior = grid[1:-1]
    if n_times is not None and n_times < len(interior):
        interior = interior[torch.randperm(len(interior), generator=generator, device=grid.device)[:n_times]]
    k = len(interior)
    return (interior.repeat_interleave(batch).to(torch.get_default_dtype()),
            torch.arange(batch, device=grid.device).repeat(k))


def control_regression(ft: FlowModel, base: FlowModel, x_t: torch.Tensor, t: torch.Tensor,
                       target: torch.Tensor, sample_weights: torch.Tensor | None = None, cond=None):
    """L = Σ_rows ω ‖(2/σ)(v_θ − v_base) − σ T‖² / Σ ω (uniform ω if None).

    x_t, target: (R, *dims); t: (R,). Returns (loss with grad, path-KL-like diagnostic ½E‖u‖²).
    """
    sigma = ft.path.sigma(t).to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
    with torch.no_grad():
        v_base = base.velocity(x_t, t, cond)
    dv = ft.velocity(x_t, t, cond) - v_base
    res = ((2.0 / sigma) * dv - sigma * target).pow(2).reshape(len(x_t), -1).sum(1)
    if sample_weights is None:
        loss = res.mean()
    else:
        loss = (sample_weights.to(res) * res).sum() / sample_weights.sum().to(res)
    with torch.no_grad():
        u2 = 0.5 * (2.0 * dv / sigma).pow(2).reshape(len(x_t), -1).sum(1).mean()
    return loss, float(u2)


def row_weights(batch: EndpointBatch, rows: torch.Tensor):
    """Self-normalised importance weights of the end points, repeated per row (or None)."""
    if batch.log_w is None:
        return None
    return torch.softmax(batch.log_w, 0)[rows]


def gaussian_base(base: FlowModel):
    """(μ (d,), Σ (d, d)) float64 if the base is the exact velocity of one Gaussian, else None."""
    net = base.net
    if type(net).__name__ == "GaussianMixtureVelocity" and net.means.shape[0] == 1:
        return net.means[0], net.covs[0]
    return None


def base_data_score(base: FlowModel, x: torch.Tensor, cond=None, t_end: float = 1.0 - 1e-3):
    """∇log p_base(x) at the data end: exact for a Gaussian base; otherwise the model's score at
    t_end = 1 − 10⁻³ (the score of the data smoothed by noise of std 10⁻³), an approximation."""
    g = gaussian_base(base)
    if g is not None:
        mu, cov = g
        flat = x.reshape(len(x), -1).to(torch.float64)
        return (-torch.linalg.solve(cov, (flat - mu).T).T).to(x.dtype).reshape_as(x)
    with torch.no_grad():
        v = base.velocity(x, t_end, cond)
        return base.path.velocity_to_score(v, x, torch.tensor(t_end))


class ReciprocalLoss:
    """A loss of the form `control_regression` on bridge pairs; subclasses define `target`.

    batch(...) rolls out fresh end points (no gradient); loss(...) draws bridge points for
    `n_times` grid times per end point and regresses. `weights=True` reweights the end points
    by their Jarzynski weights so that the pairs are exact draws from P* (self-normalised).
    """

    name = "reciprocal"
    weights = False

    def __init__(self, weights: bool | None = None):
        if weights is not None:
            self.weights = bool(weights)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weights={self.weights})"

    def check_base(self, base: FlowModel) -> None:
        """Raise ValueError if this loss cannot be used with `base`."""

    def batch(self, ft, base, reward, lam, n, grid, generator, cond=None) -> EndpointBatch:
        return endpoint_batch(ft, base, reward, lam, n, grid, generator, cond, self.weights)

    def target(self, base: FlowModel, x1, a1, x_t, eps, t, cond=None) -> torch.Tensor:
        """Estimate T of ∇log h_t(X_t) from (X_1, ã(1) = −∇g(X_1)/λ, X_t = α X_1 + β ε, t)."""
        raise NotImplementedError

    def rows(self, base, batch: EndpointBatch, n_times, generator, cond=None):
        """(x_t, t, T, weights) for the regression rows of a batch."""
        t, idx = loss_time_values(batch.grid, n_times, len(batch.x1), generator)
        x1, a1 = batch.x1[idx], batch.a1[idx]
        x_t, eps = bridge_sample(base.path, x1, t, generator)
        c = _repeat_cond(cond, len(t) // len(batch.x1))
        with torch.no_grad():
            T = self.target(base, x1, a1, x_t, eps, t, c)
        return x_t, t, T, row_weights(batch, idx), c

    def loss(self, ft, base, batch: EndpointBatch, n_times, generator, cond=None):
        x_t, t, T, w, c = self.rows(base, batch, n_times, generator, cond)
        return control_regression(ft, base, x_t, t, T, w, c)


def _repeat_cond(cond, k: int):
    if cond is None or not torch.is_tensor(cond):
        return cond
    return cond.repeat(k, *([1] * (cond.ndim - 1)))


def _bshape(t, x):
    return t.to(x).reshape(-1, *([1] * (x.ndim - 1)))


def base_score(base: FlowModel, x_t, t, cond=None):
    """s^base_t(x) from the base velocity (paths.velocity_to_score)."""
    return base.path.velocity_to_score(base.velocity(x_t, t, cond), x_t, t)


def gradient_variance(ft: FlowModel, base: FlowModel, x_t, t, target, cond=None) -> float:
    """tr Cov of the per-row gradients of ‖(2/σ)(v_θ − v_base) − σT‖² w.r.t. the trainable
    parameters of `ft`: the gradient noise one regression row adds. x_t, target: (R, *dims)."""
    params = {k: p for k, p in ft.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("ft has no trainable parameters")
    grads = []
    for i in range(len(x_t)):
        loss, _ = control_regression(ft, base, x_t[i:i + 1], t[i:i + 1], target[i:i + 1], None,
                                     _index_cond(cond, i))
        g = torch.autograd.grad(loss, list(params.values()))
        grads.append(torch.cat([x.reshape(-1) for x in g]).double())
    G = torch.stack(grads)
    return float((G - G.mean(0)).pow(2).sum(1).mean())


def _index_cond(cond, i):
    if cond is None or not torch.is_tensor(cond):
        return cond
    return cond[i:i + 1]
