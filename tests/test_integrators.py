"""Integrators against closed-form velocity fields: only the integrator is under test.

Data N(μ, Σ) has the exact rectified-flow velocity v = μ + (tΣ − (1 − t)I)(t²Σ + (1 − t)²I)⁻¹(x − tμ)
(models/analytic.py). Sampling with it must give N(μ, Σ); log_prob must give the Gaussian density.
"""

import pytest
import torch

from tiltflow import integrators
from tiltflow.models import FlowModel, GaussianMixtureVelocity
from tiltflow.paths import RectifiedFlow, VPDiffusion

MU = torch.tensor([[1.0, -0.5]])
COV = torch.tensor([[[0.49, 0.1], [0.1, 0.3]]])
N = 20000
# Monte-Carlo standard error of a mean is sqrt(0.49/N) ≈ 0.005, of a variance ≈ 0.49·sqrt(2/N) ≈ 0.005;
# 0.03 is ~6 standard errors and well below what a wrong drift or σ produces (≥ 0.1, see below).
TOL = 0.03


def gaussian_model(path):
    return FlowModel(GaussianMixtureVelocity([1.0], MU, COV, path=path))


@pytest.mark.parametrize("path", [RectifiedFlow(), VPDiffusion()], ids=["rectified", "vp"])
@pytest.mark.parametrize("sde", [False, True], ids=["ode", "memoryless_sde"])
def test_sampling_reproduces_gaussian(path, sde):
    x = gaussian_model(path).sample(N, steps=100, sde=sde, seed=1)
    torch.testing.assert_close(x.mean(0), MU[0], atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV[0], atol=TOL, rtol=0)


def test_euler_maruyama_any_sigma_keeps_marginals_and_missing_score_term_breaks_it():
    """dX = [v + (σ²/2) s] dt + σ dW has the ODE's marginals for any σ (here σ = 0.8); without the
    score correction the variance is visibly wrong, so TOL has teeth."""
    m = gaussian_model(RectifiedFlow())
    path, sigma = m.path, 0.8
    good = lambda x, t: m.velocity(x, t) + 0.5 * sigma**2 * path.velocity_to_score(m.velocity(x, t), x, t)  # noqa: E731
    grid = integrators.time_grid(200, t1=0.995)  # the score diverges at t = 1
    for drift, ok in ((good, True), (m.velocity, False)):
        g = torch.Generator().manual_seed(0)
        x = integrators.sde_solve(drift, lambda t: sigma, torch.randn(N, 2, generator=g), grid, g)
        x = integrators.ode_solve(m.velocity, x, torch.tensor([0.995, 1.0]))
        err = (torch.cov(x.T) - COV[0]).abs().max()
        assert (err < TOL) if ok else (err > 0.1)


def test_ode_and_memoryless_sde_share_the_marginal_on_a_mixture():
    """Same velocity, two processes: the fraction of samples in each mode and the moments agree."""
    m = FlowModel(GaussianMixtureVelocity([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]],
                                          0.25 * torch.eye(2).expand(2, 2, 2)))
    xo = m.sample(N, steps=100, seed=2)
    xs = m.sample(N, steps=100, sde=True, seed=3)
    for x in (xo, xs):
        assert (x[:, 0] < 0).float().mean().item() == pytest.approx(0.3, abs=0.015)  # 4.6 s.e. of a proportion
    torch.testing.assert_close(xo.mean(0), xs.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(xo.T), torch.cov(xs.T), atol=0.08, rtol=0)


@pytest.mark.parametrize("scheme", ["exponential", "posterior", "heun"])
def test_memoryless_schemes_converge_to_the_point_mass(scheme):
    """Data = a point mass y: every scheme must land on y (the posterior step exactly)."""
    m = FlowModel(GaussianMixtureVelocity([1.0], [[0.7, -1.2]], 1e-6 * torch.eye(2)[None]))
    g = torch.Generator().manual_seed(0)
    x = integrators.memoryless_solve(m.path, m.velocity, torch.randn(500, 2, generator=g),
                                     integrators.time_grid(50), g, scheme=scheme)
    torch.testing.assert_close(x, torch.tensor([0.7, -1.2]).expand(500, 2), atol=0.02, rtol=0)


def _chain_moments(m, steps: int, scheme: str):
    """Exact mean and covariance of X_1 from the memoryless chain of a Gaussian model: v is affine in
    x, so each step is affine in (x, ξ), X_t = J x + K ξ + c, and N(m, S) ↦ N(J m + c, J S Jᵀ + K Kᵀ)
    (J, K read off the step by unit vectors). No Monte Carlo, so orders can be read off exactly."""
    grid, d = integrators.time_grid(steps, dtype=torch.float64), m.shape[0]
    mean, cov, eye, zero = torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), \
        torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for s, t in zip(grid[:-1].tolist(), grid[1:].tolist()):
        step = lambda x, xi: integrators.memoryless_step(m.path, m.velocity, x, s, t, xi, scheme)  # noqa: E731
        c = step(mean, torch.zeros_like(mean))
        J = (step(mean + eye, zero) - c).T           # column j: the response to x = mean + e_j
        K = (step(mean.expand(d, d), eye) - c).T      # column j: the response to ξ = e_j
        mean, cov = c, J @ cov @ J.T + K @ K.T
    return mean[0], cov


