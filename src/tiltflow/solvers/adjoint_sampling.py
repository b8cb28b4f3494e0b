"""Adjoint Sampling (Havens et al. 2025, arXiv 2504.11713), as a loss for the tilt of a Gaussian base.

Adjoint Sampling is Adjoint Matching for a base process whose lean adjoint does not depend on the
path: the paper's base is a Brownian motion from a point, so ã(t) = ã(1) and X_t can be redrawn
from the bridge given X_1 ("reciprocal adjoint matching"), which lets one rollout serve many
gradient steps through a replay buffer of (X_1, ∇E(X_1)).

Here the base is the memoryless process of Gaussian data N(μ, Σ) (our "simple prior process",
the same for fine-tuning and energy sampling). Its drift is affine, so the lean adjoint is
deterministic, ã(t) = J_tᵀ ã(1) with J_t = ∂X_1/∂X_t = α_t Σ (α_t² Σ + β_t² I)⁻¹ (symmetric),
and the estimate of ∇log h_t is

    T = J_t ∇g(X_1)/λ = −J_t ã(1),         X_t ~ N(α_t X_1, β_t² I)          (bridge)

(exact: h_t is a Gaussian convolution of e^{g/λ}; integrate by parts). With a non-Gaussian base
the lean adjoint depends on the path and this loss does not apply (use adjoint matching).

Deviations from the paper, all deliberate: the prior process is the memoryless rectified-flow
SDE started from N(0, I) instead of a Brownian motion from 0 with a geometric noise schedule
(both make X_1 independent of X_0, which is what the construction needs); the loss uses Adjoint
Matching's weighting ‖u/1 − σT‖² rather than the paper's ‖u/g + ∇g‖² (same minimiser); no
score clipping unless asked for (`clip`: maximum norm of T per sample).
"""

from __future__ import annotations

import torch

from .reciprocal import ReciprocalLoss, gaussian_base


class AdjointSampling(ReciprocalLoss):
    name = "adjoint_sampling"
    weights = False

    def __init__(self, weights: bool | None = None, clip: float | None = None):
        super().__init__(weights)
        self.clip = clip

    def check_base(self, base):
        if gaussian_base(base) is None:
            raise ValueError("solver='adjoint_sampling' needs a Gaussian base (its lean adjoint must not "
                             "depend on the path): a FlowModel(GaussianMixtureVelocity) with one component; "
                             "for a learned base use solver='adjoint_matching'")

    def target(self, base, x1, a1, x_t, eps, t, cond=None):
        mu, cov = gaussian_base(base)
        lam_c, U = torch.linalg.eigh(cov)                                  # Σ = U diag(λ) Uᵀ
        a = base.path.alpha(t.to(torch.float64))[:, None]
        b = base.path.beta(t.to(torch.float64))[:, None]
        gain = a * lam_c / (a**2 * lam_c + b**2)                           # eigenvalues of J_t, (R, d)
        g = -a1.reshape(len(a1), -1).to(torch.float64)                     # ∇g/λ
        T = ((g @ U) * gain) @ U.T
        T = T.to(x1.dtype).reshape_as(x1)
        if self.clip is not None:
            n = T.reshape(len(T), -1).norm(dim=1).clamp_min(1e-12)
            T = T * (self.clip / n).clamp(max=1.0).reshape(-1, *([1] * (T.ndim - 1)))
        return T
