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
  The weight is unbiased for Z = ∫γ for any forward chain (no discretisation bias): E_Q[w] = Z.
  Its log, log Ẑ = log mean w, is consistent for log Z but biased low at finite n (Jensen:
  E log Ẑ ≤ log E Ẑ; to first order by −Var(w)/(2nZ²)).

The unified paper (Domingo-Enrich, Du, Albergo 2026) states its own Crooks and Jarzynski
identities for the tilt; its full text was not available to us, so these are the exact
discrete-time identities above, derived here. Both give dP/dQ = e^{W − log Z}, hence
E_Q[W] = log Z − KL(Q‖P) ≤ log Z (reported as `elbo`), and W ≡ log Z when Q = P.

**Two-sided** (`crooks_two_sided`, `bar`): when samples of the target γ/Z are also at hand
(long MCMC, exact samples), the reverse law P can be *sampled*: X_1 ~ γ/Z, then the noising
kernels B down to t = 0. The same W evaluated on these P-paths obeys E_P[e^{−W}] = 1/Z (the
Crooks relation p_P(W) = p_Q(W) e^{W − log Z}), and E_P[W] = log Z + KL(P‖Q) ≥ log Z (`eubo`).
Bennett's acceptance ratio pools both directions: log Z = C solves
    Σ_{i∈F} σ(W_i − C − M) = Σ_{j∈R} σ(C + M − W_j),    M = log(n_F/n_R),  σ = logistic,
the maximum-likelihood estimate given the works (Bennett 1976; Shirts, Bair, Hooker & Pande 2003).
Of the unified paper only the abstract was available to us (it names Crooks and Jarzynski
identities, no two-sided estimator) and the Adjoint Sampling paper's text was not found, so this
follows Bennett / Shirts et al.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import integrators
from .metrics import effective_sample_size
from .models.flow_model import FlowModel
from .validation import positive, positive_int

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
    v = _velocity64(model, cond, project)
    for i in range(len(grid) - 1):
        s, t = float(grid[i]), float(grid[i + 1])
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        if project is not None:
            xi = project(xi)
        x = integrators.memoryless_step(model.path, v, x, s, t, xi, scheme="exponential_all")
        std = model.path.exponential_coefficients(s, t)[2]
        log_q += -0.5 * xi.reshape(n, -1).pow(2).sum(1) - dof * (math.log(std) + 0.5 * _LOG2PI)
        xs.append(x)
    return torch.stack(xs), log_q


def _velocity64(model: FlowModel, cond, project: Callable | None):
    """model's velocity as a float64 callable (x, t) for float64 paths: the network runs in the
    default dtype; the velocity is projected like the path."""
    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dt = torch.get_default_dtype()
        out = model.velocity(x.to(dt), t.to(dt), cond).to(torch.float64)
        return out if project is None else project(out)
    return v


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
    v = _velocity64(base, cond, project)
    for i in range(len(grid) - 1):
        # the density of integrators.memoryless_step(..., scheme="exponential_all"); its mean is
        # spelled out here so that the residual keeps its rounding (the step's mean differs in ulps)
        s, t = float(grid[i]), float(grid[i + 1])
        decay, w, std = base.path.exponential_coefficients(s, t)
        res = xs[i + 1] - decay * xs[i] - 2.0 * w * v(xs[i], torch.full((n,), s, dtype=torch.float64, device=xs.device))
        out += -0.5 * res.reshape(n, -1).pow(2).sum(1) / std**2 - dof * (math.log(std) + 0.5 * _LOG2PI)
    return out


def _noising_kernel(path, s: float, t: float) -> tuple[float, float]:
    """(α_s/α_t, (β_s² − (α_s/α_t)² β_t²)^{1/2}): mean factor and std of B(X_s | X_t), s < t."""
    f = lambda g, u: float(g(torch.tensor(u, dtype=torch.float64)))  # noqa: E731
    ratio = f(path.alpha, s) / f(path.alpha, t)
    return ratio, math.sqrt(max(f(path.beta, s) ** 2 - ratio**2 * f(path.beta, t) ** 2, 0.0))


