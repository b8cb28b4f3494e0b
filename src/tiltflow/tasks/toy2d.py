"""Two-dimensional data distributions for pretraining and fine-tuning experiments.

`GaussianMixture` has a closed-form density and closed-form exponential tilts
p*(x) ∝ p(x) exp(r(x)/λ) for linear and quadratic rewards, so fine-tuned models can be checked
against the exact target. `TwoMoons`, `Checkerboard` and `Rings` are samplers for pictures.
All samplers expose `sample(n, generator=None) -> (n, 2)` and live on roughly [-3, 3]².
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import MappingProxyType

import torch

from ..validation import non_negative, positive, positive_int

_LOG_2PI = math.log(2.0 * math.pi)


def _device(generator: torch.Generator | None):
    """Samplers draw on their generator's device (the CPU without one)."""
    return None if generator is None else generator.device


def _as64(v) -> torch.Tensor:
    """A float64 tensor from a tensor, a nested sequence of numbers, or a sequence of tensors."""
    if isinstance(v, (list, tuple)) and v and all(isinstance(e, torch.Tensor) for e in v):
        return torch.stack([e.detach().to(torch.float64) for e in v])
    if isinstance(v, torch.Tensor):
        return v.detach().to(torch.float64)
    return torch.as_tensor(v, dtype=torch.float64)


def _vector(v, d: int, name: str) -> torch.Tensor:
    v = _as64(v)
    if v.shape != (d,):
        raise ValueError(f"{name} must have shape ({d},), got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf")
    return v


