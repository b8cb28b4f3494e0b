"""Closed-form velocity fields: the exact flow-matching velocity of Gaussian-mixture data.

For data Σ_k π_k N(μ_k, Σ_k) on the path x_t = α_t x1 + β_t x0, component k has
p_t^k = N(α μ_k, C_k) with C_k = α² Σ_k + β² I and

    v_k(x, t) = α̇ μ_k + (α̇ α Σ_k + β̇ β I) C_k⁻¹ (x − α μ_k),
    v(x, t) = Σ_k w_k(x, t) v_k(x, t),   w_k ∝ π_k N(x; α μ_k, C_k).

Rectified flow: v_k = μ_k + (t Σ_k − (1 − t) I)(t² Σ_k + (1 − t)² I)⁻¹ (x − t μ_k).
These make the solver the only thing under test in the closed-form checks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..paths import AffinePath, get_path


class GaussianMixtureVelocity(nn.Module):
    """Exact velocity of Σ_k π_k N(μ_k, Σ_k); weights (K,), means (K, d), covs (K, d, d).

    Parameters are buffers (nothing trains); computed in float64 and cast back.
    """

    def __init__(self, weights, means, covs, path: AffinePath | dict | str = "rectified"):
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covs, dtype=torch.float64)
        if mu.ndim != 2 or w.shape != mu.shape[:1] or cov.shape != (*mu.shape, mu.shape[1]):
            raise ValueError(f"need weights (K,), means (K, d), covs (K, d, d); got "
                             f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(cov.shape)}")
        if (w <= 0).any():
            raise ValueError(f"weights must be positive, got {w.tolist()}")
        self.register_buffer("weights", w / w.sum())
        self.register_buffer("means", mu)
        self.register_buffer("covs", cov)
        self.path = path if isinstance(path, AffinePath) else get_path(path)
        self.dim = mu.shape[1]

    def config(self) -> dict:
        return {"class": "GaussianMixtureVelocity", "K": int(self.means.shape[0]), "dim": self.dim,
                "path": self.path.config()}

    @classmethod
    def from_config(cls, cfg: dict) -> "GaussianMixtureVelocity":
        K, d = cfg["K"], cfg["dim"]
        return cls(torch.ones(K), torch.zeros(K, d), torch.eye(d).expand(K, d, d).clone(), cfg["path"])

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        # Σ_k = U_k diag(λ_k) U_kᵀ makes C_k and α̇αΣ_k + β̇βI diagonal in the same basis,
        # so each evaluation costs elementwise work and two small matmuls per component.
        lam, U = torch.linalg.eigh(self.covs)                                          # (K,d), (K,d,d)
        xd, td = x.to(torch.float64), t.to(torch.float64)
        a, b = self.path.alpha(td)[:, None, None], self.path.beta(td)[:, None, None]     # (B,1,1)
        da, db = self.path.d_alpha(td)[:, None, None], self.path.d_beta(td)[:, None, None]
        c = a**2 * lam + b**2                                                           # (B,K,d) eigenvalues of C_k
        diff = xd[:, None, :] - a * self.means                                          # (B,K,d)
        z = torch.einsum("kdj,bkd->bkj", U, diff)                                       # Uᵀ(x − αμ)
        sol = z / c                                                                     # Uᵀ C⁻¹ (x − αμ)
        vk = da * self.means + torch.einsum("kdj,bkj->bkd", U, (da * a * lam + db * b) * sol)
        logw = torch.log(self.weights) - 0.5 * (z * sol).sum(-1) - 0.5 * torch.log(c).sum(-1)   # (B,K)
        w = torch.softmax(logw, dim=1)
        return (w[..., None] * vk).sum(1).to(x.dtype)
