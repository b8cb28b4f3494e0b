"""Gradual Fine-Tuning (methods/gft.py) against closed forms for Gaussian base → Gaussian target.

Closed form used throughout (rectified flow x_t = t x1 + (1 − t) x0, x0 ~ N(0, I)): data
N(m, S) has p_t = N(t m, C_t), C_t = t² S + (1 − t)² I, and marginal velocity

    u(x, t) = m + (t S − (1 − t) I) C_t⁻¹ (x − t m).

The GFT objective at temperature τ, J_τ = E_q‖v − u_q‖² + τ E_p‖v − v_pre‖² (x_t from the
target path in the first term and from the pretrained path in the second), is minimised
pointwise by v*_τ = (q_t u_q + τ p_t u_p)/(q_t + τ p_t): the velocity of the mixture
(N_q + τ N_p)/(1 + τ).
"""

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import tiltflow as tilt
from tiltflow import cli
from tiltflow.methods import gft
from tiltflow.models import FlowModel, GaussianMixtureVelocity

M_P, M_Q = torch.tensor([-1.0, 0.5]), torch.tensor([1.0, -0.5])
S_P = torch.tensor([[0.5, 0.1], [0.1, 0.3]])
S_Q = torch.tensor([[0.3, -0.1], [-0.1, 0.6]])


def gaussian_samples(m, S, n, seed):
    g = torch.Generator().manual_seed(seed)
    return m + torch.randn(n, 2, generator=g) @ torch.linalg.cholesky(S).T


def pretrained_model():
    """The pretrained model is exact: the closed-form velocity of N(M_P, S_P)."""
    return FlowModel(GaussianMixtureVelocity([1.0], M_P[None], S_P[None]))


def gaussian_velocity_and_density(x, t, m, S):
    """u(x, t) and p_t(x) of data N(m, S) on the rectified path, in float64 (derived above)."""
    x, t, m, S = x.double(), t.double()[:, None, None], m.double(), S.double()
    eye = torch.eye(2, dtype=torch.float64)
    C = t**2 * S + (1 - t) ** 2 * eye                                    # (B, 2, 2)
    r = x - t[:, 0] * m
    sol = torch.linalg.solve(C, r[..., None])                            # C⁻¹ (x − t m)
    u = m + ((t * S - (1 - t) * eye) @ sol)[..., 0]
    logp = -0.5 * (r[..., None] * sol).sum((1, 2)) - 0.5 * torch.logdet(C) - math.log(2 * math.pi)
    return u, logp.exp()


def minimiser(x, t, tau):
    """v*_τ = (q_t u_q + τ p_t u_p) / (q_t + τ p_t)."""
    uq, q = gaussian_velocity_and_density(x, t, M_Q, S_Q)
    up, p = gaussian_velocity_and_density(x, t, M_P, S_P)
    return (q[:, None] * uq + tau * p[:, None] * up) / (q + tau * p)[:, None]


def naive_minimiser(x, t, tau):
    """(u_q + τ u_p)/(1 + τ): the minimiser if both terms used the same x_t law — wrong here."""
    uq, _ = gaussian_velocity_and_density(x, t, M_Q, S_Q)
    up, _ = gaussian_velocity_and_density(x, t, M_P, S_P)
    return (uq + tau * up) / (1 + tau)


class Perturbed(nn.Module):
    """v(x, t) = v_c(x, t) + δ h(x, t) with a scalar parameter δ (0 at start)."""

    dim = 2

    def __init__(self, candidate, tau):
        super().__init__()
        self.candidate, self.tau = candidate, tau
        self.delta = nn.Parameter(torch.zeros(()))

    @staticmethod
    def h(x, t):
        # a few smooth directions; the minimiser is orthogonal (in L²) to every one of them
        return torch.stack([torch.sin(x[:, 0]) * t + x[:, 1], torch.cos(x[:, 1]) * (1 - t) - x[:, 0] * t], 1)

    def forward(self, x, t, cond=None):
        return self.candidate(x, t, self.tau).float() + self.delta * self.h(x, t)


