"""Probability paths x_t = α_t x1 + β_t x0, conversions between predictions, memoryless schedules.

Convention (as flow matching): t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.

For an affine path the network's velocity v(x, t) = E[α̇_t x1 + β̇_t x0 | x_t = x] determines
the posterior means of data and noise, hence the score and the noise prediction:

    x = α y + β e,   v = α̇ y + β̇ e          (y = E[x1 | x], e = E[x0 | x])
    y = (β v − β̇ x) / (α̇ β − β̇ α),   e = (α̇ x − α v) / (α̇ β − β̇ α),   s = −e / β

The memoryless noise schedule of Adjoint Matching (Domingo-Enrich et al. 2024, eq. (13)):

    η_t = β_t (α̇_t β_t / α_t − β̇_t),   σ(t)² = 2 η_t,
    b(x, t) = v + (σ²/2) s = 2 v(x, t) − κ_t x,   κ_t = α̇_t / α_t.

Rectified flow (α = t, β = 1 − t): σ(t)² = 2(1 − t)/t and b = 2v − x/t.

Singular ends. σ(t) → ∞ as t → 0 (α_0 = 0) and the score (∝ 1/β) blows up as t → 1. Nothing
here divides by α or β at an end point unless asked to: `clip_time` confines t to
[t_min, 1 − t_min] for the formulas that need it (σ, κ, score), and the posterior step in
integrators.py never evaluates σ at all, so rollouts start exactly at t = 0 and end exactly at 1.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

# t is confined to [T_EPS, 1 − T_EPS] in formulas singular at an end (σ, κ, score);
# 1e-4 keeps σ(t)² = 2(1 − t)/t ≤ 2e4, finite in float32 products.
T_EPS = 1e-4


def clip_time(t: torch.Tensor, eps: float = T_EPS) -> torch.Tensor:
    """Clamp t into [eps, 1 − eps]: used only where a formula is singular at an end point."""
    return t.clamp(eps, 1.0 - eps)


def _bcast(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t: scalar or (batch,) -> shape (batch, 1, ..., 1) broadcastable against x (batch, *dims)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (x.ndim - 1)))


class AffinePath:
    """x_t = α_t x1 + β_t x0 with x0 ~ N(0, I). Subclasses define α, β and their derivatives."""

    name = "affine"

    def alpha(self, t): raise NotImplementedError
    def beta(self, t): raise NotImplementedError
    def d_alpha(self, t): raise NotImplementedError
    def d_beta(self, t): raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name}

    # --- interpolant -----------------------------------------------------------------------
    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
        """Return (x_t, target velocity α̇ x1 + β̇ x0). x0, x1: (batch, *dims); t: (batch,)."""
        a, b = _bcast(self.alpha(t), x1), _bcast(self.beta(t), x1)
        da, db = _bcast(self.d_alpha(t), x1), _bcast(self.d_beta(t), x1)
        return a * x1 + b * x0, da * x1 + db * x0

    # --- conversions (all x: (batch, *dims), t: scalar or (batch,)) ---------------------------
    def _det(self, t):
        # α̇β − β̇α > 0 on [0, 1] for every path here: the map (y, e) -> (x, v) is invertible.
        return self.d_alpha(t) * self.beta(t) - self.d_beta(t) * self.alpha(t)

    def velocity_to_x1(self, v, x, t):
        """Posterior mean of data E[x1 | x_t = x] = (β v − β̇ x) / (α̇β − β̇α); regular on [0, 1]."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        b, db, det = (_bcast(f(t), x) for f in (self.beta, self.d_beta, self._det))
        return (b * v - db * x) / det

    def velocity_to_noise(self, v, x, t):
        """Noise prediction E[x0 | x_t = x] = (α̇ x − α v) / (α̇β − β̇α); regular on [0, 1]."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        a, da, det = (_bcast(f(t), x) for f in (self.alpha, self.d_alpha, self._det))
        return (da * x - a * v) / det

    def noise_to_velocity(self, eps, x, t):
        """v = α̇ y + β̇ ε with y = (x − β ε)/α; singular where α = 0, so t is clipped."""
        t = clip_time(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        a, b, da, db = (_bcast(f(t), x) for f in (self.alpha, self.beta, self.d_alpha, self.d_beta))
        return da * (x - b * eps) / a + db * eps

    def velocity_to_score(self, v, x, t):
        """Score ∇ log p_t(x) = −E[x0 | x] / β; singular at t = 1, so t is clipped."""
        t = clip_time(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        return -self.velocity_to_noise(v, x, t) / _bcast(self.beta(t), x)

    def score_to_velocity(self, s, x, t):
        """v = κ x + η s (from y = (x + β² s)/α); t clipped where α = 0."""
        t = clip_time(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        return _bcast(self.kappa(t), x) * x + _bcast(self.eta(t), x) * s

    # --- memoryless schedule -------------------------------------------------------------------
    def kappa(self, t):
        """κ_t = α̇_t / α_t."""
        return self.d_alpha(t) / self.alpha(t)

    def eta(self, t):
        """η_t = β_t (α̇_t β_t / α_t − β̇_t)  (Adjoint Matching, eq. 13)."""
        return self.beta(t) * (self.kappa(t) * self.beta(t) - self.d_beta(t))

    def sigma(self, t):
        """Memoryless diffusion coefficient σ(t) = sqrt(2 η_t); t is clipped to [T_EPS, 1 − T_EPS]."""
        t = clip_time(torch.as_tensor(t))
        return torch.sqrt(2.0 * self.eta(t))

    def memoryless_drift(self, v, x, t):
        """b(x, t) = 2 v(x, t) − κ_t x: drift of the memoryless SDE with the marginals of the ODE."""
        t = clip_time(torch.as_tensor(t, dtype=x.dtype, device=x.device))
        return 2.0 * v - _bcast(self.kappa(t), x) * x

    def posterior_coefficients(self, s, t):
        """Gaussian step of the memoryless process from s to t > s given the data prediction y.

        The memoryless SDE is the time reversal of the Markov noising process with
        Cov(x_s, x_t | x1) = (α_s/α_t) β_t² (s < t), so given X_s = x and x1 = y,
            X_t = α_t y + c (x − α_s y) + std · ξ,   c = α_s β_t² / (α_t β_s²),
            std² = β_t² − c² β_s².
        This is the DDPM posterior; it is exact when the data is a point mass and equals the
        Euler–Maruyama step of dX = b dt + σ dW as t − s → 0. Returns (c, std) as floats.
        """
        s, t = float(s), float(t)
        a_s, b_s = float(self.alpha(torch.tensor(s))), float(self.beta(torch.tensor(s)))
        a_t, b_t = float(self.alpha(torch.tensor(t))), float(self.beta(torch.tensor(t)))
        if b_t <= 0.0:
            return 0.0, 0.0
        c = a_s * b_t**2 / (a_t * b_s**2)
        return c, math.sqrt(max(b_t**2 - c**2 * b_s**2, 0.0))


    def exponential_coefficients(self, s: float, t: float) -> tuple[float, float, float]:
        """Exponential-integrator step of dX = (2v − κX) dt + σ dW from s to t > s, v frozen at s.

        The stiff linear part −κX (κ = 1/t for rectified flow) is integrated exactly:
            X_t = (α_s/α_t) X_s + w · 2 v(X_s, s) + std · ξ,
            w = ∫_s^t α_u/α_t du,   std² = ∫_s^t (α_u/α_t)² σ(u)² du,
        (8-point Gauss–Legendre in float64). Finite for s = 0 and t = 1, so no clipping is needed.
        Returns (α_s/α_t, w, std).
        """
        return _exp_coefficients(self, float(s), float(t))

    def trapezoid_weight(self, s: float, t: float) -> float:
        """w₁ = ∫_s^t (α_u/α_t) (u − s)/(t − s) du: the weight of v(·, t) when v is interpolated
        linearly on [s, t] in the exponential step (the Heun corrector of integrators.memoryless_step):
            ∫_s^t (α_u/α_t) v_u du ≈ (w − w₁) v_s + w₁ v_t.
        """
        return _trapezoid_weight(self, float(s), float(t))


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


@lru_cache(maxsize=4096)
def _exp_coefficients(path: "AffinePath", s: float, t: float) -> tuple[float, float, float]:
    u = torch.tensor(0.5 * (t - s) * _GL_NODES + 0.5 * (t + s), dtype=torch.float64)
    wq = 0.5 * (t - s) * _GL_WEIGHTS
    a_t = float(path.alpha(torch.tensor(t, dtype=torch.float64)))
    ratio = (path.alpha(u) / a_t).numpy()
    var = float((wq * ratio**2 * (2.0 * path.eta(u)).numpy()).sum())
    a_s = float(path.alpha(torch.tensor(s, dtype=torch.float64)))
    return a_s / a_t, float((wq * ratio).sum()), math.sqrt(max(var, 0.0))


@lru_cache(maxsize=4096)
def _trapezoid_weight(path: "AffinePath", s: float, t: float) -> float:
    u = torch.tensor(0.5 * (t - s) * _GL_NODES + 0.5 * (t + s), dtype=torch.float64)
    wq = 0.5 * (t - s) * _GL_WEIGHTS
    ratio = (path.alpha(u) / path.alpha(torch.tensor(t, dtype=torch.float64))).numpy()
    return float((wq * ratio * (u.numpy() - s) / (t - s)).sum())


class RectifiedFlow(AffinePath):
    """α_t = t, β_t = 1 − t (conditional OT path). σ(t)² = 2(1 − t)/t, b = 2v − x/t."""

    name = "rectified"

    def alpha(self, t): return t
    def beta(self, t): return 1.0 - t
    def d_alpha(self, t): return torch.ones_like(torch.as_tensor(t))
    def d_beta(self, t): return -torch.ones_like(torch.as_tensor(t))


class VPDiffusion(AffinePath):
    """Variance-preserving diffusion (DDPM / VP-SDE) written in flow time t = 1 − s.

    With the VP-SDE noise rate β(s) = β_min + s (β_max − β_min) in diffusion time s:
        ᾱ(s) = exp(−β_min s − ½ (β_max − β_min) s²),  α_t = sqrt(ᾱ(1 − t)),  β_t = sqrt(1 − α_t²).
    α_0 = exp(−(β_min + β_max)/4) is tiny but positive, so the memoryless SDE starts at t = 0
    from approximately N(0, I). Its memoryless schedule is the DDPM sampler.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def config(self) -> dict:
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}

    def _log_alpha(self, t):
        s = 1.0 - t
        return -0.5 * (self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2)

    def alpha(self, t):
        return torch.exp(self._log_alpha(torch.as_tensor(t)))

    def beta(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(torch.as_tensor(t))))

    def d_alpha(self, t):
        t = torch.as_tensor(t)
        # d/dt log α_t = ½ β(s) with s = 1 − t
        return self.alpha(t) * 0.5 * (self.beta_min + (1.0 - t) * (self.beta_max - self.beta_min))

    def d_beta(self, t):
        # β² = 1 − α² ⇒ β̇ = −α α̇ / β (singular at t = 1 where β = 0; callers clip)
        t = torch.as_tensor(t)
        return -self.alpha(t) * self.d_alpha(t) / self.beta(t).clamp_min(1e-12)