def noising_log_path(path, xs: torch.Tensor, grid: torch.Tensor, project: Callable | None = None) -> torch.Tensor:
    """Σ_i log B(X_i | X_{i+1}) of the backward noising kernels; returns (n,) float64.

    B(X_s | X_t) = N((α_s/α_t) X_t, (β_s² − (α_s/α_t)² β_t²) I); at s = 0 of rectified flow this
    is N(0, I), the prior.
    """
    n, dof = xs.shape[1], _dof(xs[0], project)
    out = torch.zeros(n, dtype=torch.float64, device=xs.device)
    for i in range(len(grid) - 1):
        ratio, std = _noising_kernel(path, float(grid[i]), float(grid[i + 1]))
        res = xs[i] - ratio * xs[i + 1]
        out += -0.5 * res.reshape(n, -1).pow(2).sum(1) / std**2 - dof * (math.log(std) + 0.5 * _LOG2PI)
    return out


def _prior_log_prob(x0: torch.Tensor, project) -> torch.Tensor:
    dof = _dof(x0, project)
    return -0.5 * x0.reshape(len(x0), -1).pow(2).sum(1) - 0.5 * dof * _LOG2PI


def _check(model, n, steps):
    if not isinstance(model, FlowModel):
        raise ValueError(f"model must be a tiltflow FlowModel, got {type(model).__name__}")
    positive_int(n, "n")
    positive_int(steps, "steps")


def jarzynski(model: FlowModel, base: FlowModel, reward: Callable, lam: float = 1.0, n: int = 4096,
              steps: int = 100, seed: int = 0, cond=None, project: Callable | None = None) -> PathWeights:
    """Jarzynski weights of `model`'s paths for the tilt p_base e^{r/λ}: estimates log E_base[e^{r/λ}].

    model: the fine-tuned sampler Q (model = base gives plain Monte Carlo, W = r/λ).
    Returns PathWeights over the terminal samples; log_Z, ess, elbo, expectation(f).
    """
    _check(model, n, steps)
    positive(lam, "lam")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    grid = integrators.time_grid(steps, dtype=torch.float64)
    xs, log_q = path_rollout(model, n, grid, gen, cond, project)
    log_p = base_log_path(base, xs, grid, cond, project)
    from .rewards import check_reward
    with torch.no_grad():
        r = check_reward(reward, xs[-1].to(torch.get_default_dtype()), cond=cond).to(torch.float64)
    return PathWeights(r / lam + log_p - log_q, xs[-1].to(torch.get_default_dtype()))


def crooks(model: FlowModel, log_density: Callable, n: int = 4096, steps: int = 100, seed: int = 0,
           cond=None, project: Callable | None = None) -> PathWeights:
    """Crooks weights of `model`'s paths against the noising process run backward from γ:
    estimates log ∫ γ(x) dx for an unnormalised log-density log γ (e.g. −E). Ẑ = mean w is
    unbiased for Z; log Ẑ (`.log_Z`) is consistent and biased low, by about −Var(w)/(2nZ²).

    log_density: x (n, *dims) -> (n,). With `project` (mean-free particles) the integral is over
    the projected subspace.
    """
    _check(model, n, steps)
    return _crooks_forward(model, log_density, n, steps, seed, cond, project)[0]