def _first_order(candidate, tau, n=100_000, seed=0):
    """dL_τ/dδ at δ = 0 by autograd through gft.gft_loss, and its Monte Carlo standard error."""
    g = torch.Generator().manual_seed(seed)
    x1 = gaussian_samples(M_Q, S_Q, n, seed + 10)
    x0 = torch.randn(n, 2, generator=g)
    t = torch.rand(n, generator=g)
    xp1 = gaussian_samples(M_P, S_P, n, seed + 20)
    tp = torch.rand(n, generator=g)
    xp = tp[:, None] * xp1 + (1 - tp[:, None]) * torch.randn(n, 2, generator=g)
    batch = {"x0": x0, "x1": x1, "t": t, "xp": xp, "tp": tp}
    model = FlowModel(Perturbed(candidate, tau), "rectified", (2,))
    loss, _, _ = gft.gft_loss(model, pretrained_model(), batch, tau)
    grad = torch.autograd.grad(loss, model.net.delta)[0].item()
    # per-sample terms of the same derivative, for the standard error
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    a = 2 * ((candidate(xt, t, tau).float() - (x1 - x0)) * Perturbed.h(xt, t)).sum(1)
    v_pre = pretrained_model().velocity(xp, tp)
    b = 2 * tau * ((candidate(xp, tp, tau).float() - v_pre) * Perturbed.h(xp, tp)).sum(1)
    se = math.sqrt((a.var() + b.var()).item() / n) / (1 + tau)
    return grad, se


@pytest.mark.parametrize("tau", [3.0, 1.0, 0.3, 0.0])
def test_intermediate_objective_is_minimised_by_the_mixture_velocity(tau):
    # First-order optimality of v*_τ for the library's loss: dL/dδ ≈ 0 within 4 standard errors,
    # while the convex combination of the two velocities is far from stationary (τ > 0).
    grad, se = _first_order(minimiser, tau)
    assert abs(grad) < 4 * se, (grad, se)
    if tau > 0:
        grad_bad, se_bad = _first_order(naive_minimiser, tau)
        assert abs(grad_bad) > 10 * se_bad, (grad_bad, se_bad)


def test_minimiser_is_the_velocity_of_the_mixture_path():
    # v*_τ equals the closed-form velocity of (N_q + τ N_p)/(1 + τ): the minimiser generates the
    # mixture π_τ at t = 1, the pretrained model as τ → ∞ and the target as τ → 0.
    g = torch.Generator().manual_seed(1)
    x, t = 2 * torch.randn(500, 2, generator=g), torch.rand(500, generator=g) * 0.98
    for tau in (5.0, 1.0, 0.1):
        mix = GaussianMixtureVelocity([1.0, tau], torch.stack([M_Q, M_P]), torch.stack([S_Q, S_P]))
        torch.testing.assert_close(minimiser(x, t, tau).float(), mix(x, t), atol=1e-4, rtol=1e-4)


def _moments(x):
    return x.mean(0), torch.cov(x.T)


TARGET = gaussian_samples(M_Q, S_Q, 4000, seed=3)
FAST = dict(stages=4, iters_per_stage=150, residual_hidden=(64, 64), lr=2e-3, n_pretrained=2000, progress=False)
# mean ±0.08, covariance ±0.1: observed errors ~0.03 (4000 samples: Monte Carlo ~0.015); a
# method that stopped at τ = 1 would be off by 1.0 in the mean, the base by 2.0.
TOL_MEAN, TOL_COV = 0.08, 0.1


def _check_target(x):
    mean, cov = _moments(x)
    assert (mean - M_Q).abs().max() < TOL_MEAN, mean
    assert (cov - S_Q).abs().max() < TOL_COV, cov


