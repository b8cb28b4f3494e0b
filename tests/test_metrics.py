import math

import numpy as np
import ot
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist

from tiltflow import metrics
from tiltflow.metrics import (
    cvar,
    effective_sample_size,
    energy_distance,
    gaussian_kl,
    log_mean_exp,
    mean_and_cov,
    mean_pairwise_distance,
    reward_summary,
    sliced_wasserstein,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- energy distance


def test_energy_distance_matches_direct_u_statistic_with_blocks(monkeypatch):
    # small blocks (66 to 117 rows, last one partial) must give the unblocked U-statistic
    monkeypatch.setattr(metrics, "_PAIR_BLOCK", 20_000)
    g = gen(1)
    x = torch.randn(302, 2, generator=g)
    y = torch.randn(170, 2, generator=g) + 0.3
    xn, yn = x.double().numpy(), y.double().numpy()
    n, m = len(xn), len(yn)
    within_x = cdist(xn, xn).sum() / (n * (n - 1))
    within_y = cdist(yn, yn).sum() / (m * (m - 1))
    exact = 2 * cdist(xn, yn).mean() - within_x - within_y
    assert energy_distance(x, y) == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_energy_distance_same_distribution_is_zero():
    # U-statistic is unbiased for 0; its standard deviation at n = m = 2000 is ~5e-4
    g = gen(2)
    x = torch.randn(2000, 2, generator=g)
    y = torch.randn(2000, 2, generator=g)
    assert abs(energy_distance(x, y)) < 5e-3


def test_energy_distance_shifted_gaussians_closed_form():
    # 1-D, N(0,1) vs N(δ,1): X − Y ~ N(−δ, 2), so E|X−Y| is the folded-normal mean
    # σ√(2/π) exp(−δ²/2σ²) + δ(1 − 2Φ(−δ/σ)) with σ = √2, and E|X−X'| = E|Y−Y'| = 2/√π.
    delta, s = 1.0, math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(delta**2) / (2 * s**2)) + delta * (
        1 - 2 * stats.norm.cdf(-delta / s)
    )
    exact = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    g = gen(3)
    x = torch.randn(4000, 1, generator=g)
    y = torch.randn(4000, 1, generator=g) + delta
    # Monte-Carlo standard deviation at n = m = 4000 is ~0.02
    assert energy_distance(x, y) == pytest.approx(exact, abs=0.08)


def test_energy_distance_flattens_trailing_dims():
    g = gen(4)
    x = torch.randn(50, 2, 3, generator=g)
    y = torch.randn(40, 2, 3, generator=g)
    assert energy_distance(x, y) == pytest.approx(energy_distance(x.flatten(1), y.flatten(1)))


# ---------------------------------------------------------------- sliced Wasserstein


def test_sliced_wasserstein_1d_is_exact_w2():
    # in 1-D every unit direction is ±1, so SW₂ is the exact W₂ between the empirical measures
    g = gen(5)
    x = torch.randn(300, 1, generator=g)
    y = 2 * torch.randn(170, 1, generator=g) + 0.5
    w2_sq = ot.wasserstein_1d(x[:, 0].double().numpy(), y[:, 0].double().numpy(), p=2)
    sw = sliced_wasserstein(x, y, n_projections=4, generator=gen(0))
    assert sw == pytest.approx(math.sqrt(w2_sq), rel=1e-9)


def test_sliced_wasserstein_shifted_gaussians():
    # N(0, I) vs N(m, I): along θ the 1-D W₂ is |θ·m| and E_θ (θ·m)² = |m|²/d, so SW₂ = |m|/√d.
    d = 4
    m = torch.tensor([1.0, 2.0, 0.0, -1.0])
    g = gen(6)
    x = torch.randn(2000, d, generator=g)
    y = torch.randn(1500, d, generator=g) + m
    sw = sliced_wasserstein(x, y, n_projections=1000, generator=gen(7))
    # projection and sampling noise together have a standard deviation of ~2% of the value
    assert sw == pytest.approx(float(m.norm()) / math.sqrt(d), rel=0.08)


