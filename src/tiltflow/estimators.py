"""Importance weights and log-normalisers from trajectories: Jarzynski and Crooks estimators.

The tilt p*(x) ∝ p_base(x) e^{r(x)/λ} has normaliser Z = E_base[e^{r/λ}]. A fine-tuned (or any)
model Q samples paths X_0, ..., X_N of its memoryless chain; every step is Gaussian,

    X_{i+1} = (α_i/α_{i+1}) X_i + 2 w_i v(X_i, t_i) + std_i ξ_i        (paths.exponential_coefficients)

(the exponential-integrator step, used here all the way to t = 1 so that every transition has a
density). Two reference path laws P give weights w = dP/dQ with E_Q[w] = Z exactly for the chain:

* **Jarzynski** (fine-tuning; the base density is unknown): P = base chain tilted at the end,
      log w = r(X_1)/λ + Σ_i log p_base(X_{i+1} | X_i) − Σ_i log q(X_{i+1} | X_i),
  the discrete Girsanov form of the work W = r/λ − ½∫‖u‖² dt − ∫u·dB (research memo
  algorithms2 §2b). It estimates log E[e^{r/λ}] under the *discretised* base chain: its bias is
  the discretisation error of the base sampler (small at 100 steps, measured in the tests).
* **Crooks** (sampling; an unnormalised density γ is known): P runs *backward* from γ/Z through
  the fixed noising kernels X_s | X_t ~ N((α_s/α_t) X_t, β_s² − (α_s/α_t)² β_t²), which are the
  time reversal of the memoryless process (any data law), so
      log w = log γ(X_1) + Σ_i log B(X_i | X_{i+1}) − log N(X_0; 0, I) − Σ_i log q(X_{i+1} | X_i).
  Unbiased for Z = ∫γ for any forward chain: no discretisation bias, only variance.

The unified paper (Domingo-Enrich, Du, Albergo 2026) states its own Crooks and Jarzynski
identities for the tilt; its full text was not available to us, so these are the exact
discrete-time identities above, derived here. Both give dP/dQ = e^{W − log Z}, hence
E_Q[W] = log Z − KL(Q‖P) ≤ log Z (reported as `elbo`), and W ≡ log Z when Q = P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .metrics import effective_sample_size
from .models.flow_model import FlowModel

_LOG2PI = math.log(2 * math.pi)


@dataclass
class PathWeights:
    """Log importance weights log_w (n,) float64 of terminal samples x (n, *dims)."""
    log_w: torch.Tensor
    x: torch.Tensor

    @property
    def log_Z(self) -> float:
        """log Ẑ = log mean exp(log_w) (consistent; its bias is −Var/(2n·Z²) to first order)."""
        return float(torch.logsumexp(self.log_w, 0) - math.log(len(self.log_w)))

    @property
    def ess(self) -> float:
        """Kish effective sample size in [1, n]."""
        return effective_sample_size(self.log_w)

    @property
    def ess_fraction(self) -> float:
        return self.ess / len(self.log_w)

    @property
    def elbo(self) -> float:
        """E_Q[W] = log Z − KL(Q‖P) ≤ log Z (Jensen)."""
        return float(self.log_w.mean())

    @property
    def weights(self) -> torch.Tensor:
        """Self-normalised weights (n,) summing to one."""
        return torch.softmax(self.log_w, 0)

    def expectation(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Self-normalised estimate of E_P[f(X_1)]; f: (n, *dims) -> (n, ...)."""
        fx = f(self.x).to(torch.float64)
        return torch.tensordot(self.weights, fx, dims=1)

    def summary(self) -> dict:
        return {"log_Z": self.log_Z, "ess": self.ess, "ess_fraction": self.ess_fraction,
                "elbo": self.elbo, "n": len(self.log_w)}


def _gauss_logpdf(res: torch.Tensor, std: float) -> torch.Tensor:
    """log N(res; 0, std² I) summed over all but the batch dimension; float64 (batch,)."""
    d = res[0].numel()
    return (-0.5 * res.reshape(len(res), -1).pow(2).sum(1) / std**2
            - d * (math.log(std) + 0.5 * _LOG2PI))


@torch.no_grad()
def path_rollout(model: FlowModel, n: int, grid: torch.Tensor, generator: torch.Generator,
                 cond=None, project: Callable | None = None, x0: torch.Tensor | None = None):
    """Sample n paths of the memoryless chain of `model` with exponential steps up to t = 1.

    Returns (xs (steps + 1, n, *dims) float64, log_q (n,) float64 = Σ_i log q(X_{i+1} | X_i)).
    `project` (e.g. removing the centre of mass) is applied to X_0, to every velocity and noise;
    densities are then densities on the projected subspace (`dof` = its dimension).
    """
    x = model.prior(n, generator).to(torch.float64) if x0 is None else x0.to(torch.float64)
    if project is not None:
        x = project(x)
    xs, log_q = [x], torch.zeros(n, dtype=torch.float64, device=x.device)
    dof = _dof(x, project)
    for i in range(len(grid) - 1):
        s, t = float(grid[i]), float(grid[i + 1])
        decay, w, std = model.path.exponential_coefficients(s, t)
        v = model.velocity(x.to(torch.get_default_dtype()), s, cond).to(torch.float64)
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        if project is not None:
            v, xi = project(v), project(xi)
        x = decay * x + 2.0 * w * v + std * xi
        log_q += -0.5 * xi.reshape(n, -1).pow(2).sum(1) / 1.0 - dof * (math.log(std) + 0.5 * _LOG2PI)
        xs.append(x)
    return torch.stack(xs), log_q


