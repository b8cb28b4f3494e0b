import math

import numpy as np
import pytest
import torch
from scipy import stats

from tiltflow.tasks.toy2d import TASKS, Checkerboard, GaussianMixture, Rings, TwoMoons, get_task


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def full_cov_mixture():
    """Three components with correlated covariances, so no closed form is trivially diagonal."""
    rot = lambda a: torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    covs = torch.stack([rot(a) @ torch.diag(torch.tensor(s)) @ rot(a).T
                        for a, s in [(0.3, [0.4, 0.1]), (1.0, [0.3, 0.15]), (-0.6, [0.2, 0.5])]])
    means = torch.tensor([[-2.0, 0.0], [1.5, 1.5], [1.5, -1.5]])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs)


def weighted_moments(x, log_w, resp):
    """Self-normalised importance estimates of the mean, covariance and component weights of
    the tilt, with w ∝ exp(r/λ) and E[1{k} | x] = resp_k(x) under the base."""
    w = torch.softmax(log_w, 0)
    mean = (w[:, None] * x).sum(0)
    xc = x - mean
    cov = (w[:, None, None] * xc[:, :, None] * xc[:, None, :]).sum(0)
    return mean, cov, (w[:, None] * resp).sum(0), 1.0 / (w**2).sum()


# ---------------------------------------------------------------- mixture moments and density


def test_sample_moments_match_closed_form():
    p = full_cov_mixture()
    x = p.sample(100_000, generator=gen(1)).double()
    assert x.shape == (100_000, 2) and p.sample(3).dtype == torch.float32
    # standard error of the mean is √(var/n) ≈ 0.005; of the covariance entries ≈ 0.01
    torch.testing.assert_close(x.mean(0), p.mean().double(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), p.cov().double(), atol=0.05, rtol=0)


def test_sample_is_reproducible_with_generator():
    p = get_task("mixture")
    torch.testing.assert_close(p.sample(100, gen(3)), p.sample(100, gen(3)))