class DiscreteVP(AffinePath):
    """The discrete DDPM schedule of a diffusers scheduler (SD1.5: 1000 steps) in flow time.

    diffusers noises data x1 at integer timestep k ∈ {0, …, N−1} as
        x_k = sqrt(ᾱ_k) x1 + sqrt(1 − ᾱ_k) ε,   ᾱ_k = ∏_{i≤k} (1 − β_i)   (`alphas_cumprod`).
    Flow time t ∈ [0, 1] maps to the continuous timestep τ(t) = (1 − t) N − 1 ∈ [−1, N − 1], and
    log ᾱ is interpolated linearly in τ between the scheduler's values, with ᾱ(−1) = 1 added:
        α_t = sqrt(ᾱ(τ(t))),   β_t = sqrt(1 − ᾱ(τ(t))).
    So at t_k = 1 − (k + 1)/N the path is exactly the scheduler's x_k, one step of 1/N in t is one
    training timestep, t = 1 is clean data (α = 1, β = 0), and t = 0 is the scheduler's last
    timestep (α_0 = sqrt(ᾱ_{N−1}): 0.068 for SD1.5, not 0 — its training never saw pure noise).
    Unlike VPDiffusion (a linear β(s) in continuous time) this reproduces any β schedule exactly
    at the grid times; between them α, β are smooth in log ᾱ and α̇, β̇ are piecewise.
    """

    name = "discrete_vp"

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        if ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be a strictly decreasing sequence in (0, 1) of length >= 2 "
                             "(zero-terminal-SNR schedules with ᾱ = 0 at the last step are not supported)")
        self.alphas_cumprod = [float(a) for a in ac]
        # log ᾱ at τ = −1, 0, …, N − 1
        self._log_ac = torch.cat([torch.zeros(1, dtype=torch.float64), ac.log()])
        self.n_train = ac.numel()

    def config(self) -> dict:
        return {"name": self.name, "alphas_cumprod": self.alphas_cumprod}

    def timestep(self, t):
        """Continuous diffusers timestep τ(t) = (1 − t) N − 1 (t = 1 ↔ τ = −1, clean data)."""
        return (1.0 - torch.as_tensor(t)) * self.n_train - 1.0

    def _log_ac_and_slope(self, t):
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        table = self._log_ac.to(device=t.device, dtype=dtype)
        tau1 = (self.timestep(t.to(dtype)) + 1.0).clamp(0.0, float(self.n_train))   # τ + 1 ∈ [0, N]
        i = tau1.detach().floor().long().clamp(max=self.n_train - 1)
        slope = table[i + 1] - table[i]                                              # d log ᾱ / dτ
        return table[i] + (tau1 - i.to(dtype)) * slope, slope

    def alpha(self, t):
        return torch.exp(0.5 * self._log_ac_and_slope(t)[0])

    def beta(self, t):
        return torch.sqrt(-torch.expm1(self._log_ac_and_slope(t)[0]))

    def d_alpha(self, t):
        # dα/dt = α · ½ d log ᾱ/dτ · dτ/dt,  dτ/dt = −N
        log_ac, slope = self._log_ac_and_slope(t)
        return torch.exp(0.5 * log_ac) * 0.5 * slope * (-self.n_train)

    def d_beta(self, t):
        # β² = 1 − α² ⇒ β̇ = −α α̇ / β (singular at t = 1 where β = 0; callers clip)
        return -self.alpha(t) * self.d_alpha(t) / self.beta(t).clamp_min(1e-12)


PATHS = {"rectified": RectifiedFlow, "vp": VPDiffusion, "discrete_vp": DiscreteVP}


def get_path(config: dict | str) -> AffinePath:
    """Build a path from its name or its `config()` dict."""
    if isinstance(config, str):
        config = {"name": config}
    config = dict(config)
    name = config.pop("name", None)
    if name not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {name!r}")
    return PATHS[name](**config)