def test_sliced_wasserstein_generator_reproducible():
    g = gen(8)
    x, y = torch.randn(100, 3, generator=g), torch.randn(80, 3, generator=g)
    a = sliced_wasserstein(x, y, 16, generator=gen(1))
    b = sliced_wasserstein(x, y, 16, generator=gen(1))
    assert a == b
    assert sliced_wasserstein(x, x, 16, generator=gen(1)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- pairwise distance


def test_mean_pairwise_distance_matches_scipy():
    g = gen(9)
    x = torch.randn(3000, 2, 2, generator=g)
    xn = x.flatten(1).double().numpy()
    n = len(xn)
    assert mean_pairwise_distance(x) == pytest.approx(cdist(xn, xn).sum() / (n * (n - 1)), rel=1e-9)


def test_mean_pairwise_distance_gaussian_closed_form():
    # 1-D unit Gaussian: E|X − X'| = 2/√π; MC standard deviation at n = 4000 is ~0.013
    x = torch.randn(4000, 1, generator=gen(10))
    assert mean_pairwise_distance(x) == pytest.approx(2 / math.sqrt(math.pi), abs=0.06)


# ---------------------------------------------------------------- CVaR


def _ru_right(r, beta):
    # Rockafellar–Uryasev min_η η + E(r−η)₊/β; piecewise linear in η with kinks at the samples
    return min(eta + np.maximum(r - eta, 0).mean() / beta for eta in r)


def _ru_left(r, beta):
    return max(eta - np.maximum(eta - r, 0).mean() / beta for eta in r)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.3, 0.37, 0.5, 1.0, 0.001])
def test_cvar_equals_rockafellar_uryasev(beta):
    r = torch.randn(57, generator=gen(11), dtype=torch.float64)
    rn = r.numpy()
    assert cvar(r, beta, "right") == pytest.approx(_ru_right(rn, beta), rel=1e-10, abs=1e-12)
    assert cvar(r, beta, "left") == pytest.approx(_ru_left(rn, beta), rel=1e-10, abs=1e-12)


def test_cvar_simple_values():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert cvar(r, 0.5) == pytest.approx(3.5)
    assert cvar(r, 0.5, tail="left") == pytest.approx(1.5)
    assert cvar(r, 1.0) == pytest.approx(2.5)
    # top 3/8 of the mass: all of 4 (1/4) and half of 3 (1/8) -> (4 + 0.5·3) / 1.5
    assert cvar(r, 0.375) == pytest.approx((4 + 0.5 * 3) / 1.5)


def test_cvar_standard_normal_closed_form():
    # right CVaR_β of N(0,1) is φ(Φ⁻¹(1−β))/β; left is its negative. MC sd at n = 1e5 is ~0.006.
    beta = 0.1
    exact = stats.norm.pdf(stats.norm.ppf(1 - beta)) / beta
    r = torch.randn(100_000, generator=gen(12))
    assert cvar(r, beta, "right") == pytest.approx(exact, abs=0.03)
    assert cvar(r, beta, "left") == pytest.approx(-exact, abs=0.03)