class GaussianMixture:
    """p(x) = Σ_k π_k N(x; μ_k, Σ_k).

    weights: (K,) non-negative, normalised here; means: (K, d); covs: (K, d, d) symmetric
    positive definite. Parameters are kept in float64 so that closed forms are accurate;
    `weights`, `means`, `covs`, samples and `mean()`/`cov()` are float32.
    """

    def __init__(self, weights, means, covs):
        w, mu, cov = _as64(weights), _as64(means), _as64(covs)
        if w.ndim != 1 or w.shape[0] == 0:
            raise ValueError(f"weights must have shape (K,), K >= 1, got shape {tuple(w.shape)}")
        k = w.shape[0]
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be finite, non-negative and not all zero, got {w.tolist()}"
            )
        if mu.ndim != 2 or mu.shape[0] != k:
            raise ValueError(f"means must have shape ({k}, d), got shape {tuple(mu.shape)}")
        d = mu.shape[1]
        if cov.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}), got shape {tuple(cov.shape)}")
        if not torch.isfinite(mu).all():
            raise ValueError("means contain NaN or inf")
        if not torch.isfinite(cov).all():
            raise ValueError("covs contain NaN or inf")
        if not torch.allclose(cov, cov.transpose(1, 2), rtol=1e-6, atol=1e-10):
            raise ValueError("covs must be symmetric")
        chol, info = torch.linalg.cholesky_ex(cov)
        if (info != 0).any():
            bad = torch.nonzero(info).flatten().tolist()
            raise ValueError(f"covs must be positive definite; components {bad} are not")
        self._w = w / w.sum()
        self._mu = mu
        self._cov = cov
        self._chol = chol  # Σ_k = L_k L_kᵀ

    @classmethod
    def isotropic(cls, weights, means, stds) -> GaussianMixture:
        """Mixture with Σ_k = s_k² I. stds: a scalar or (K,) positive standard deviations."""
        mu = _as64(means)
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got shape {tuple(mu.shape)}")
        k, d = mu.shape
        s = _as64(stds)
        if s.ndim == 0:
            s = s.expand(k)
        if s.shape != (k,):
            raise ValueError(
                f"stds must be a scalar or have shape ({k},), got shape {tuple(s.shape)}"
            )
        if not torch.isfinite(s).all() or (s <= 0).any():
            raise ValueError(f"stds must be positive and finite, got {s.tolist()}")
        covs = s[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64)
        return cls(weights, mu, covs)

    @property
    def dim(self) -> int:
        return self._mu.shape[1]

    @property
    def n_components(self) -> int:
        return self._w.shape[0]

    @property
    def weights(self) -> torch.Tensor:
        """(K,)"""
        return self._w.float()

    @property
    def means(self) -> torch.Tensor:
        """(K, d)"""
        return self._mu.float()

    @property
    def covs(self) -> torch.Tensor:
        """(K, d, d)"""
        return self._cov.float()

    def __repr__(self) -> str:
        return f"GaussianMixture(n_components={self.n_components}, dim={self.dim})"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n samples; returns (n, d) float32."""
        positive_int(n, "n")
        dev = _device(generator)
        k = torch.multinomial(self._w.to(dev), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=dev)
        # L_k z for every k is cheaper than gathering n Cholesky factors when K is small
        lz = torch.einsum("kij,nj->nki", self._chol.to(dev), z)  # (n, K, d)
        x = self._mu.to(dev)[k] + lz[torch.arange(n, device=dev), k]
        return x.float()

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log π_k + log N(x; μ_k, Σ_k) for every component. x: (n, d); returns (n, K) float64."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        mu, chol, w = (v.to(x.device) for v in (self._mu, self._chol, self._w))
        diff = x.to(torch.float64)[None] - mu[:, None]  # (K, n, d)
        # Mahalanobis distance via L_k⁻¹(x − μ_k)
        z = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)
        maha = (z**2).sum(dim=1)  # (K, n)
        half_logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(dim=1)  # (K,)
        log_n = -0.5 * maha - half_logdet[:, None] - 0.5 * self.dim * _LOG_2PI
        return (torch.log(w)[:, None] + log_n).T

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x). x: (n, d); returns (n,) in the floating dtype of x (float32 otherwise)."""
        dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else torch.float32
        return torch.logsumexp(self.component_log_prob(x), dim=1).to(dtype)

    def mean(self) -> torch.Tensor:
        """E[x] = Σ_k π_k μ_k; returns (d,)."""
        return self._mean64().float()

    def cov(self) -> torch.Tensor:
        """Cov[x] = Σ_k π_k (Σ_k + μ_k μ_kᵀ) − E[x] E[x]ᵀ; returns (d, d)."""
        m = self._mean64()
        outer = self._mu[:, :, None] * self._mu[:, None, :]
        second = (self._w[:, None, None] * (self._cov + outer)).sum(0)
        return (second - torch.outer(m, m)).float()

    def _mean64(self) -> torch.Tensor:
        return (self._w[:, None] * self._mu).sum(dim=0)

    def tilt_linear(self, a, lam: float) -> GaussianMixture:
        """Exact tilt p*(x) ∝ p(x) exp(a·x / λ), again a Gaussian mixture:

            μ_k' = μ_k + Σ_k a / λ,   Σ_k' = Σ_k,   π_k' ∝ π_k exp(a·μ_k / λ + aᵀΣ_k a / (2λ²)).

        a: (d,); lam > 0.
        """
        a = _vector(a, self.dim, "a")
        lam = positive(lam, "lam")
        sa = self._cov @ a  # (K, d)
        mu = self._mu + sa / lam
        log_w = torch.log(self._w) + self._mu @ a / lam + (sa @ a) / (2.0 * lam**2)
        return GaussianMixture(torch.softmax(log_w, dim=0), mu, self._cov.clone())

    def tilt_quadratic(self, A, lam: float, b=None) -> GaussianMixture:
        """Exact tilt p*(x) ∝ p(x) exp(r(x) / λ) for r(x) = −½ xᵀAx + b·x. Per component,

            Σ_k' = (Σ_k⁻¹ + A/λ)⁻¹,   μ_k' = Σ_k' (Σ_k⁻¹ μ_k + b/λ),
            π_k' ∝ π_k Z_k,  Z_k = ∫ N(x; μ_k, Σ_k) e^{r(x)/λ} dx
                 = (det Σ_k' / det Σ_k)^½ exp(½ μ_k'ᵀ Σ_k'⁻¹ μ_k' − ½ μ_kᵀ Σ_k⁻¹ μ_k),

        by completing the square. Only the symmetric part of A matters. A: (d, d); lam > 0;
        b: (d,) or None. Σ_k⁻¹ + A/λ must be positive definite for every k (else the tilt is not
        normalisable); A may be indefinite if that holds.
        """
        d = self.dim
        A = _as64(A)
        if A.shape != (d, d):
            raise ValueError(f"A must have shape ({d}, {d}), got shape {tuple(A.shape)}")
        if not torch.isfinite(A).all():
            raise ValueError("A contains NaN or inf")
        lam = positive(lam, "lam")
        b = torch.zeros(d, dtype=torch.float64) if b is None else _vector(b, d, "b")
        A = 0.5 * (A + A.T)

        prec = torch.cholesky_inverse(self._chol)  # Σ_k⁻¹, (K, d, d)
        prec_new = prec + A / lam
        chol_new, info = torch.linalg.cholesky_ex(prec_new)
        if (info != 0).any():
            bad = torch.nonzero(info).flatten().tolist()
            raise ValueError(
                f"Σ_k⁻¹ + A/λ is not positive definite for components {bad}: the tilt is not "
                "normalisable; use a larger lam or a more positive A"
            )
        cov_new = torch.cholesky_inverse(chol_new)
        h = (prec @ self._mu[:, :, None]).squeeze(-1) + b / lam  # Σ_k⁻¹μ_k + b/λ
        mu_new = (cov_new @ h[:, :, None]).squeeze(-1)
        # log Z_k; log det Σ_k' = −log det(Σ_k⁻¹ + A/λ)
        logdet_cov = 2.0 * torch.log(torch.diagonal(self._chol, dim1=1, dim2=2)).sum(1)
        logdet_cov_new = -2.0 * torch.log(torch.diagonal(chol_new, dim1=1, dim2=2)).sum(1)
        quad_new = (mu_new * h).sum(1)  # μ_k'ᵀ Σ_k'⁻¹ μ_k' = μ_k'ᵀ h
        quad_old = (self._mu[:, :, None] * prec * self._mu[:, None, :]).sum((1, 2))
        log_z = 0.5 * (logdet_cov_new - logdet_cov) + 0.5 * (quad_new - quad_old)
        log_w = torch.log(self._w) + log_z
        cov_new = 0.5 * (cov_new + cov_new.transpose(1, 2))  # remove round-off asymmetry
        return GaussianMixture(torch.softmax(log_w, dim=0), mu_new, cov_new)