def _dof(x, project):
    if project is None:
        return x[0].numel()
    # dimension of the projected subspace: rank of the projection, from a probe
    probe = project(torch.eye(x[0].numel(), dtype=torch.float64).reshape(-1, *x.shape[1:]))
    return int(torch.linalg.matrix_rank(probe.reshape(probe.shape[0], -1)))


@torch.no_grad()
def base_log_path(base: FlowModel, xs: torch.Tensor, grid: torch.Tensor, cond=None,
                  project: Callable | None = None) -> torch.Tensor:
    """Σ_i log p_base(X_{i+1} | X_i) of given paths xs (steps + 1, n, *dims); returns (n,) float64."""
    n, dof = xs.shape[1], _dof(xs[0], project)
    out = torch.zeros(n, dtype=torch.float64, device=xs.device)
    for i in range(len(grid) - 1):
        s, t = float(grid[i]), float(grid[i + 1])
        decay, w, std = base.path.exponential_coefficients(s, t)
        v = base.velocity(xs[i].to(torch.get_default_dtype()), s, cond).to(torch.float64)
        if project is not None:
            v = project(v)
        res = xs[i + 1] - decay * xs[i] - 2.0 * w * v
        out += -0.5 * res.reshape(n, -1).pow(2).sum(1) / std**2 - dof * (math.log(std) + 0.5 * _LOG2PI)
    return out


def noising_log_path(path, xs: torch.Tensor, grid: torch.Tensor, project: Callable | None = None) -> torch.Tensor:
    """Σ_i log B(X_i | X_{i+1}) of the backward noising kernels; returns (n,) float64.

    B(X_s | X_t) = N((α_s/α_t) X_t, (β_s² − (α_s/α_t)² β_t²) I); at s = 0 of rectified flow this
    is N(0, I), the prior.
    """
    n, dof = xs.shape[1], _dof(xs[0], project)
    out = torch.zeros(n, dtype=torch.float64, device=xs.device)
    f = lambda g, u: float(g(torch.tensor(u, dtype=torch.float64)))  # noqa: E731
    for i in range(len(grid) - 1):
        s, t = float(grid[i]), float(grid[i + 1])
        ratio = f(path.alpha, s) / f(path.alpha, t)
        std = math.sqrt(max(f(path.beta, s) ** 2 - ratio**2 * f(path.beta, t) ** 2, 0.0))
        res = xs[i] - ratio * xs[i + 1]
        out += -0.5 * res.reshape(n, -1).pow(2).sum(1) / std**2 - dof * (math.log(std) + 0.5 * _LOG2PI)
    return out


def _prior_log_prob(x0: torch.Tensor, project) -> torch.Tensor:
    dof = _dof(x0, project)
    return -0.5 * x0.reshape(len(x0), -1).pow(2).sum(1) - 0.5 * dof * _LOG2PI


def _check(model, n, steps):
    if not isinstance(model, FlowModel):
        raise ValueError(f"model must be a tiltflow FlowModel, got {type(model).__name__}")
    for name, v in (("n", n), ("steps", steps)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def jarzynski(model: FlowModel, base: FlowModel, reward: Callable, lam: float = 1.0, n: int = 4096,
              steps: int = 100, seed: int = 0, cond=None, project: Callable | None = None) -> PathWeights:
    """Jarzynski weights of `model`'s paths for the tilt p_base e^{r/λ}: estimates log E_base[e^{r/λ}].

    model: the fine-tuned sampler Q (model = base gives plain Monte Carlo, W = r/λ).
    Returns PathWeights over the terminal samples; log_Z, ess, elbo, expectation(f).
    """
    _check(model, n, steps)
    if not lam > 0:
        raise ValueError(f"lam must be positive, got {lam}")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    xs, log_q = path_rollout(model, n, grid, gen, cond, project)
    log_p = base_log_path(base, xs, grid, cond, project)
    from .rewards import check_reward
    with torch.no_grad():
        r = check_reward(reward, xs[-1].to(torch.get_default_dtype()), cond=cond).to(torch.float64)
    return PathWeights(r / lam + log_p - log_q, xs[-1].to(torch.get_default_dtype()))


def crooks(model: FlowModel, log_density: Callable, n: int = 4096, steps: int = 100, seed: int = 0,
           cond=None, project: Callable | None = None) -> PathWeights:
    """Crooks weights of `model`'s paths against the noising process run backward from γ:
    estimates log ∫ γ(x) dx for an unnormalised log-density log γ (e.g. −E), without bias.

    log_density: x (n, *dims) -> (n,). With `project` (mean-free particles) the integral is over
    the projected subspace.
    """
    _check(model, n, steps)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    xs, log_q = path_rollout(model, n, grid, gen, cond, project)
    with torch.no_grad():
        lg = log_density(xs[-1].to(torch.get_default_dtype())).to(torch.float64)
    if lg.shape != (n,) or torch.isnan(lg).any():
        raise ValueError(f"log_density must return finite values of shape ({n},), got {tuple(lg.shape)}")
    log_w = lg + noising_log_path(model.path, xs, grid, project) - _prior_log_prob(xs[0], project) - log_q
    return PathWeights(log_w, xs[-1].to(torch.get_default_dtype()))
