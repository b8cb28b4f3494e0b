"""Divergences D(p‖p_pre) that keep Flow Density Control near the pretrained model.

FDC maximises F(p) − λ·D(p‖p_pre); each outer iteration needs the first variation δD/δp at
the current model p_k, which enters the tilt's reward with weight −λ. A divergence is a small
object with

    value(samples, model, reference, reference_samples=None) -> float
    first_variation(x, model, reference, samples=None, reference_samples=None) -> (batch,)

x: (batch, *dims), differentiable in x; model = p_k and reference = p_pre are FlowModels;
samples / reference_samples: (n, *dims) samples of p_k / p_pre (given when the class sets
``needs_samples`` / ``needs_reference_samples``). Constants in a first variation are dropped.

| divergence | D(p‖q) | δD/δp(x) | gradient used |
|---|---|---|---|
| KL | E_p log(p/q) | log p(x) − log q(x) (+1) | s_p(x) − s_q(x), scores from velocities |
| Renyi(α) | log ∫p^α q^{1−α} / (α − 1) | (α/(α−1))·(p/q)^{α−1}/Z, Z = ∫p^α q^{1−α} | α·w(x)·(s_p − s_q), w = (p/q)^{α−1}/Z |
| OT(p=2) | W2²(p, q), squared-Euclidean optimal transport cost | Kantorovich potential φ(x) | ∇ of the c-transform below |

Choices. KL and Rényi read scores s = ∇log p from the velocity at t = 1 − ε
(utilities.model_score), as the FDC authors' code does; Rényi also needs the log-ratio's value
(for w), computed by the models' log_prob. Optimal transport: the paper uses W1 with a
learned Lipschitz critic; we solve the transport exactly between n samples of p_k and of
p_pre with POT (``ot.emd``, dual potentials u, v) and extend the potential to every x by the
c-transform φ(x) = min_j [c(x, y_j) − v_j], so its gradient 2(x − y_j*) (W2², default) or
(x − y_j*)/‖x − y_j*‖ (W1, p=1) pulls x toward its transport partner. No critic to train;
the price is an O(n²) solve once per outer iteration (n = 512 by default).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import couplings
from .utilities import model_score, value_with_grad
from .validation import in_interval, positive, positive_int

__all__ = ["KL", "OT", "Renyi"]


def log_ratio(model, reference, x: Tensor, steps: int) -> Tensor:
    """log p(x) − log q(x) by both models' log_prob (ODE, `steps` Heun steps); (batch,).

    A `model` with a method log_ratio(x, steps) (fdc's view of its iterate) supplies it
    directly, up to a constant that the Rényi normaliser cancels."""
    if not hasattr(model, "path") and hasattr(model, "log_ratio"):
        with torch.no_grad():
            return model.log_ratio(x.detach(), steps)
    return model.log_prob(x.detach(), steps=steps) - reference.log_prob(x.detach(), steps=steps)


class KL:
    """KL(p‖p_pre); δ/δp = log p − log p_pre, handed over by its gradient s_p − s_pre (value 0).

    eps: time offset of the score read-out (utilities.model_score); steps: Heun steps of the
    log_prob used by ``value``.
    """

    needs_samples = False
    needs_reference_samples = False

    def __init__(self, eps: float = 0.02, steps: int = 50):
        self.eps, self.steps = in_interval(eps, "eps", 0.0, 0.5, hi_open=True), positive_int(steps, "steps")

    def value(self, samples: Tensor, model, reference, reference_samples=None) -> float:
        """Monte Carlo E_p[log p − log q] over samples of p: (n, *dims)."""
        return float(log_ratio(model, reference, samples, self.steps).double().mean())

    def first_variation(self, x: Tensor, model, reference, samples=None, reference_samples=None) -> Tensor:
        grad = model_score(model, x.detach(), self.eps) - model_score(reference, x.detach(), self.eps)
        return value_with_grad(x, torch.zeros(x.shape[0], device=x.device), grad)

    def __repr__(self) -> str:
        return f"KL(eps={self.eps:g})"


def _cached(cache: list, key: tuple, compute):
    """compute(), remembered by the identity of the objects in `key` for the last 8 keys (one per
    FDC outer iteration: its utility and divergence ask again for the same samples)."""
    for k, val in cache:
        if len(k) == len(key) and all(a is b for a, b in zip(k, key)):
            return val
    val = compute()
    cache[:] = [*cache[-7:], (key, val)]
    return val


class Renyi:
    """Rényi divergence of order α ≠ 1: D_α(p‖q) = log E_p[(p/q)^{α−1}] / (α − 1).

    δD_α/δp(x) = (α/(α − 1))·w(x), w = (p/q)^{α−1}(x) / E_p[(p/q)^{α−1}]; its gradient
    α·w(x)·∇log(p/q)(x) (scores as in KL, α → 1 gives KL's gradient). Z = E_{p_k}[(p/q)^{α−1}]
    is estimated once per outer iteration on the samples of p_k (cached while the same samples
    tensor is passed). (α − 1)·log(p/q) − log Z is clipped at ±`max_log_weight` (the FDC code
    clips at ±3, our default: at ±5 the 2-D mean-variance benchmark hit a non-finite loss) so that
    a few far-out points cannot dominate. For α < 1 the gradient is that of the clipped value (0
    above the cap): the unclipped reward λ·α/(1 − α)·w is unbounded where p_k ≪ p_pre, and the
    FDC code's capped weight times the full ∇log(p/q) is an outward force growing with ‖x‖ (it
    ran the mean-variance + Rényi-½ benchmark away to KL 6·10⁹ at outer step 2).

    For α < 1 the divergence does not hold far mass back: p ≥ ε·q gives D_α ≤ α/(1 − α)·log(1/ε)
    however far the rest of p lies, so F − λD_α can be unbounded (mean-variance: mass 1 − R⁻² at
    r = R scores ≈ R − 2 log R); FDC then climbs to a local maximum at best. ``best_response``
    solves the step with D kept exact (a tilt of q by a bounded reward).
    """

    needs_samples = True
    needs_reference_samples = False

    def __init__(self, alpha: float = 0.5, eps: float = 0.02, steps: int = 30, max_log_weight: float = 3.0):
        alpha = positive(alpha, "alpha")
        if abs(alpha - 1.0) < 1e-6:
            raise ValueError("alpha must differ from 1 (alpha = 1 is KL: use tiltflow.KL())")
        self.alpha, self.eps, self.steps = alpha, in_interval(eps, "eps", 0.0, 0.5, hi_open=True), positive_int(steps, "steps")
        self.max_log_weight = positive(max_log_weight, "max_log_weight")
        self._cache = []

    def _log_z(self, samples: Tensor, model, reference) -> float:
        def compute():
            lr = log_ratio(model, reference, samples, self.steps).double()
            return float(torch.logsumexp((self.alpha - 1) * lr, 0) - math.log(lr.numel()))
        return _cached(self._cache, (samples, model), compute)

    def value(self, samples: Tensor, model, reference, reference_samples=None) -> float:
        lr = log_ratio(model, reference, samples, self.steps).double()
        return float((torch.logsumexp((self.alpha - 1) * lr, 0) - math.log(lr.numel())) / (self.alpha - 1))

    def first_variation(self, x: Tensor, model, reference, samples=None, reference_samples=None) -> Tensor:
        if not isinstance(samples, Tensor):
            raise ValueError("Renyi.first_variation needs samples of the current model (for its normaliser)")
        log_z = self._log_z(samples, model, reference)
        lw = ((self.alpha - 1) * log_ratio(model, reference, x, self.steps) - log_z)
        w = lw.clamp(-self.max_log_weight, self.max_log_weight).exp()
        grad = model_score(model, x.detach(), self.eps) - model_score(reference, x.detach(), self.eps)
        # α < 1: −λ·δD = λ·α/(1 − α)·w grows without bound where p_k ≪ p_pre (w ∝ (p_pre/p_k)^{1−α},
        # e.g. exp(c·r²) past a mean-variance tilt), so exp(γ·g_k) is not normalisable. Above the cap
        # the reward is the constant λ·α/(1 − α)·e^cap, so its gradient there is 0 (the FDC code keeps
        # α·e^cap·∇log(p/q): an outward force growing with ‖x‖ that ran the inner runs away).
        if self.alpha < 1:
            w_grad = torch.where(lw > self.max_log_weight, torch.zeros_like(w), w)
        else:      # α > 1: the reward −λ·α/(α − 1)·w is bounded above; the capped force restores
            w_grad = w
        grad = self.alpha * w_grad.reshape(-1, *([1] * (x.ndim - 1))).to(grad) * grad
        return value_with_grad(x, self.alpha / (self.alpha - 1) * w, grad)

    def best_response(self, u: Tensor, lam: float, log_weights: Tensor | None = None,
                      sup_u: float | None = None) -> float:
        """The level c of p* = argmax_p E_p[u] − λ·D_α(p‖q) for α < 1; a float.

        p* = q·(c − u)^{−β}/E_q[(c − u)^{−β}], β = 1/(1 − α): the tilt of q by the reward
        −β·log(c − u) at KL weight 1, with p*/q ≤ (c − sup u)^{−β}/E_q[…] bounded. The first-order
        condition u + λ·α/(1 − α)·w = c (w as in first_variation) holds iff c > sup u solves
        E_q[(c − u)^{−β}] = (1 − α)/(λα)·E_q[(c − u)^{−αβ}]  (bisection on log(c − sup u)).
        With u = δF/δp(p_k) this is the outer step that linearises F only (for KL it is the tilt
        of q by u/λ, FDC's full step 1/λ).

        u: (n,) values at points of q: samples (log_weights None) or quadrature nodes with
        log_weights = log(q·Δx), (n,). sup_u: sup of u on q's support (default: u.max(), right
        when the points reach the sup, as samples do).
        """
        if self.alpha > 1:
            raise ValueError(f"best_response needs alpha < 1 (for alpha > 1 the maximiser vanishes where "
                             f"u < c: no tilt), got alpha={self.alpha:g}")
        lam, beta = positive(lam, "lam"), 1.0 / (1.0 - self.alpha)
        u = u.detach().double().reshape(-1)
        lw = (torch.full_like(u, -math.log(u.numel())) if log_weights is None
              else log_weights.detach().double().reshape(-1))
        top = float(u.max()) if sup_u is None else float(sup_u)
        if top < float(u.max()):
            raise ValueError(f"sup_u must be >= max(u) = {float(u.max()):g}, got {top:g}")
        target = math.log((1 - self.alpha) / (lam * self.alpha))
        below = top - u           # ≥ 0; c − u = below + (c − sup u), no cancellation near the sup

        def excess(log_gap):     # log E_q[(c−u)^{−β}] − log E_q[(c−u)^{−αβ}] − target, decreasing in c
            log_cu = torch.log(below + math.exp(log_gap))
            return float(torch.logsumexp(lw - beta * log_cu, 0)
                         - torch.logsumexp(lw - self.alpha * beta * log_cu, 0)) - target

        scale = max(1.0, float(u.max() - u.min()))
        lo, hi = math.log(scale) - 40.0, math.log(scale) + 20.0 + max(0.0, -target)
        if excess(lo) <= 0:
            raise ValueError("best_response: no level c > sup u solves the first-order condition (the maximiser "
                             "has an atom at argmax u); pass more points near the sup or a smaller sup_u")
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
        return top + math.exp(0.5 * (lo + hi))

    def __repr__(self) -> str:
        return f"Renyi(alpha={self.alpha:g}, eps={self.eps:g})"


class OT:
    """Optimal-transport cost W_p^p(p, p_pre) with cost c(x, y) = ‖x − y‖^p, p ∈ {1, 2}.

    First variation: the Kantorovich potential of p's side, from POT's exact solver between
    the samples of p_k and of p_pre (n each, subsampled), extended to all x by the c-transform
    φ(x) = min_j [c(x, y_j) − v_j] (module docstring). Cached per samples tensor.
    """

    needs_samples = True
    needs_reference_samples = True

    def __init__(self, p: int = 2, n: int = 512):
        if p not in (1, 2):
            raise ValueError(f"p must be 1 (W1) or 2 (W2²), got {p!r}")
        self.p, self.n = p, positive_int(n, "n", minimum=2)
        self._cache = []

    def _cost(self, x: Tensor, y: Tensor) -> Tensor:
        d = torch.cdist(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1))
        return d.pow(2) if self.p == 2 else d

    def _solve(self, samples: Tensor, reference_samples: Tensor):
        """(optimal cost, reference points (m, d), their potentials v (m,)) for these samples."""
        def compute():
            x = samples[: self.n].detach().reshape(min(self.n, samples.shape[0]), -1).double().cpu()
            y = reference_samples[: self.n].detach().reshape(min(self.n, reference_samples.shape[0]), -1).double().cpu()
            cost, _, v = couplings.ot_dual(self._cost(x, y).numpy(), "the OT divergence")
            return cost, y, torch.as_tensor(v)
        return _cached(self._cache, (samples,), compute)

    def value(self, samples: Tensor, model=None, reference=None, reference_samples=None) -> float:
        if not isinstance(reference_samples, Tensor):
            raise ValueError("OT.value needs reference_samples of the pretrained model")
        return self._solve(samples, reference_samples)[0]

    def first_variation(self, x: Tensor, model=None, reference=None, samples=None, reference_samples=None) -> Tensor:
        if not isinstance(samples, Tensor) or not isinstance(reference_samples, Tensor):
            raise ValueError("OT.first_variation needs samples of the current and of the pretrained model")
        _, y, v = self._solve(samples, reference_samples)
        return (self._cost(x, y.to(x)) - v.to(x)[None, :]).min(dim=1).values

    def __repr__(self) -> str:
        return f"OT(p={self.p}, n={self.n})"
