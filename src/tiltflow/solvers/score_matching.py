"""The score-matching family for the tilt (unified view, Domingo-Enrich, Du, Albergo 2026).

∇log h_t = s*_t − s^base_t. Given a pair (X_1, X_t = α_t X_1 + β_t ε) from P* there are two
classical unbiased estimates of the tilted score s*_t(X_t):

* target score matching (TSM):      s*_1(X_1)/α_t,    s*_1 = ∇log p_base + ∇g/λ
  (the score of α_t X_1 convolved with noise is the posterior mean of the scaled data score);
  its variance grows like 1/α_t² — without bound at the noise end t → 0;
* conditional (denoising) SM (CSM): −ε/β_t; its variance grows like 1/β_t² — without bound at
  the data end t → 1.

The paper's "novel score matching" has finite gradient variance; its full text was not
available to us, so `NovelScoreMatching` is our reconstruction (INFERRED, exact): the convex
combination with weight w_t = α_t²/(α_t² + β_t²) on TSM,

    T_NSM = (α_t s*_1(X_1) − β_t ε) / (α_t² + β_t²) − s^base_t(X_t),

unbiased for every t and with both singular factors cancelled (bounded coefficients at t = 0
and t = 1). s^base_t(X_t) is a function of X_t only, so it adds no variance.

TSM needs the base's data score ∇log p_base(X_1): exact for a Gaussian base, otherwise taken from
the base velocity at t = 1 − 10⁻³ (reciprocal.base_data_score), an approximation. CSM does not use
the reward at all: it only learns the law of its pairs, so its pairs must be reweighted to P*
(weights=True, its default). TSM and NSM use the reward, so plain end points of the current model
already have P* as fixed point (as in Adjoint Sampling) and they default to weights=False:
measured on the Gaussian/quadratic test, TSM with Jarzynski weights did not converge in 600
iterations (its huge small-t targets meet a small effective batch), without weights in 200.
"""

from __future__ import annotations

from .reciprocal import ReciprocalLoss, _bshape, base_data_score, base_score


class TargetScoreMatching(ReciprocalLoss):
    name = "target_score_matching"
    weights = False   # TSM uses the reward, so plain end points already have P* as fixed point

    def target(self, base, x1, a1, x_t, eps, t, cond=None):
        s1 = base_data_score(base, x1, cond) - a1                          # ∇log p_base + ∇g/λ
        return s1 / _bshape(base.path.alpha(t), x1) - base_score(base, x_t, t, cond)


class ConditionalScoreMatching(ReciprocalLoss):
    name = "conditional_score_matching"
    weights = True

    def target(self, base, x1, a1, x_t, eps, t, cond=None):
        return -eps / _bshape(base.path.beta(t), x1) - base_score(base, x_t, t, cond)


class NovelScoreMatching(ReciprocalLoss):
    name = "novel_score_matching"
    weights = False

    def target(self, base, x1, a1, x_t, eps, t, cond=None):
        a, b = _bshape(base.path.alpha(t), x1), _bshape(base.path.beta(t), x1)
        s1 = base_data_score(base, x1, cond) - a1
        return (a * s1 - b * eps) / (a**2 + b**2) - base_score(base, x_t, t, cond)
