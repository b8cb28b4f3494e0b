"""Fixed-grid ODE and SDE steppers, divergences and the instantaneous change of variables.

A velocity is any callable `v(x, t) -> tensor like x` with x: (batch, *dims) and t: (batch,).
Trajectories are returned as (steps + 1, batch, *dims) together with the grid (steps + 1,).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .paths import AffinePath
from .validation import one_of, positive_int

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, t0: float = 0.0, t1: float = 1.0, device=None, dtype=None) -> torch.Tensor:
    """Uniform grid t0 = t_0 < ... < t_steps = t1; returns (steps + 1,)."""
    positive_int(steps, "steps")
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}")
    return torch.linspace(t0, t1, steps + 1, device=device, dtype=dtype or torch.get_default_dtype())


def _tvec(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).expand(x.shape[0])


def ode_step(v: Velocity, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, method: str = "heun"):
    """One step of dx/dt = v(x, t) from s to t (t < s allowed: integrates backward)."""
    h = t - s
    k1 = v(x, _tvec(s, x))
    if method == "euler":
        return x + h * k1
    if method == "midpoint":
        return x + h * v(x + 0.5 * h * k1, _tvec(s + 0.5 * h, x))
    if method == "heun":
        k2 = v(x + h * k1, _tvec(t, x))
        return x + 0.5 * h * (k1 + k2)
    raise ValueError(f"method must be 'euler', 'midpoint' or 'heun', got {method!r}")


def ode_solve(v: Velocity, x: torch.Tensor, grid: torch.Tensor, method: str = "heun",
              return_trajectory: bool = False):
    """Integrate dx/dt = v(x, t) over `grid` (increasing or decreasing).

    x: (batch, *dims). Returns x at grid[-1], or (trajectory (len(grid), batch, *dims), grid).
    """
    traj = [x] if return_trajectory else None
    for i in range(len(grid) - 1):
        x = ode_step(v, x, grid[i], grid[i + 1], method)
        if traj is not None:
            traj.append(x)
    return (torch.stack(traj), grid) if return_trajectory else x


def sde_solve(drift: Velocity, diffusion: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              grid: torch.Tensor, generator: torch.Generator | None = None,
              return_trajectory: bool = False):
    """Euler–Maruyama for dX = drift(X, t) dt + diffusion(t) dW over an increasing grid.

    diffusion(t) is a scalar σ(t) evaluated at the left end of each step.
    """
    traj = [x] if return_trajectory else None
    for i in range(len(grid) - 1):
        s, t = grid[i], grid[i + 1]
        h = t - s
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + h * drift(x, _tvec(s, x)) + diffusion(s) * math.sqrt(float(h)) * noise
        if traj is not None:
            traj.append(x)
    return (torch.stack(traj), grid) if return_trajectory else x


# --- the memoryless SDE --------------------------------------------------------------------------

SCHEMES = ("exponential", "heun", "exponential_all", "posterior")   # memoryless_step's schemes


def memoryless_step(path: AffinePath, v: Velocity, x: torch.Tensor, s: float, t: float,
                    noise: torch.Tensor | None, scheme: str = "exponential") -> torch.Tensor:
    """One step from s to t > s of the memoryless SDE dX = (2v − κ x) dt + σ(t) dW.

    scheme "exponential" (default): Euler–Maruyama with the linear part −κx integrated exactly
        (paths.exponential_coefficients): X_t = (α_s/α_t) x + w·2v(x, s) + std ξ. The plain
        Euler step x + h(2v − x/s) is unstable for h ≳ s (κ = 1/s), and its discrete adjoint
        Π(1 − h/t_j) misses the continuous one by O(h/t) at small t; this step has neither
        problem and starts at t = 0 with no clipping. The step that ends at t = 1 is the
        posterior step below (X_1 = ŷ): near t = 1 the velocity of sharp data grows like
        (y − x)/(1 − t) and an explicit step overshoots, while ŷ is exact there.
    scheme "heun": the exponential step as a predictor, then v interpolated linearly between
        v(x, s) and v at the predicted end point (an exponential trapezoid rule, the same noise ξ):
            X_t = (α_s/α_t) x + 2[(w − w₁) v(x, s) + w₁ v(X̃_t, t)] + std ξ   (paths.trapezoid_weight).
        Two network calls a step and second order in h: the exponential step's weak error is first
        order (a N(0, 1) base drawn with 16 steps has variance 0.86; with "heun", 0.99 — see
        benchmarks/sde_schemes.py). The step into t = 1 is the posterior step, as for "exponential".
    scheme "exponential_all": the exponential step on every step, the one into t = 1 included,
        so that every transition X_t | X_s is Gaussian with a density (the path estimators of
        estimators.py need them).
    scheme "posterior": the Gaussian DDPM posterior step (paths.posterior_coefficients)
        X_t = c x + (α_t − c α_s) ŷ + std ξ,  ŷ = E[x1 | x] from v(x, s). Exact for point-mass
        data but it ignores the spread of x1 given x and under-disperses (−3 % variance at 50
        steps on a 1-D mixture).
    noise: standard normal like x, or None for the noise-free (mean) step.
    """
    one_of(scheme, "scheme", SCHEMES)
    s, t = float(s), float(t)
    vs = v(x, _tvec(torch.as_tensor(s), x))
    if scheme == "exponential_all" or (scheme in ("exponential", "heun") and t < 1.0):
        decay, w, std = path.exponential_coefficients(s, t)
        out = decay * x + (2.0 * w) * vs
        if scheme == "heun":
            pred = out if noise is None or std == 0.0 else out + std * noise     # X̃_t
            w1 = path.trapezoid_weight(s, t)
            out = decay * x + 2.0 * ((w - w1) * vs + w1 * v(pred, _tvec(torch.as_tensor(t), x)))
    else:           # "posterior", and the step into t = 1 of "exponential" and "heun"
        c, std = path.posterior_coefficients(s, t)
        a_s, a_t = float(path.alpha(torch.tensor(s))), float(path.alpha(torch.tensor(t)))
        y = path.velocity_to_x1(vs, x, torch.tensor(s, dtype=x.dtype))
        out = c * x + (a_t - c * a_s) * y
    return out if noise is None or std == 0.0 else out + std * noise


def memoryless_solve(path: AffinePath, v: Velocity, x: torch.Tensor, grid: torch.Tensor,
                     generator: torch.Generator | None = None, scheme: str = "exponential",
                     return_trajectory: bool = False):
    """Simulate the memoryless SDE with velocity v from x = X_{grid[0]} over an increasing grid.

    Returns X at grid[-1], or (trajectory (len(grid), batch, *dims), grid).
    """
    traj = [x] if return_trajectory else None
    for i in range(len(grid) - 1):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = memoryless_step(path, v, x, float(grid[i]), float(grid[i + 1]), noise, scheme)
        if traj is not None:
            traj.append(x)
    return (torch.stack(traj), grid) if return_trajectory else x


# --- divergence and log-likelihood ----------------------------------------------------------------

def divergence(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, exact: bool = True,
               n_samples: int = 1, generator: torch.Generator | None = None, create_graph: bool = False):
    """Return (f(x), div f(x)) with div: (batch,).

    exact: sum of ∂f_i/∂x_i by one autograd pass per dimension (use for small dims);
    otherwise Hutchinson's estimator E_ε[εᵀ (∂f/∂x) ε] with Rademacher ε, `n_samples` probes.
    create_graph: keep both outputs differentiable in x (e.g. ∇_x log p); default detached.
    """
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        fx = f(x)
        flat_f, flat_x_dim = fx.reshape(x.shape[0], -1), x[0].numel()
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if exact:
            for i in range(flat_x_dim):
                g = torch.autograd.grad(flat_f[:, i].sum(), x, retain_graph=True, create_graph=create_graph)[0]
                div = div + g.reshape(x.shape[0], -1)[:, i]
        else:
            for _ in range(n_samples):
                eps = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
                g = torch.autograd.grad((fx * eps).sum(), x, retain_graph=True, create_graph=create_graph)[0]
                div = div + (g * eps).reshape(x.shape[0], -1).sum(1) / n_samples
    return (fx, div) if create_graph else (fx.detach(), div.detach())


def log_prob(v: Velocity, x1: torch.Tensor, grid: torch.Tensor, exact: bool = True,
             n_samples: int = 1, generator: torch.Generator | None = None,
             create_graph: bool = False) -> torch.Tensor:
    """log p_1(x1) of the flow dx/dt = v by the instantaneous change of variables.

    d/dt log p_t(x_t) = −div v(x_t, t), so log p_1(x1) = log N(x0; 0, I) − ∫_0^1 div v dt, with
    the ODE integrated backward from t = 1 (Heun for both x and the integral).
    x1: (batch, *dims); grid: increasing (steps + 1,); returns (batch,).
    create_graph: the result stays differentiable in x1 (∇_x log p by autograd); default detached.
    """
    x = x1 if create_graph else x1.detach()
    acc = torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device)
    rev = grid.flip(0)
    for i in range(len(rev) - 1):
        s, t = rev[i], rev[i + 1]
        h = t - s  # negative
        k1, d1 = divergence(lambda z: v(z, _tvec(s, z)), x, exact, n_samples, generator, create_graph)
        k2, d2 = divergence(lambda z: v(z, _tvec(t, z)), x + h * k1, exact, n_samples, generator, create_graph)
        x = x + 0.5 * h * (k1 + k2)
        acc = acc + 0.5 * h * (d1 + d2)  # ∫_1^0 div v dt = −∫_0^1 div v dt
    d = x[0].numel()
    log_p0 = -0.5 * x.reshape(x.shape[0], -1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    return log_p0 + acc