def test_heun_scheme_is_second_order_where_the_exponential_step_is_first():
    """Exact covariance error of N(μ, Σ) drawn by the memoryless SDE with 8, 16 and 32 steps. The
    exponential step's error halves when the steps double (first order); "heun"'s quarters."""
    m = FlowModel(GaussianMixtureVelocity([1.0], MU.double(), COV.double()))
    err = {(scheme, n): float((_chain_moments(m, n, scheme)[1] - COV[0].double()).abs().max())
           for scheme in ("exponential", "heun") for n in (8, 16, 32)}
    for n in (8, 16):
        assert 1.6 < err["exponential", n] / err["exponential", 2 * n] < 2.4, err
        assert 3.2 < err["heun", n] / err["heun", 2 * n] < 5.0, err
    assert err["heun", 16] < 0.01 < 0.03 < err["exponential", 16], err


def test_log_prob_matches_gaussian_density():
    """Exact divergence + Heun over 100 steps: within 1e-2 of the analytic log-density."""
    m = gaussian_model(RectifiedFlow())
    x = torch.distributions.MultivariateNormal(MU[0], COV[0]).sample((64,))
    exact = torch.distributions.MultivariateNormal(MU[0], COV[0]).log_prob(x)
    torch.testing.assert_close(m.log_prob(x, steps=100), exact, atol=1e-2, rtol=0)


def test_log_prob_gradient_is_the_mixture_score():
    """create_graph=True keeps log p differentiable: its x-gradient is the score ∇log p of a
    two-component mixture (its divergence term depends on x, unlike a Gaussian's, so a detached
    divergence or a wrong sign in it fails; Heun, 100 steps: within 5e-2)."""
    w, mu, cov = torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), 0.25 * torch.eye(2).expand(2, 2, 2)
    m = FlowModel(GaussianMixtureVelocity(w, mu, cov))
    comps = torch.distributions.MultivariateNormal(mu, cov)
    x = (torch.randn(32, 2, generator=torch.Generator().manual_seed(0)) * 1.5).requires_grad_(True)
    (grad,) = torch.autograd.grad(m.log_prob(x, steps=100, create_graph=True).sum(), x)
    (score,) = torch.autograd.grad(torch.logsumexp(comps.log_prob(x[:, None, :]) + w.log(), dim=1).sum(), x)
    torch.testing.assert_close(grad, score, atol=5e-2, rtol=0)
    assert not m.log_prob(x, steps=2).requires_grad      # the default stays detached


def test_log_prob_of_mixture():
    w, mu, cov = torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), 0.25 * torch.eye(2).expand(2, 2, 2)
    m = FlowModel(GaussianMixtureVelocity(w, mu, cov))
    x = torch.randn(32, 2) * 2
    comps = torch.distributions.MultivariateNormal(mu, cov)
    exact = torch.logsumexp(comps.log_prob(x[:, None, :]) + w.log(), dim=1)
    torch.testing.assert_close(m.log_prob(x, steps=200), exact, atol=2e-2, rtol=0)


def test_hutchinson_divergence_is_unbiased():
    """E[εᵀ A ε] = tr A for a linear field f(x) = A x."""
    A = torch.tensor([[1.0, 2.0, 0.0], [0.5, -3.0, 1.0], [0.0, 1.0, 0.5]])
    x = torch.randn(4, 3)
    _, exact = integrators.divergence(lambda z: z @ A.T, x, exact=True)
    torch.testing.assert_close(exact, torch.full((4,), float(A.trace())))
    _, est = integrators.divergence(lambda z: z @ A.T, x.repeat(4000, 1), exact=False,
                                    generator=torch.Generator().manual_seed(0))
    assert est.mean().item() == pytest.approx(float(A.trace()), abs=0.1)


def test_ode_solvers_orders():
    """dx/dt = x from 1: Heun's error is far below Euler's at 20 steps (order 2 vs 1)."""
    x0 = torch.ones(1, 1, dtype=torch.float64)
    grid = integrators.time_grid(20, dtype=torch.float64)
    err = {m: abs(float(integrators.ode_solve(lambda x, t: x, x0, grid, m)) - torch.e) for m in ("euler", "midpoint", "heun")}
    assert err["heun"] < 2e-3 and err["midpoint"] < 2e-3 and err["euler"] > 0.05
    traj, g = integrators.ode_solve(lambda x, t: x, x0, grid, "heun", return_trajectory=True)
    assert traj.shape == (21, 1, 1) and g is grid


def test_grid_and_bad_steps():
    assert integrators.time_grid(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps"):
            integrators.time_grid(bad)
    with pytest.raises(ValueError, match="scheme"):
        integrators.memoryless_step(RectifiedFlow(), lambda x, t: x, torch.zeros(1, 1), 0.1, 0.2, None, "rk4")
