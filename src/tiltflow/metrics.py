"""Sample-based metrics: distances between samples, tail statistics of rewards, importance
weights and Gaussian closed forms.

All functions take torch tensors. Metrics that summarise a sample return Python floats and
compute in float64 without building an autograd graph; `log_mean_exp` returns a tensor and is
differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .validation import in_interval, one_of, positive_int

# Largest number of pairwise distances held in memory at once (float64: 32 MB per block).
_PAIR_BLOCK = 2**22


def _samples(x: torch.Tensor, name: str, min_n: int = 1) -> torch.Tensor:
    """Check a sample x: (n, *dims) and return it detached as float64 (n, d)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have shape (n, *dims) with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}; use x[:, None] for a 1-D sample"
        )
    if x.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} samples, got {x.shape[0]}")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    bad = int((~torch.isfinite(x)).any(dim=1).sum())
    if bad:
        raise ValueError(f"{name} has {bad} samples with NaN or inf entries")
    return x


def _values(r: torch.Tensor, name: str, min_n: int = 1) -> torch.Tensor:
    """Check a 1-D sample r: (n,) of finite values and return it detached as float64."""
    if not isinstance(r, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(r).__name__}")
    if r.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got shape {tuple(r.shape)}")
    if r.shape[0] < min_n:
        raise ValueError(f"{name} needs at least {min_n} values, got {r.shape[0]}")
    r = r.detach().to(torch.float64)
    bad = int((~torch.isfinite(r)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} NaN or inf values")
    return r


def _log_weights(log_w: torch.Tensor) -> None:
    """Check log-weights (n,): -inf (zero weight) is allowed, NaN and +inf are not."""
    if not isinstance(log_w, torch.Tensor):
        raise ValueError(f"log_w must be a torch.Tensor, got {type(log_w).__name__}")
    if log_w.ndim != 1 or log_w.shape[0] == 0:
        raise ValueError(f"log_w must have shape (n,) with n >= 1, got shape {tuple(log_w.shape)}")
    if torch.isnan(log_w).any() or (log_w == math.inf).any():
        raise ValueError("log_w contains NaN or +inf; log-weights must be finite or -inf")
    if not torch.isfinite(log_w).any():
        raise ValueError("log_w has no finite entry; at least one weight must be positive")


def _sum_distances(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
    """Σ_ij |a_i − b_j| over a: (n, d), b: (m, d) in row blocks; `same` drops i = j."""
    n, m = a.shape[0], b.shape[0]
    rows = max(1, _PAIR_BLOCK // max(m, 1))
    total = 0.0
    for start in range(0, n, rows):
        block = torch.cdist(a[start : start + rows], b)
        if same:
            # the matrix-product form of cdist leaves ~1e-8 instead of 0 on the diagonal
            i = torch.arange(block.shape[0], device=block.device)
            block[i, start + i] = 0.0
        total += float(block.sum())
    return total


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance between two samples (Székely & Rizzo), in its squared form

        D²(P, Q) = 2 E|X − Y| − E|X − X'| − E|Y − Y'|,

    with U-statistics (distinct pairs) for the within-sample terms, so the estimate is unbiased
    and can be slightly negative when P = Q. Distances are summed in blocks, so n = m = 5000
    needs only tens of megabytes.

    x: (n, *dims), y: (m, *dims) with the same number of entries per sample; n, m >= 2.
    Returns a float.
    """
    x = _samples(x, "x", min_n=2)
    y = _samples(y, "y", min_n=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    xy = _sum_distances(x, y, same=False) / (n * m)
    xx = _sum_distances(x, x, same=True) / (n * (n - 1))
    yy = _sum_distances(y, y, same=True) / (m * (m - 1))
    return 2.0 * xy - xx - yy


def quantile_grid(n: int, m: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merged grid {i/n} ∪ {j/m} of two empirical quantile functions, on which both are
    constant between consecutive breakpoints: (du, ix, iy), the interval widths (k,) float64 and,
    per interval, the index into n and into m sorted values, so that
    ∫₀¹ f(F_x⁻¹(u), F_y⁻¹(u)) du = Σ du·f(x_sorted[ix], y_sorted[iy])."""
    f64 = torch.float64
    ends = torch.cat([torch.arange(1, n + 1, dtype=f64, device=device) / n,
                      torch.arange(1, m + 1, dtype=f64, device=device) / m])
    ends = torch.unique(ends)  # sorted; last entry is exactly 1
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    mid = (starts + ends) / 2
    ix = torch.floor(mid * n).long().clamp(max=n - 1)
    iy = torch.floor(mid * m).long().clamp(max=m - 1)
    return ends - starts, ix, iy


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    n_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced 2-Wasserstein distance

        SW₂(P, Q) = ( E_θ W₂²(θ·P, θ·Q) )^½,   θ uniform on the unit sphere,

    estimated with `n_projections` random directions. Each 1-D W₂² is exact for the two
    empirical measures: ∫₀¹ (F_x⁻¹(u) − F_y⁻¹(u))² du over the merged grid {i/n} ∪ {j/m}, so
    n ≠ m is handled without interpolation.

    x: (n, *dims), y: (m, *dims) with the same number of entries per sample.
    Returns a float.
    """
    x = _samples(x, "x")
    y = _samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    positive_int(n_projections, "n_projections")
    n, m, d = x.shape[0], y.shape[0], x.shape[1]

    device = generator.device if generator is not None else x.device
    theta = torch.randn(n_projections, d, generator=generator, dtype=torch.float64, device=device)
    theta = theta.to(x.device)
    theta = theta / theta.norm(dim=1, keepdim=True)
    px = torch.sort(x @ theta.T, dim=0).values  # (n, P)
    py = torch.sort(y @ theta.T, dim=0).values  # (m, P)

    du, ix, iy = quantile_grid(n, m, x.device)
    w2_sq = (du[:, None] * (px[ix] - py[iy]) ** 2).sum(dim=0)  # (P,)
    return math.sqrt(float(w2_sq.mean()))


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance over distinct pairs, (1 / n(n−1)) Σ_{i≠j} |x_i − x_j|; a
    diversity measure. Computed in blocks.

    x: (n, *dims), flattened per sample; n >= 2. Returns a float.
    """
    x = _samples(x, "x", min_n=2)
    n = x.shape[0]
    return _sum_distances(x, x, same=True) / (n * (n - 1))


def cvar(r: torch.Tensor, level: float, tail: str = "right") -> float:
    """Empirical conditional value at risk of a sample r at tail mass β = `level`.

    right: mean of the top β fraction, CVaR⁺_β = min_η { η + E(r − η)₊ / β };
    left:  mean of the bottom β fraction, CVaR⁻_β = max_η { η − E(η − r)₊ / β }.

    The sample at the β boundary enters with its fractional weight, so the value is exact for
    the empirical distribution (Rockafellar–Uryasev at the empirical quantile η).

    r: (n,). level in (0, 1]; tail "right" or "left". Returns a float.
    """
    r = _values(r, "r")
    level = in_interval(level, "level", 0.0, 1.0)   # β, the tail mass: (0, 1]
    one_of(tail, "tail", ("right", "left"))
    s = torch.sort(r, descending=(tail == "right")).values
    k = level * s.shape[0]  # tail mass measured in samples
    # weight of the i-th sample from the tail end: 1 inside, fractional at the boundary, 0 after
    w = (k - torch.arange(s.shape[0], dtype=torch.float64, device=s.device)).clamp(0.0, 1.0)
    return float((w * s).sum() / k)


def _percent_key(p: float) -> str:
    """0.05 -> '05', 0.5 -> '50', 0.025 -> '2_5'."""
    pct = 100.0 * p
    if abs(pct - round(pct)) < 1e-9:
        return f"{int(round(pct)):02d}"
    return f"{pct:g}".replace(".", "_")


def reward_summary(
    r: torch.Tensor,
    quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    level: float = 0.1,
) -> dict[str, float]:
    """Summary statistics of a reward sample, ready for a metrics JSON.

    Keys: "mean", "std" (unbiased), one "qPP" per quantile (0.05 -> "q05", linear
    interpolation as numpy), and "cvar_left_PP", "cvar_right_PP" at tail mass `level`
    (0.1 -> "cvar_left_10").

    r: (n,) with n >= 2. Returns a dict of floats.
    """
    r = _values(r, "r", min_n=2)
    level = in_interval(level, "level", 0.0, 1.0)
    qs = [in_interval(q, "quantiles", 0.0, 1.0, lo_open=False) for q in quantiles]
    out = {"mean": float(r.mean()), "std": float(r.std())}
    if qs:
        values = torch.quantile(r, torch.tensor(qs, dtype=torch.float64, device=r.device))
        for q, v in zip(qs, values.tolist()):
            out[f"q{_percent_key(q)}"] = v
    key = _percent_key(level)
    out[f"cvar_left_{key}"] = cvar(r, level, tail="left")
    out[f"cvar_right_{key}"] = cvar(r, level, tail="right")
    return out


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """log( (1/n) Σ_i exp(log_w_i) ), stable for large |log_w|; differentiable.

    log_w: (n,), entries finite or -inf. Returns a scalar tensor.
    """
    _log_weights(log_w)
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def effective_sample_size(log_w: torch.Tensor) -> float:
    """Kish effective sample size (Σ w)² / Σ w² of importance weights w = exp(log_w),
    computed as exp(2 logsumexp(log_w) − logsumexp(2 log_w)) so any offset of log_w cancels.

    log_w: (n,), entries finite or -inf. Returns a float in [1, n].
    """
    _log_weights(log_w)
    lw = log_w.detach().to(torch.float64)
    ess = math.exp(float(2.0 * torch.logsumexp(lw, dim=0) - torch.logsumexp(2.0 * lw, dim=0)))
    return min(max(ess, 1.0), float(lw.shape[0]))


def _gaussian(mu: torch.Tensor, cov: torch.Tensor, mu_name: str, cov_name: str):
    """Check mu: (d,), cov: (d, d) symmetric positive definite; return (mu, Cholesky factor)."""
    for t, name in ((mu, mu_name), (cov, cov_name)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
    if mu.ndim != 1:
        raise ValueError(f"{mu_name} must have shape (d,), got shape {tuple(mu.shape)}")
    d = mu.shape[0]
    if cov.shape != (d, d):
        raise ValueError(f"{cov_name} must have shape ({d}, {d}), got shape {tuple(cov.shape)}")
    cov = cov.detach().to(torch.float64)
    if not torch.allclose(cov, cov.T, rtol=1e-5, atol=1e-8):
        raise ValueError(f"{cov_name} must be symmetric")
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError(f"{cov_name} must be positive definite (Cholesky failed)")
    return mu.detach().to(torch.float64), chol


def gaussian_kl(
    mu0: torch.Tensor, cov0: torch.Tensor, mu1: torch.Tensor, cov1: torch.Tensor
) -> float:
    """KL(N(μ₀, Σ₀) ‖ N(μ₁, Σ₁)) in closed form,

        ½ [ tr(Σ₁⁻¹Σ₀) + (μ₁ − μ₀)ᵀ Σ₁⁻¹ (μ₁ − μ₀) − d + ln det Σ₁ − ln det Σ₀ ].

    mu0, mu1: (d,); cov0, cov1: (d, d) symmetric positive definite. Returns a float.
    """
    mu0, l0 = _gaussian(mu0, cov0, "mu0", "cov0")
    mu1, l1 = _gaussian(mu1, cov1, "mu1", "cov1")
    if mu0.shape != mu1.shape:
        raise ValueError(
            f"mu0 and mu1 must have the same dimension, got {mu0.shape[0]} and {mu1.shape[0]}"
        )
    d = mu0.shape[0]
    # With Σ = L Lᵀ: tr(Σ₁⁻¹Σ₀) = ‖L₁⁻¹L₀‖²_F and the Mahalanobis term is ‖L₁⁻¹(μ₁ − μ₀)‖².
    m = torch.linalg.solve_triangular(l1, l0, upper=False)
    z = torch.linalg.solve_triangular(l1, (mu1 - mu0)[:, None], upper=False)
    logdet0 = 2.0 * torch.log(torch.diagonal(l0)).sum()
    logdet1 = 2.0 * torch.log(torch.diagonal(l1)).sum()
    kl = 0.5 * ((m**2).sum() + (z**2).sum() - d + logdet1 - logdet0)
    return float(kl)


def mean_and_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean and unbiased sample covariance (divisor n − 1).

    x: (n, d) with n >= 2. Returns (mean (d,), cov (d, d)) in the dtype of x (float32 for
    integer input), computed in float64.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n, d), got shape {tuple(x.shape)}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    x = _samples(x, "x", min_n=2)
    mean = x.mean(dim=0)
    xc = x - mean
    cov = xc.T @ xc / (x.shape[0] - 1)
    return mean.to(dtype), cov.to(dtype)