def test_end_of_schedule_matches_target_and_base_is_untouched():
    base = pretrained_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ft = tilt.gradual_finetune(base, TARGET, schedule="geometric", coupling="independent", **FAST)
    _check_target(ft.sample(4000, steps=30, seed=1))
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
    # the independent-coupling minimiser is curved: one Euler step lands on the mean (v(x, 0) = m − x)
    x1 = ft.sample(4000, steps=1, method="euler", seed=1)
    assert torch.cov(x1.T).trace() < 0.1 * S_Q.trace()


def test_ot_coupling_has_the_same_terminal_law_and_straighter_paths():
    # Same minimiser in law (π_τ → target), along near-straight paths: the OT map of N(0, I) to
    # N(m, S) is x ↦ m + S^½ x, so one Euler step already reproduces most of the covariance.
    ft = tilt.gradual_finetune(pretrained_model(), TARGET, coupling="ot", **FAST)
    _check_target(ft.sample(4000, steps=30, seed=1))
    x1 = ft.sample(4000, steps=1, method="euler", seed=1)
    assert torch.cov(x1.T).trace() > 0.6 * S_Q.trace()



def _log_gauss(x, m, S):
    r = (x - m).double()
    return -0.5 * (r @ torch.linalg.inv(S.double()) * r).sum(1) - 0.5 * torch.logdet(S.double())


def test_intermediate_stage_generates_the_mixture_not_the_target(tmp_path):
    """What only GFT does: at the end of the stage at τ = 1 the model generates π_1 = ½ N(M_Q, S_Q) +
    ½ N(M_P, S_P) (the minimiser's law, closed form: mean (M_Q + M_P)/2 = 0, covariance
    (S_Q + S_P)/2 + ¼ΔΔᵀ with Δ = M_Q − M_P = (2, −1)), then the target at τ = 0. Plain fine-tuning
    (schedule [0.0]) is at the target from the start: at this check its mean is off by 1.0 and its
    covariance by 1.2; the naive convex combination of the two velocities (the wrong minimiser of the
    first test) gives a unimodal law with covariance off by 1.0. Measured at τ = 1 (independent
    coupling, 150 steps per stage, ~3 s) over training seeds 0-2: mean error ≤ 0.076, covariance
    ≤ 0.097; tolerances 0.12 / 0.15. The share of samples closer (in density) to the target component
    is the mixture weight 1/(1 + τ) = ½ up to the overlap (0.498 on exact π_1 samples): measured
    within 0.021, tolerance 0.04 (plain fine-tuning: ≈ 1)."""
    S = 150
    ft = tilt.gradual_finetune(pretrained_model(), TARGET, schedule=(1.0, 0.0), coupling="independent",
                               out=tmp_path, **{**FAST, "iters_per_stage": S, "checkpoint_every": S})
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / "checkpoints" / f"step_{S:08d}.safetensors"))   # the end of stage τ = 1
    mid = ft.copy()
    mid.load_state_dict({k[len("model."):]: v for k, v in w.items() if k.startswith("model.")})
    x = mid.sample(4000, steps=30, seed=1)
    d = M_Q - M_P
    mean, cov = _moments(x)
    print("τ = 1:", mean.tolist(), cov.tolist())
    assert (mean - (M_Q + M_P) / 2).abs().max() < 0.12, mean
    assert (cov - ((S_Q + S_P) / 2 + torch.outer(d, d) / 4)).abs().max() < 0.15, cov
    exact = torch.cat([gaussian_samples(M_Q, S_Q, 10000, 7), gaussian_samples(M_P, S_P, 10000, 8)])
    share = lambda y: float((_log_gauss(y, M_Q, S_Q) > _log_gauss(y, M_P, S_P)).double().mean())  # noqa: E731
    assert abs(share(x) - share(exact)) < 0.04, (share(x), share(exact))
    _check_target(ft.sample(4000, steps=30, seed=1))

def test_marginal_variant_matches_target():
    ft = tilt.gradual_finetune(pretrained_model(), TARGET, coupling="independent", variant="marginal",
                               n_ref=512, **FAST)
    _check_target(ft.sample(4000, steps=30, seed=1))