class TwoMoons:
    """Two interleaved half circles (as scikit-learn's make_moons), centred at the origin and
    scaled by 2, so the picture spans about [-3, 3] × [-1.5, 1.5]. `noise` is the standard
    deviation of the Gaussian jitter before scaling. Each moon gets half the mass on average.
    """

    dim = 2

    def __init__(self, noise: float = 0.05):
        self.noise = non_negative(noise, "noise")

    def __repr__(self) -> str:
        return f"TwoMoons(noise={self.noise})"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns (n, 2) float32."""
        positive_int(n, "n")
        dev = _device(generator)
        t = math.pi * torch.rand(n, generator=generator, device=dev)
        upper = torch.randint(0, 2, (n,), generator=generator, device=dev).bool()
        # upper moon (cos t, sin t); lower moon (1 − cos t, ½ − sin t)
        x = torch.where(upper, torch.cos(t), 1.0 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x, y], dim=1) + self.noise * torch.randn(n, 2, generator=generator, device=dev)
        return 2.0 * (pts - torch.tensor([0.5, 0.25], device=dev))


class Checkerboard:
    """Uniform on the 8 cells of a 4 × 4 checkerboard on [-2, 2]² whose column and row indices
    have an even sum (the cell [-2, -1]² is filled). Density 1/8 on the filled cells.
    """

    dim = 2

    def __repr__(self) -> str:
        return "Checkerboard()"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns (n, 2) float32."""
        positive_int(n, "n")
        dev = _device(generator)
        col = torch.randint(0, 4, (n,), generator=generator, device=dev)
        row = 2 * torch.randint(0, 2, (n,), generator=generator, device=dev) + col % 2  # same parity as col
        u = torch.rand(n, 2, generator=generator, device=dev)
        return torch.stack([col, row], dim=1).float() - 2.0 + u

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log(1/8) on filled cells, -inf elsewhere. x: (n, 2); returns (n,)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (n, 2), got {shape}")
        dtype = x.dtype if x.is_floating_point() else torch.float32
        inside = ((x >= -2.0) & (x <= 2.0)).all(dim=1)
        cell = torch.floor(x + 2.0).long().clamp(0, 3)
        filled = inside & ((cell.sum(dim=1) % 2) == 0)
        out = torch.full((x.shape[0],), -math.inf, dtype=dtype, device=x.device)
        out[filled] = -math.log(8.0)
        return out


class Rings:
    """Concentric circles of the given radii with radial Gaussian jitter of standard deviation
    `noise`; each ring gets equal mass and a uniform angle.
    """

    dim = 2

    def __init__(self, radii: Sequence[float] = (1.0, 2.0), noise: float = 0.05):
        r = torch.as_tensor(radii, dtype=torch.float32)
        if r.ndim != 1 or r.shape[0] == 0 or not torch.isfinite(r).all() or (r <= 0).any():
            raise ValueError(f"radii must be a non-empty sequence of positive numbers, got {radii}")
        self.radii = tuple(float(v) for v in r)
        self.noise = non_negative(noise, "noise")

    def __repr__(self) -> str:
        return f"Rings(radii={self.radii}, noise={self.noise})"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns (n, 2) float32."""
        positive_int(n, "n")
        dev = _device(generator)
        which = torch.randint(0, len(self.radii), (n,), generator=generator, device=dev)
        rho = torch.tensor(self.radii, device=dev)[which] + self.noise * torch.randn(n, generator=generator, device=dev)
        phi = 2.0 * math.pi * torch.rand(n, generator=generator, device=dev)
        return torch.stack([rho * torch.cos(phi), rho * torch.sin(phi)], dim=1)


def _mixture() -> GaussianMixture:
    return GaussianMixture.isotropic(
        weights=(0.5, 0.3, 0.2), means=((-2.0, 0.0), (1.5, 1.5), (1.5, -1.5)), stds=0.5
    )


def _gaussian() -> GaussianMixture:
    return GaussianMixture.isotropic(weights=(1.0,), means=((1.0, -0.5),), stds=0.7)


# Names the CLI accepts; read-only so the module holds no mutable state.
TASKS: MappingProxyType[str, Callable[[], object]] = MappingProxyType(
    {
        "mixture": _mixture,
        "gaussian": _gaussian,
        "moons": TwoMoons,
        "checkerboard": Checkerboard,
        "rings": Rings,
    }
)


def get_task(name: str):
    """The 2-D distribution registered under `name` in TASKS, freshly constructed."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names are {', '.join(sorted(TASKS))}")
    return TASKS[name]()