@pytest.mark.parametrize("level", [0.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_cvar_bad_level(level):
    with pytest.raises(ValueError, match="level"):
        cvar(torch.randn(10), level)


def test_cvar_bad_inputs():
    with pytest.raises(ValueError, match="tail"):
        cvar(torch.randn(10), 0.1, tail="upper")
    with pytest.raises(ValueError, match="r must have shape"):
        cvar(torch.randn(10, 2), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        cvar(torch.tensor([1.0, float("nan")]), 0.1)


# ---------------------------------------------------------------- reward summary


def test_reward_summary_keys_and_values():
    r = torch.randn(1000, generator=gen(13), dtype=torch.float64)
    s = reward_summary(r)
    quantile_keys = {"q05", "q25", "q50", "q75", "q95"}
    assert set(s) == {"mean", "std", "cvar_left_10", "cvar_right_10"} | quantile_keys
    rn = r.numpy()
    assert s["mean"] == pytest.approx(rn.mean())
    assert s["std"] == pytest.approx(rn.std(ddof=1))
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert s[f"q{round(100 * q):02d}"] == pytest.approx(np.quantile(rn, q))
    assert s["cvar_right_10"] == pytest.approx(cvar(r, 0.1, "right"))
    assert s["cvar_left_10"] == pytest.approx(cvar(r, 0.1, "left"))


def test_reward_summary_level_names():
    s = reward_summary(torch.randn(100), quantiles=(0.5,), level=0.05)
    assert set(s) == {"mean", "std", "q50", "cvar_left_05", "cvar_right_05"}
    with pytest.raises(ValueError, match="quantiles"):
        reward_summary(torch.randn(100), quantiles=(1.5,))
    with pytest.raises(ValueError, match="level"):
        reward_summary(torch.randn(100), level=0.0)


# ---------------------------------------------------------------- importance weights


def test_log_mean_exp_stable_and_correct():
    lw = torch.randn(50, generator=gen(14), dtype=torch.float64)
    assert float(log_mean_exp(lw)) == pytest.approx(math.log(np.exp(lw.numpy()).mean()))
    # a common offset of 1000 would overflow exp(); the result shifts by exactly 1000
    assert float(log_mean_exp(lw + 1000.0)) == pytest.approx(float(log_mean_exp(lw)) + 1000.0)
    assert float(log_mean_exp(torch.tensor([0.0, -math.inf]))) == pytest.approx(math.log(0.5))


def test_log_mean_exp_differentiable():
    # ∂/∂lw_i log mean exp(lw) = softmax(lw)_i
    lw = torch.randn(10, generator=gen(15), requires_grad=True)
    log_mean_exp(lw).backward()
    torch.testing.assert_close(lw.grad, torch.softmax(lw.detach(), 0))


def test_effective_sample_size():
    n = 500
    assert effective_sample_size(torch.full((n,), 1234.5)) == pytest.approx(n)
    dominant = torch.full((n,), -50.0)
    dominant[3] = 0.0
    assert effective_sample_size(dominant) == pytest.approx(1.0, abs=1e-12)
    lw = torch.randn(n, generator=gen(16), dtype=torch.float64)
    w = np.exp(lw.numpy())
    assert effective_sample_size(lw) == pytest.approx(w.sum() ** 2 / (w**2).sum())
    # zero weights (-inf) do not count
    lw2 = torch.tensor([0.0, 0.0, -math.inf])
    assert effective_sample_size(lw2) == pytest.approx(2.0)


@pytest.mark.parametrize("fn", [log_mean_exp, effective_sample_size])
def test_log_weight_errors(fn):
    with pytest.raises(ValueError, match="log_w"):
        fn(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="log_w"):
        fn(torch.tensor([0.0, math.inf]))
    with pytest.raises(ValueError, match="log_w"):
        fn(torch.full((3,), -math.inf))
    with pytest.raises(ValueError, match="log_w"):
        fn(torch.zeros(2, 2))


# ---------------------------------------------------------------- Gaussians


def _spd(d, g):
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(d, dtype=torch.float64)


def test_gaussian_kl_monte_carlo():
    # KL = E_0[log p0 − log p1]; tolerance is 5 Monte-Carlo standard errors
    g = gen(17)
    d = 3
    mu0 = torch.randn(d, generator=g, dtype=torch.float64)
    mu1 = torch.randn(d, generator=g, dtype=torch.float64)
    c0, c1 = _spd(d, g), _spd(d, g)
    p0 = stats.multivariate_normal(mu0.numpy(), c0.numpy())
    p1 = stats.multivariate_normal(mu1.numpy(), c1.numpy())
    xs = p0.rvs(size=200_000, random_state=np.random.default_rng(0))
    lr = p0.logpdf(xs) - p1.logpdf(xs)
    se = lr.std() / math.sqrt(len(lr))
    assert gaussian_kl(mu0, c0, mu1, c1) == pytest.approx(lr.mean(), abs=5 * se)


def test_gaussian_kl_special_cases():
    g = gen(18)
    mu, c = torch.randn(2, generator=g), _spd(2, g).float()
    assert gaussian_kl(mu, c, mu, c) == pytest.approx(0.0, abs=1e-6)
    # equal unit covariances: KL = ½|μ₀ − μ₁|²
    eye = torch.eye(2)
    assert gaussian_kl(torch.zeros(2), eye, torch.tensor([3.0, 4.0]), eye) == pytest.approx(12.5)


def test_gaussian_kl_errors():
    eye = torch.eye(2)
    with pytest.raises(ValueError, match="cov1"):
        gaussian_kl(torch.zeros(2), eye, torch.zeros(2), -eye)
    with pytest.raises(ValueError, match="cov0"):
        gaussian_kl(torch.zeros(2), torch.eye(3), torch.zeros(2), eye)
    with pytest.raises(ValueError, match="cov0 must be symmetric"):
        gaussian_kl(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.zeros(2), eye)
    with pytest.raises(ValueError, match="mu1"):
        gaussian_kl(torch.zeros(2), eye, torch.zeros(2, 1), eye)


def test_mean_and_cov_matches_numpy():
    x = torch.randn(300, 3, generator=gen(19))
    mean, cov = mean_and_cov(x)
    assert mean.shape == (3,) and cov.shape == (3, 3) and cov.dtype == torch.float32
    np.testing.assert_allclose(mean.numpy(), x.numpy().mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.numpy().T), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="x must have shape"):
        mean_and_cov(torch.randn(10))
    with pytest.raises(ValueError, match="at least 2"):
        mean_and_cov(torch.randn(1, 3))


# ---------------------------------------------------------------- shared validation


def test_sample_validation_errors():
    with pytest.raises(ValueError, match="x must have shape"):
        energy_distance(torch.randn(10), torch.randn(10, 1))
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(ValueError, match="y has 1 samples with NaN"):
        energy_distance(torch.randn(10, 2), torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(torch.randn(10, 2), torch.randn(10, 2), n_projections=0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(torch.randn(1, 2))