def test_stochastic_flow_matches_target_with_the_sde():
    ft = tilt.gradual_finetune(pretrained_model(), TARGET, coupling="independent", flow="stochastic", **FAST)
    _check_target(ft.sample(4000, steps=100, sde=True, seed=1))


def test_empirical_velocity_of_one_point_is_the_conditional_velocity():
    # With one reference point x1 the marginal velocity is α̇ x1 + β̇ (x − α x1)/β = (x1 − x)/(1 − t).
    path = tilt.paths.RectifiedFlow()
    x, t, ref = torch.randn(10, 2), torch.rand(10) * 0.9, torch.randn(1, 2)
    torch.testing.assert_close(gft.empirical_velocity(path, x, t, ref), (ref - x) / (1 - t[:, None]))


# --- couplings -------------------------------------------------------------------------------

@pytest.mark.parametrize("coupling,tol", [("independent", 1e-12), ("ot", 1e-12), ("sinkhorn", 1e-4)])
def test_coupling_plans_preserve_the_marginals(coupling, tol):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(128, 2, generator=g), 0.5 * torch.randn(128, 2, generator=g) + 2
    plan = gft.coupling_plan(x0, x1, coupling, reg=0.05)
    # tolerance: emd is exact; sinkhorn stops at a marginal violation of 1e-6 (relative 1e-4)
    np.testing.assert_allclose(plan.sum(1) * 128, 1.0, atol=tol)
    np.testing.assert_allclose(plan.sum(0) * 128, 1.0, atol=tol)
    if coupling == "ot":
        assert ((plan > 0).sum(1) == 1).all()                         # a permutation
        cost = lambda P: float((P * torch.cdist(x0.double(), x1.double()).pow(2).numpy()).sum())  # noqa: E731
        assert cost(plan) < cost(gft.coupling_plan(x0, x1, "independent"))
    p0, p1 = gft.pair(x0, x1, coupling, g)
    assert torch.equal(p0, x0)
    if coupling != "sinkhorn":                                        # x1 kept exactly (a permutation)
        assert torch.equal(torch.sort(p1, 0).values, torch.sort(x1, 0).values)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(tau_end=0.5), "cool to"),
    (dict(schedule=[1.0, 0.5, 0.2]), "cool to"),
    (dict(schedule=[0.0, 1.0, 0.0]), "must not increase"),
    (dict(schedule=[1.0, -0.1]), ">= 0"),
    (dict(schedule="exponential"), "schedule must be one of"),
    (dict(schedule="geometric", tau_end=0.0), "geometric schedule needs"),
    (dict(variant="marginal", coupling="ot"), "coupling='independent'"),
    (dict(coupling="emd"), "coupling must be"),
    (dict(flow="sde"), "flow must be"),
    (dict(iters_per_stage=0), "iters_per_stage"),
    (dict(lr_typo=1.0), "unknown gradual_finetune options"),
])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tilt.gradual_finetune(pretrained_model(), TARGET, progress=False, **kwargs)


def test_bad_target_samples_raise():
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        tilt.gradual_finetune(pretrained_model(), torch.randn(100, 3), progress=False)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        tilt.gradual_finetune(pretrained_model(), torch.randn(100), progress=False)
    bad = TARGET.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match="1 of 4000 rows with NaN"):
        tilt.gradual_finetune(pretrained_model(), bad, progress=False)
    with pytest.raises(ValueError, match="FlowModel"):
        tilt.gradual_finetune(lambda x, t: x, TARGET, progress=False)


def test_missing_pot_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)        # makes `import ot` raise ImportError
    for coupling in ("ot", "sinkhorn"):
        with pytest.raises(ImportError, match=r"tiltflow\[ot\]"):
            tilt.gradual_finetune(pretrained_model(), TARGET, coupling=coupling, progress=False)


# --- run folder and resume -------------------------------------------------------------------

