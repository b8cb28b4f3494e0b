"""The CUDA tier: closed forms and one short run of each public entry point on a GPU.

Every test takes `device`: "cuda" runs where torch.cuda.is_available() (marker `cuda`,
`pytest -m cuda tests/test_cuda.py`), and is skipped elsewhere; "cpu" runs the same body on the
CPU, so the bodies are known to pass without a GPU (the fine-tuning closed form is `slow` there:
`pytest -m slow tests/test_cuda.py`). Closed forms (test_adjoint_matching.py, test_objectives.py):
N(μ, Σ) tilted by a·x/λ is N(μ + Σa/λ, Σ); the exact flow of N(μ, Σ) samples N(μ, Σ) and its
log-likelihood is the Gaussian log-density; stage 1 of CVaR solves the same 1-D problem whatever
device the rewards come from.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import tiltflow as tilt
from tiltflow import cli, metrics
from tiltflow.models import FlowModel, GaussianMixtureVelocity
from tiltflow.objectives import solve_threshold
from tiltflow.rewards import Linear

MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[0.49, 0.1], [0.1, 0.3]])
A_LIN = torch.tensor([1.0, 0.5])

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, _NO_CUDA])
DEVICES = ["cpu", CUDA]                                             # short runs: the CPU variant is fast
CLOSED_FORM = [pytest.param("cpu", marks=pytest.mark.slow), CUDA]   # 20 s on one CPU thread


def gaussian_base():
    return FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))


def _on(model, device):
    assert model.device.type == device, (model.device, device)


# --- closed forms ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", CLOSED_FORM)
def test_gaussian_linear_tilt_on_the_device(device):
    """N(μ, Σ)·exp(a·x/λ) → N(μ + Σa/λ, Σ), shift Σa = (0.54, 0.25): the settings and tolerance of
    test_adjoint_matching.test_gaussian_linear_tilt (0.05 ≈ the 50-step discretisation error;
    a factor-2 error in the control moves the mean by ≥ 0.27)."""
    ft = tilt.finetune(gaussian_base(), Linear(A_LIN), lam=1.0, iters=200, batch_size=256, steps=50, lr=2e-3,
                       progress=False, seed=0, device=device)
    _on(ft, device)
    x = ft.sample(20000, steps=50, seed=1).cpu()
    torch.testing.assert_close(x.mean(0), MU + COV @ A_LIN, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=0.05, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_and_log_prob_of_the_exact_gaussian_flow(device):
    """The exact velocity of N(μ, Σ): ODE and SDE samples have mean μ and covariance Σ (20000
    samples: standard error ≈ 0.005; 0.03 leaves room for the 50-step discretisation), and
    log_prob (exact divergence, 100 Heun steps) is the Gaussian log-density to 0.01 (measured
    0.002 at 50 steps on the CPU)."""
    base = gaussian_base().to(device)
    for sde in (False, True):
        x = base.sample(20000, steps=50, sde=sde, seed=1)
        assert x.device.type == device
        x = x.cpu()
        torch.testing.assert_close(x.mean(0), MU, atol=0.03, rtol=0)
        torch.testing.assert_close(torch.cov(x.T), COV, atol=0.03, rtol=0)
    y = torch.distributions.MultivariateNormal(MU, COV).sample((300,))
    lp = base.log_prob(y.to(device), steps=100)
    assert lp.device.type == device
    torch.testing.assert_close(lp.cpu(), torch.distributions.MultivariateNormal(MU, COV).log_prob(y), atol=0.01, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_cvar_stage_one_on_device_rewards_equals_the_cpu_result(device):
    """Stage 1 solves the same 1-D problem in float64 whatever device the rewards are on: the
    threshold and dual value equal the CPU solution exactly, and g_η* on device samples equals
    g_η* on the same samples on the CPU (float32 rounding)."""
    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    for tail in ("right", "left"):
        cpu = tilt.CVaR(Linear(A_LIN), 0.1, tail, track=False)
        dev = tilt.CVaR(Linear(A_LIN), 0.1, tail, track=False)
        g_cpu, g_dev = cpu.pseudo_reward(x, lam=0.5), dev.pseudo_reward(x.to(device), lam=0.5)
        assert dev.solution == cpu.solution == solve_threshold(x @ A_LIN, 0.1, 0.5, tail)
        out = g_dev(x[:100].to(device))
        assert out.device.type == device
        torch.testing.assert_close(out.cpu(), g_cpu(x[:100]))
        assert metrics.cvar((x @ A_LIN).to(device), 0.1, tail) == pytest.approx(metrics.cvar(x @ A_LIN, 0.1, tail))
    r = (x @ A_LIN).to(device)
    assert metrics.reward_summary(r) == pytest.approx(metrics.reward_summary(r.cpu()))


# --- one short run of each entry point -----------------------------------------------------------

TINY = dict(iters=2, batch_size=8, steps=4, n_offline=16, progress=False)


@pytest.mark.parametrize("device", DEVICES)
def test_pretrain_on_the_device(device, tmp_path):
    m = tilt.pretrain(tilt.toy2d.get_task("mixture"), 3, batch_size=16, hidden=(8, 8), progress=False,
                      device=device, out=tmp_path)
    _on(m, device)
    assert json.loads((tmp_path / "config.json").read_text())["device"].startswith(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", ["expected", "cvar-right", "cvar-left"])
def test_finetune_each_objective_on_the_device(device, objective):
    r = Linear(A_LIN)
    obj = tilt.ExpectedReward(r) if objective == "expected" else tilt.CVaR(r, 0.2, objective.split("-")[1])
    ft = tilt.finetune(gaussian_base(), obj, n_loss_times=2, device=device, **TINY)
    _on(ft, device)
    assert torch.isfinite(ft.sample(4, steps=3)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["adjoint_sampling", "target_score_matching", "cmcd", "nets"])
def test_finetune_other_solvers_on_the_device(device, solver):
    _on(tilt.finetune(gaussian_base(), Linear(A_LIN), solver=solver, n_loss_times=2, device=device, **TINY), device)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_keeps_a_model_on_its_device(device):
    """device="auto" (the default): a model already on the GPU is fine-tuned there, never moved to the CPU."""
    ft = tilt.finetune(gaussian_base().to(device), Linear(A_LIN), **TINY)
    _on(ft, "cuda" if torch.cuda.is_available() else device)


@pytest.mark.parametrize("device", DEVICES)
def test_fdc_on_the_device(device):
    ft = tilt.fdc(gaussian_base(), tilt.Entropy(steps=3), tilt.KL(steps=3), iters_outer=1, n_eval=8, eval_steps=3,
                  n_kl=4, device=device, **TINY)
    _on(ft, device)


@pytest.mark.parametrize("device", DEVICES)
def test_gradual_finetune_on_the_device(device):
    target = torch.randn(32, 2).to(device)      # target samples may live on the device too
    ft = tilt.gradual_finetune(gaussian_base(), target, coupling="independent", stages=2, iters_per_stage=2,
                               batch_size=8, n_pretrained=16, pretrained_steps=3, progress=False, device=device)
    _on(ft, device)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_energy_on_the_device(device):
    from tiltflow.tasks.energies import get_energy
    s = tilt.sample_energy(get_energy("gmm40"), 2, hidden=(8, 8), iters=4, samples_per_rollout=8,
                           iters_per_rollout=2, batch_size=8, buffer_size=16, steps=3, progress=False, device=device)
    _on(s.model, device)
    assert s.sample(4).device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_estimators_on_the_device(device):
    base = gaussian_base().to(device)
    lg = lambda x: -0.5 * x.pow(2).sum(1)  # noqa: E731
    for w in (tilt.jarzynski(base, base, Linear(A_LIN), 1.0, n=16, steps=4), tilt.crooks(base, lg, n=16, steps=4),
              tilt.crooks_two_sided(base, lg, torch.randn(16, 2, device=device), n=16, steps=4)):
        assert math.isfinite(w.log_Z)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_demo_fast_on_the_device(device, tmp_path):
    assert cli.main(["demo", "--fast", "--pretrain-steps", "20", "--iters", "2", "--batch-size", "16",
                     "--n-eval", "50", "--n-kl", "10", "--device", device, "--out", str(tmp_path),
                     "--no-progress"]) == 0
    assert json.loads((tmp_path / "expected" / "config.json").read_text())["device"].startswith(device)