@pytest.mark.parametrize(
    "p", [full_cov_mixture(), TASKS["mixture"](), TASKS["gaussian"]()], ids=["full", "mixture", "gaussian"]
)
def test_log_prob_integrates_to_one(p):
    # midpoint rule on [-6, 6]² with h = 0.025; every component is > 6 sd from the edge
    h = 0.025
    g = torch.arange(-6 + h / 2, 6, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    total = float(p.log_prob(pts).exp().sum() * h * h)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_log_prob_single_component_matches_scipy():
    mu = np.array([0.3, -1.2])
    cov = np.array([[0.8, 0.3], [0.3, 0.5]])
    p = GaussianMixture([1.0], mu[None], cov[None])
    x = torch.randn(50, 2, generator=gen(4), dtype=torch.float64)
    expected = stats.multivariate_normal(mu, cov).logpdf(x.numpy())
    np.testing.assert_allclose(p.log_prob(x).numpy(), expected, rtol=1e-10)
    assert p.log_prob(x.float()).dtype == torch.float32


def test_mixture_log_prob_is_logsumexp_of_components():
    p = full_cov_mixture()
    x = torch.randn(20, 2, generator=gen(5), dtype=torch.float64)
    dens = sum(
        float(w) * stats.multivariate_normal(m.double().numpy(), c.double().numpy()).pdf(x.numpy())
        for w, m, c in zip(p.weights, p.means, p.covs)
    )
    # the public parameters are float32 copies of the float64 ones used by log_prob
    np.testing.assert_allclose(p.log_prob(x).numpy(), np.log(dens), rtol=1e-6)


def test_isotropic_and_moments_of_default_task():
    p = get_task("mixture")
    torch.testing.assert_close(p.covs, 0.25 * torch.eye(2).expand(3, 2, 2))
    # E[x] = Σ π_k μ_k = 0.5(-2,0) + 0.3(1.5,1.5) + 0.2(1.5,-1.5)
    torch.testing.assert_close(p.mean(), torch.tensor([-0.25, 0.15]))


# ---------------------------------------------------------------- closed-form tilts


def test_tilt_linear_single_gaussian_is_exact():
    # N(μ, Σ) · exp(a·x/λ) ∝ N(μ + Σa/λ, Σ)
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    a, lam = torch.tensor([1.0, 2.0], dtype=torch.float64), 0.5
    t = GaussianMixture([1.0], [mu], [cov]).tilt_linear(a, lam)
    torch.testing.assert_close(t.means[0], (mu + cov @ a / lam).float())
    torch.testing.assert_close(t.covs[0], cov.float())
    assert float(t.weights[0]) == 1.0


def test_tilt_linear_matches_importance_reweighting():
    p, a, lam = full_cov_mixture(), torch.tensor([1.0, 0.5]), 1.5
    t = p.tilt_linear(a, lam)
    x = p.sample(100_000, generator=gen(6)).double()
    resp = torch.softmax(p.component_log_prob(x), 1)
    mean, cov, weights, ess = weighted_moments(x, x @ a.double() / lam, resp)
    # ESS ≈ 4e4 of 1e5, so standard errors are ≈ 0.007 (means), ≈ 0.01 (covariances, weights)
    assert ess > 20_000
    torch.testing.assert_close(mean, t.mean().double(), atol=0.03, rtol=0)
    torch.testing.assert_close(cov, t.cov().double(), atol=0.05, rtol=0)
    torch.testing.assert_close(weights, t.weights.double(), atol=0.02, rtol=0)


def test_tilt_quadratic_matches_importance_reweighting():
    p, lam = full_cov_mixture(), 2.0
    A = torch.tensor([[1.0, 0.3], [0.3, 0.5]])
    b = torch.tensor([0.5, -1.0])
    t = p.tilt_quadratic(A, lam, b)
    x = p.sample(100_000, generator=gen(7)).double()
    r = -0.5 * ((x @ A.double()) * x).sum(1) + x @ b.double()
    resp = torch.softmax(p.component_log_prob(x), 1)
    mean, cov, weights, ess = weighted_moments(x, r / lam, resp)
    assert ess > 20_000  # standard errors as in the linear test
    torch.testing.assert_close(mean, t.mean().double(), atol=0.03, rtol=0)
    torch.testing.assert_close(cov, t.cov().double(), atol=0.05, rtol=0)
    torch.testing.assert_close(weights, t.weights.double(), atol=0.02, rtol=0)


def test_tilt_quadratic_density_is_normalised_product():
    # log p*(x) − log p(x) − r(x)/λ must be the same constant (−log Z) at every x
    p, lam = full_cov_mixture(), 0.7
    A = torch.tensor([[2.0, -0.4], [-0.4, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.3, 0.8], dtype=torch.float64)
    t = p.tilt_quadratic(A, lam, b)
    x = 2 * torch.randn(100, 2, generator=gen(8), dtype=torch.float64)
    r = -0.5 * ((x @ A) * x).sum(1) + x @ b
    c = t.log_prob(x) - p.log_prob(x) - r / lam
    torch.testing.assert_close(c, c.mean().expand_as(c), atol=1e-9, rtol=0)


def test_tilt_quadratic_with_zero_A_equals_linear_tilt():
    p, b, lam = full_cov_mixture(), torch.tensor([0.7, -0.2]), 0.8
    q, lin = p.tilt_quadratic(torch.zeros(2, 2), lam, b), p.tilt_linear(b, lam)
    for attr in ("weights", "means", "covs"):
        torch.testing.assert_close(getattr(q, attr), getattr(lin, attr))


def test_tilt_quadratic_not_normalisable_raises():
    p = get_task("gaussian")  # Σ⁻¹ = I / 0.49, so A = −3I with λ = 1 leaves a negative precision
    with pytest.raises(ValueError, match="not normalisable"):
        p.tilt_quadratic(-3.0 * torch.eye(2), 1.0)


# ---------------------------------------------------------------- other samplers


def test_checkerboard_density_and_support():
    c = Checkerboard()
    x = c.sample(10_000, generator=gen(9))
    assert x.shape == (10_000, 2)
    assert torch.isfinite(c.log_prob(x)).all()  # every sample lies on a filled cell
    # midpoint rule over [-2.5, 2.5]²: 8 filled unit cells at density 1/8
    h = 0.01
    g = torch.arange(-2.5 + h / 2, 2.5, h)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    total = float(c.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp().sum() * h * h)
    assert total == pytest.approx(1.0, abs=1e-3)
    # each of the 8 cells holds 1/8 of the samples (binomial sd ≈ 0.003)
    cells = (torch.floor(x + 2).long() * torch.tensor([4, 1])).sum(1)
    frac = torch.bincount(cells, minlength=16).double() / len(x)
    assert frac[frac > 0].numel() == 8
    expected = torch.full((8,), 0.125, dtype=torch.float64)
    torch.testing.assert_close(frac[frac > 0], expected, atol=0.015, rtol=0)


def test_rings_radii():
    x = Rings(radii=(1.0, 2.0), noise=0.05).sample(10_000, generator=gen(10))
    rho = x.norm(dim=1)
    near = torch.minimum((rho - 1).abs(), (rho - 2).abs())
    assert float(near.max()) < 0.3  # 6 noise sd
    assert float((rho < 1.5).double().mean()) == pytest.approx(0.5, abs=0.03)


def test_two_moons_shape_and_centering():
    x = TwoMoons(noise=0.05).sample(20_000, generator=gen(11))
    assert x.shape == (20_000, 2)
    # the moons' means (0, 2/π) and (1, ½ − 2/π) average to (½, ¼), which the sampler subtracts
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=0.05, rtol=0)
    torch.testing.assert_close(TwoMoons().sample(10, gen(1)), TwoMoons().sample(10, gen(1)))


# ---------------------------------------------------------------- registry and validation


def test_tasks_registry():
    assert set(TASKS) == {"mixture", "gaussian", "moons", "checkerboard", "rings"}
    for name in TASKS:
        assert get_task(name).sample(5, gen(0)).shape == (5, 2)
    with pytest.raises(ValueError, match="checkerboard, gaussian, mixture, moons, rings"):
        get_task("spiral")


def test_constructor_and_argument_errors():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([-1.0, 2.0], torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2))
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture([1.0], torch.zeros(1, 2), torch.eye(3)[None])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], torch.zeros(1, 2), -torch.eye(2)[None])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture.isotropic([1.0], [[0.0, 0.0]], 0.0)
    p = get_task("mixture")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        p.sample(0)
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2\)"):
        p.log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="lam"):
        p.tilt_linear([1.0, 0.0], 0.0)
    with pytest.raises(ValueError, match="a must have shape"):
        p.tilt_linear([1.0, 0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="A must have shape"):
        p.tilt_quadratic(torch.eye(3), 1.0)
    with pytest.raises(ValueError, match="noise"):
        TwoMoons(noise=-1)
    with pytest.raises(ValueError, match="radii"):
        Rings(radii=())