def test_run_folder_and_resume_give_the_same_weights(tmp_path):
    small = dict(stages=2, iters_per_stage=20, checkpoint_every=20, residual_hidden=(16,), n_pretrained=256,
                 batch_size=64, coupling="ot", progress=False)
    full = tilt.gradual_finetune(pretrained_model(), TARGET, out=tmp_path / "a", **small)
    for f in ("config.json", "log.jsonl", "metrics.json", "model.safetensors"):
        assert (tmp_path / "a" / f).is_file(), f

    class Stop(Exception):
        pass

    def stop_at_20(step, record):
        if step == 20:
            raise Stop

    with pytest.raises(Stop):
        tilt.gradual_finetune(pretrained_model(), TARGET, out=tmp_path / "b", callback=stop_at_20, **small)
    resumed = tilt.gradual_finetune(pretrained_model(), TARGET, out=tmp_path / "b", resume=True, **small)
    for (k, v), w in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    loaded = FlowModel.load(tmp_path / "b" / "model.safetensors")
    x = torch.randn(5, 2)
    torch.testing.assert_close(loaded.velocity(x, 0.3), resumed.velocity(x, 0.3))


# --- command line ----------------------------------------------------------------------------

def test_cli_gft_runs_and_reports_user_errors(tmp_path):
    threads = torch.get_num_threads()
    pre = tmp_path / "pre"
    tilt.pretrain(tilt.toy2d.get_task("gaussian"), iters=60, hidden=(32, 32), batch_size=128, out=pre,
                  progress=False)
    target = tmp_path / "target.npy"
    np.save(target, TARGET.numpy())
    common = ["--run", str(pre), "--stages", "2", "--steps-per-stage", "20", "--batch-size", "64",
              "--n-pretrained", "256", "--no-progress"]
    try:
        assert cli.main(["gft", *common, "--target", str(target), "--out", str(tmp_path / "gft")]) == 0
        for f in ("config.json", "log.jsonl", "metrics.json", "model.safetensors"):
            assert (tmp_path / "gft" / f).is_file(), f
        # an explicit schedule on the command line, standard fine-tuning
        assert cli.main(["gft", *common, "--target", str(target), "--schedule", "0", "--coupling", "independent",
                         "--out", str(tmp_path / "ft")]) == 0
        bad3 = tmp_path / "bad.npy"
        np.save(bad3, np.zeros((10, 3), dtype=np.float32))
        assert cli.main(["gft", *common, "--target", str(bad3), "--out", str(tmp_path / "x")]) == 2
        assert cli.main(["gft", *common, "--target", str(tmp_path / "t.txt"), "--out", str(tmp_path / "x")]) == 2
        assert cli.main(["gft", *common, "--target", str(target), "--tau-end", "0.5",
                         "--out", str(tmp_path / "x")]) == 2
        assert cli.main(["gft", "--run", str(tmp_path / "nope"), "--target", str(target), "--no-progress",
                         "--out", str(tmp_path / "x")]) == 2
    finally:
        torch.set_num_threads(threads)


def test_default_coupling_works_without_pot(monkeypatch, caplog):
    # a core install has no POT: the default coupling ("auto") must fall back to the independent
    # coupling with a warning naming the extra, not stop with ImportError; with POT it is exact OT
    import importlib.util
    from tiltflow.methods import gft as gft_mod
    assert gft_mod._coupling("auto", "conditional") == "ot"          # POT is installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ot" else real(name, *a))
    with caplog.at_level("WARNING", logger="tiltflow"):
        assert gft_mod._coupling("auto", "conditional") == "independent"
    assert "tiltflow[ot]" in caplog.text
    assert gft_mod._coupling("auto", "marginal") == "independent"
    assert gft_mod.GFTConfig(iters_per_stage=3).iters_per_stage == 3
    with pytest.warns(DeprecationWarning, match="use `iters_per_stage`"):
        assert gft_mod.GFTConfig(steps_per_stage=4).iters_per_stage == 4
    with pytest.raises(ValueError, match="iters_per_stage"):
        gft_mod.GFTConfig(iters_per_stage=0)