def _crooks_forward(model, log_density, n, steps, seed, cond, project):
    """(PathWeights of n model paths, the generator after them, the time grid): crooks' work."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    grid = integrators.time_grid(steps, dtype=torch.float64)
    xs, log_q = path_rollout(model, n, grid, gen, cond, project)
    weights = PathWeights(_crooks_log_w(model, log_density, xs, log_q, grid, project),
                          xs[-1].to(torch.get_default_dtype()))
    return weights, gen, grid


def _crooks_log_w(model, log_density, xs, log_q, grid, project) -> torch.Tensor:
    """W = log γ(X_1) + Σ log B(X_i | X_{i+1}) − log N(X_0; 0, I) − log q(path); (n,) float64."""
    n = xs.shape[1]
    with torch.no_grad():
        lg = log_density(xs[-1].to(torch.get_default_dtype())).to(torch.float64)
    if lg.shape != (n,) or torch.isnan(lg).any():
        raise ValueError(f"log_density must return finite values of shape ({n},), got {tuple(lg.shape)}")
    return lg + noising_log_path(model.path, xs, grid, project) - _prior_log_prob(xs[0], project) - log_q


@torch.no_grad()
def noising_rollout(path, x1: torch.Tensor, grid: torch.Tensor, generator: torch.Generator,
                    project: Callable | None = None) -> torch.Tensor:
    """Run the noising kernels backward from data x1 (n, *dims) at t = 1 to t = grid[0]:
    X_s = (α_s/α_t) X_t + (β_s² − (α_s/α_t)² β_t²)^{1/2} ξ, the law whose log density
    `noising_log_path` evaluates. Returns xs (steps + 1, n, *dims) float64 in forward time order.
    """
    x = x1.to(torch.float64)
    if project is not None:
        x = project(x)
    xs = [x]
    for i in range(len(grid) - 1, 0, -1):
        ratio, std = _noising_kernel(path, float(grid[i - 1]), float(grid[i]))
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        if project is not None:
            xi = project(xi)
        x = ratio * x + std * xi
        xs.append(x)
    return torch.stack(xs[::-1])


def _logmeanexp(a: torch.Tensor) -> float:
    return float(torch.logsumexp(a, 0) - math.log(len(a)))


def _works(w, name: str, bad_inf: float) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=torch.float64).detach().cpu()
    if w.ndim != 1 or len(w) < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 log-weights, got shape {tuple(w.shape)}")
    if torch.isnan(w).any() or (w == bad_inf).any():
        raise ValueError(f"{name} must not contain NaN or {bad_inf}, got {int(torch.isnan(w).sum())} NaN "
                         f"and {int((w == bad_inf).sum())} {bad_inf}")
    if not torch.isfinite(w).any():
        raise ValueError(f"{name} has no finite entry")
    return w


def bar(w_forward, w_reverse) -> tuple[float, float]:
    """Bennett acceptance ratio: log Z from the same log-weight W = log dP̃/dQ (mass of P̃ = Z)
    evaluated on n_F paths of Q (`w_forward`) and on n_R paths of P = P̃/Z (`w_reverse`).

    (In thermodynamic terms the forward work is −w_forward and the reverse work is w_reverse.)
    w_forward: (n_F,), entries finite or −inf; w_reverse: (n_R,), entries finite or +inf (those
    paths get weight 0 in their direction, exactly). Returns (log Z, standard error), floats.

    Solves Σ_F σ(W_i − C − M) = Σ_R σ(C + M − W_j), M = log(n_F/n_R) (Bennett 1976 with the
    optimal constant; the maximum-likelihood form of Shirts et al. 2003) by safeguarded Newton in
    float64; the left side minus the right is strictly decreasing in C, so the root is unique.
    Standard error: Bennett's asymptotic variance Var_F(σ_F)/(n_F ⟨σ_F⟩²) + Var_R(σ_R)/(n_R ⟨σ_R⟩²)
    with σ_F = σ(W_i − C − M), σ_R = σ(C + M − W_j) (the delta method on Z = ⟨σ_F⟩ e^C/⟨σ_R⟩·n_F/n_R;
    at the root it agrees asymptotically with the sandwich variance of the estimating equation);
    unreliable when the two work histograms do not overlap.
    """
    wf, wr = _works(w_forward, "w_forward", math.inf), _works(w_reverse, "w_reverse", -math.inf)
    nf, nr = len(wf), len(wr)
    m = math.log(nf / nr)

    def g(c):  # estimating equation and its derivative in C
        u, v = torch.sigmoid(wf - c - m), torch.sigmoid(c + m - wr)
        return float(u.sum() - v.sum()), -float((u * (1 - u)).sum() + (v * (1 - v)).sum())

    # bracket: at C = min W − M − L every forward term ≥ σ(L) and every reverse term ≤ σ(−L), so
    # g > 0 once e^L > n_R/n_F; symmetrically at the top
    finite = torch.cat([wf[torch.isfinite(wf)], wr[torch.isfinite(wr)]])
    pad = abs(m) + 1.0
    lo, hi = float(finite.min()) - m - pad, float(finite.max()) - m + pad
    c = min(max(0.5 * (_logmeanexp(wf) - _logmeanexp(-wr)), lo), hi)
    if not math.isfinite(c):
        c = 0.5 * (lo + hi)
    for _ in range(200):
        val, dval = g(c)
        if val == 0.0:
            break
        if val > 0:
            lo = c
        else:
            hi = c
        step = -val / dval if dval < 0 else math.inf
        c_new = c + step
        if not lo < c_new < hi:   # Newton left the bracket: bisect instead
            c_new = 0.5 * (lo + hi)
        if abs(c_new - c) < 1e-12 * (1.0 + abs(c)) or hi - lo < 1e-12 * (1.0 + abs(c)):
            c = c_new
            break
        c = c_new
    # log-space moments so that tiny σ's (poor overlap) do not underflow
    ls_f = torch.nn.functional.logsigmoid(wf - c - m)
    ls_r = torch.nn.functional.logsigmoid(c + m - wr)
    rel_f = math.exp(_logmeanexp(2 * ls_f) - 2 * _logmeanexp(ls_f)) - 1.0   # Var/mean²
    rel_r = math.exp(_logmeanexp(2 * ls_r) - 2 * _logmeanexp(ls_r)) - 1.0
    return c, math.sqrt(max(rel_f, 0.0) / nf + max(rel_r, 0.0) / nr)


@dataclass
class TwoSidedWeights:
    """Forward (Q-path) and reverse (P-path) log-weights W of one Crooks pair and their BAR log Z.

    forward: PathWeights of the model's paths (its log_Z is the one-sided forward estimate);
    log_w_reverse: W on the target's noising paths (n_R,) float64; x_reverse: their X_1.
    """
    log_Z: float
    stderr: float
    forward: PathWeights
    log_w_reverse: torch.Tensor
    x_reverse: torch.Tensor

    @property
    def log_Z_forward(self) -> float:
        """One-sided: log mean_Q e^W (biased low for small n)."""
        return self.forward.log_Z

    @property
    def log_Z_reverse(self) -> float:
        """One-sided: −log mean_P e^{−W} (biased high for small n)."""
        return -_logmeanexp(-self.log_w_reverse)

    @property
    def ess_forward(self) -> float:
        return self.forward.ess

    @property
    def ess_reverse(self) -> float:
        """Kish ESS of the reverse weights dQ/dP ∝ e^{−W}."""
        return effective_sample_size(-self.log_w_reverse)

    @property
    def elbo(self) -> float:
        """E_Q[W] ≤ log Z."""
        return self.forward.elbo

    @property
    def eubo(self) -> float:
        """E_P[W] = log Z + KL(P‖Q) ≥ log Z."""
        return float(self.log_w_reverse.mean())

    def summary(self) -> dict:
        return {"log_Z": self.log_Z, "stderr": self.stderr, "log_Z_forward": self.log_Z_forward,
                "log_Z_reverse": self.log_Z_reverse, "ess_forward": self.ess_forward,
                "ess_reverse": self.ess_reverse, "elbo": self.elbo, "eubo": self.eubo,
                "n_forward": len(self.forward.log_w), "n_reverse": len(self.log_w_reverse)}


def crooks_two_sided(model: FlowModel, log_density: Callable, target_samples: torch.Tensor, n: int = 4096,
                     steps: int = 100, seed: int = 0, cond=None, project: Callable | None = None
                     ) -> TwoSidedWeights:
    """Two-sided Crooks estimate of log ∫ γ: n forward paths of `model` (exactly those of
    `crooks(model, log_density, n, steps, seed)`) and one reverse path per target sample, noised
    backward with the same kernels B; log Z by `bar`, with the one-sided estimates and ESS.

    target_samples: (n_R, *model.shape), samples of γ/Z (exact, or long MCMC); projected with
    `project` if given. log_density: x (n, *dims) -> (n,).
    """
    _check(model, n, steps)
    y = target_samples
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"target_samples must be a tensor (n_R, {', '.join(map(str, model.shape))}), "
                         f"got {type(y).__name__}")
    if y.ndim != len(model.shape) + 1 or tuple(y.shape[1:]) != model.shape or len(y) < 2:
        raise ValueError(f"target_samples must have shape (n_R ≥ 2, {', '.join(map(str, model.shape))}), "
                         f"got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError(f"target_samples must be finite, got {int((~torch.isfinite(y)).sum())} non-finite entries")
    forward, gen, grid = _crooks_forward(model, log_density, n, steps, seed, cond, project)
    # reverse paths continue the same random stream, so they are independent of the forward ones
    ys = noising_rollout(model.path, y.to(model.device), grid, gen, project)
    log_q_rev = base_log_path(model, ys, grid, cond, project)    # the model's density of the P-paths
    log_w_rev = _crooks_log_w(model, log_density, ys, log_q_rev, grid, project)
    log_Z, se = bar(forward.log_w, log_w_rev)
    return TwoSidedWeights(log_Z, se, forward, log_w_rev, ys[-1].to(torch.get_default_dtype()))
