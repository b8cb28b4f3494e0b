"""Jarzynski and Crooks estimates against closed forms.

Gaussian base N(μ, Σ) tilted by r(x) = a·x at λ: log Z = log E_base[e^{a·x/λ}] = a·μ/λ + aᵀΣa/(2λ²)
(= 1.5 + 1.33 = 2.83 at λ = 0.5). Normalised Gaussian-mixture energy: log ∫e^{−E} = 0.
Identities: W ≡ log Z with zero variance when the sampler is the exact tilt (Crooks with Q = P);
E_Q[W] ≤ log Z (Jensen) for any Q.
"""

import math

import torch

from tiltflow import estimators
from tiltflow.methods.finetune import finetune
from tiltflow.methods.sample_energy import gaussian_prior, sample_energy
from tiltflow.models import FlowModel, GaussianMixtureVelocity
from tiltflow.rewards import Linear, Quadratic
from tiltflow.tasks.energies import GaussianMixtureEnergy

MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[0.49, 0.1], [0.1, 0.3]])
A_LIN = torch.tensor([1.0, 0.5])


def gaussian(mu, cov):
    return FlowModel(GaussianMixtureVelocity([1.0], mu[None], cov[None]))


def test_jarzynski_log_z_of_a_fine_tuned_model_on_the_gaussian_tilt():
    """log E_base[e^{a·x/λ}] = a·μ/λ + aᵀΣa/(2λ²) = 2.83 at λ = 0.5 (a sharp tilt: plain Monte
    Carlo from the base has ESS ≈ 4 %); within 0.1 (the issue's tolerance; measured error 0.03,
    the base chain's 100-step discretisation included)."""
    lam = 0.5
    exact = float(A_LIN @ MU) / lam + float(A_LIN @ COV @ A_LIN) / (2 * lam**2)
    base = gaussian(MU, COV)
    ft = finetune(base, Linear(A_LIN), lam=lam, iters=150, batch_size=256, steps=50, lr=2e-3,
                  progress=False, seed=0)
    pw = estimators.jarzynski(ft, base, Linear(A_LIN), lam, n=4096, steps=100, seed=3)
    mc = estimators.jarzynski(base, base, Linear(A_LIN), lam, n=4096, steps=100, seed=3)
    print(f"exact {exact:.3f}  fine-tuned {pw.summary()}  base MC {mc.summary()}")
    assert abs(pw.log_Z - exact) < 0.1
    assert pw.elbo <= pw.log_Z + 1e-9
    assert pw.ess_fraction > 2 * mc.ess_fraction       # the fine-tuned proposal is the better one
    # reweighted mean of the tilted law N(μ + Σa/λ, Σ)
    m = pw.expectation(lambda x: x)
    torch.testing.assert_close(m.float(), MU + COV @ A_LIN / lam, atol=0.05, rtol=0)


def test_crooks_weights_are_constant_for_the_exact_sampler():
    """Q = exact tilted sampler, γ = its unnormalised density: dP/dQ = 1 up to the discretisation of
    the chain, so W ≈ log Z everywhere. A Gaussian 'energy' with known Z = (2π)^{d/2}|Σ|^{1/2}/c."""
    model = gaussian(MU, COV)
    c = 3.0
    prec = torch.linalg.inv(COV)
    log_gamma = lambda x: -0.5 * (((x - MU) @ prec) * (x - MU)).sum(1) - math.log(c)  # noqa: E731
    exact = math.log(2 * math.pi) + 0.5 * math.log(float(torch.linalg.det(COV))) - math.log(c)
    pw = estimators.crooks(model, log_gamma, n=2000, steps=200, seed=0)
    assert abs(pw.log_Z - exact) < 0.02
    assert pw.log_w.std() < 0.15           # a wrong backward kernel gives O(1) spread
    assert pw.ess_fraction > 0.95


def test_crooks_log_z_on_a_gaussian_mixture_energy():
    """Normalised 4-mode mixture (log Z = 0): a short Adjoint Sampling run, then Crooks."""
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0, std=1.0, seed=0)
    s = sample_energy(E, 2, prior_scale=4.0, epochs=60, batches_per_epoch=10, lr=2e-3, progress=False)
    pw = s.log_Z(8192, steps=50, seed=1)
    prior = estimators.crooks(gaussian_prior(2, 4.0), lambda x: -E(x), 8192, 50, seed=1)
    print("trained", pw.summary(), "prior", prior.summary())
    assert abs(pw.log_Z - E.log_Z) < 0.1
    assert pw.ess_fraction > prior.ess_fraction
    assert pw.elbo < pw.log_Z


def test_quadratic_tilt_log_z_and_bad_arguments():
    """r = −½|x|², λ = 1: Z = E_N(μ,Σ)[e^{−|x|²/2}] = |I + Σ|^{-1/2} exp(−½ μᵀ(I + Σ)⁻¹μ); exact
    base proposal (plain Monte Carlo) with 20000 samples is within 0.02."""
    base = gaussian(MU, COV)
    S = torch.eye(2) + COV
    exact = -0.5 * math.log(float(torch.linalg.det(S))) - 0.5 * float(MU @ torch.linalg.solve(S, MU))
    pw = estimators.jarzynski(base, base, Quadratic(torch.eye(2)), 1.0, n=20000, steps=100, seed=0)
    assert abs(pw.log_Z - exact) < 0.02
    import pytest
    with pytest.raises(ValueError, match="lam"):
        estimators.jarzynski(base, base, Quadratic(torch.eye(2)), 0.0, n=10, steps=5)
    with pytest.raises(ValueError, match="n must"):
        estimators.jarzynski(base, base, Quadratic(torch.eye(2)), 1.0, n=0, steps=5)
