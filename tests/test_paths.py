"""Paths: conversions are mutually inverse and the memoryless schedule is the paper's."""

import pytest
import torch

from tiltflow.paths import RectifiedFlow, VPDiffusion, get_path

PATHS = [RectifiedFlow(), VPDiffusion()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_conversions_round_trip(path):
    """velocity → x1/noise → velocity recovers v, and score ↔ velocity are inverse (t inside (0, 1))."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    for t in [0.05, 0.3, 0.7, 0.95]:
        t = torch.tensor(t, dtype=torch.float64)
        y, e = path.velocity_to_x1(v, x, t), path.velocity_to_noise(v, x, t)
        # x = α y + β e and v = α̇ y + β̇ e must both hold
        torch.testing.assert_close(path.alpha(t) * y + path.beta(t) * e, x)
        torch.testing.assert_close(path.d_alpha(t) * y + path.d_beta(t) * e, v)
        torch.testing.assert_close(path.noise_to_velocity(e, x, t), v)
        torch.testing.assert_close(path.score_to_velocity(path.velocity_to_score(v, x, t), x, t), v)


def test_rectified_memoryless_schedule_closed_form():
    """σ(t)² = 2(1 − t)/t and b = 2v − x/t for rectified flow (Adjoint Matching, eq. 13)."""
    p = RectifiedFlow()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(p.sigma(t) ** 2, 2 * (1 - t) / t)
    x, v = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(p.memoryless_drift(v, x, t), 2 * v - x / t[:, None])


def test_vp_memoryless_schedule_is_ddpm():
    """For VP, η = κ so σ² = 2κ = β(s), the DDPM noise rate at diffusion time s = 1 − t."""
    p = VPDiffusion(0.1, 20.0)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(p.sigma(t) ** 2, 0.1 + (1 - t) * 19.9)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.beta(t) ** 2, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_memoryless_drift_equals_v_plus_half_sigma2_score(path):
    """b = v + (σ²/2) s: the SDE with this drift has the ODE's marginals."""
    x, v = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    b = v + 0.5 * path.sigma(t) ** 2 * path.velocity_to_score(v, x, t)
    torch.testing.assert_close(path.memoryless_drift(v, x, t), b)


def test_exponential_coefficients_rectified_closed_form():
    """Rectified flow: decay s/t, w = (t² − s²)/(2t), std² = (2/t²)(t²/2 − t³/3 − s²/2 + s³/3)."""
    p = RectifiedFlow()
    for s, t in [(0.0, 0.02), (0.3, 0.35), (0.9, 1.0)]:
        decay, w, std = p.exponential_coefficients(s, t)
        assert decay == pytest.approx(s / t)
        assert w == pytest.approx((t * t - s * s) / (2 * t))
        assert std**2 == pytest.approx(2 / t**2 * (t**2 / 2 - t**3 / 3 - s**2 / 2 + s**3 / 3), rel=1e-9)


def test_sigma_is_finite_at_the_ends():
    """The singular ends are clipped, not divided by zero."""
    s = RectifiedFlow().sigma(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(s).all() and s[0] > 100 and s[1] < 0.1


def test_get_path_errors():
    assert isinstance(get_path("vp"), VPDiffusion)
    with pytest.raises(ValueError, match="path must be one of"):
        get_path("cosine")
    with pytest.raises(ValueError, match="beta_min"):
        VPDiffusion(5.0, 1.0)
