"""Adjoint Matching against closed-form tilts p* ∝ p_base · exp(r/λ).

The bases are exact velocity fields of Gaussian(-mixture) data, so only the solver is under test.
Closed forms (algorithms.md §2): N(μ, Σ) tilted by a·x is N(μ + Σa/λ, Σ); by −½xᵀAx it is
N(Σ'Σ⁻¹μ, Σ'), Σ' = (Σ⁻¹ + A/λ)⁻¹; a mixture tilted by a·x keeps its components shifted by Σ_k a/λ
and reweights them ∝ π_k exp(a·μ_k/λ + aᵀΣ_k a/(2λ²)).

Why the tolerances have teeth (measured discretisation error of the lean adjoint with 50 steps:
~5 % of the shift): a missing factor 2 in u = 2Δv/σ halves or doubles the shift (error ≥ 50 %);
a wrong sign moves the mean the other way; a wrong σ(t) leaves the linear-tilt mean roughly right
but changes the quadratic-tilt covariance (the control then over- or under-shrinks).
"""

import pytest
import torch

from tiltflow import integrators
from tiltflow.methods.finetune import finetune
from tiltflow.models import FlowModel, GaussianMixtureVelocity
from tiltflow.paths import VPDiffusion
from tiltflow.rewards import Linear, Quadratic
from tiltflow.solvers import adjoint_matching as am
from tiltflow.tasks.toy2d import GaussianMixture

MU = torch.tensor([1.0, -0.5])
COV = torch.tensor([[0.49, 0.1], [0.1, 0.3]])
A_LIN = torch.tensor([1.0, 0.5])
FAST = dict(batch_size=256, steps=50, lr=2e-3, progress=False, seed=0)


def gaussian_base(path="rectified"):
    return FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None], path=path))


@pytest.mark.parametrize("scheme", ["exponential", "heun"])
def test_lean_adjoint_is_the_gradient_through_the_discrete_chain(scheme):
    """ã_i = −∇_{X_i} r(X_1)/λ along the base's memoryless chain with its noise held fixed
    (additive noise: the chain's Jacobian does not depend on it). Float64, so exact to round-off.
    "heun" evaluates v at a predictor that holds the noise, so its Jacobian does depend on it:
    the sweep is the gradient through the noise-free chain, checked on a noise-free chain."""
    torch.manual_seed(0)
    base = FlowModel(GaussianMixtureVelocity([0.3, 0.7], [[-1.0, 0.0], [1.5, 1.0]],
                                             torch.stack([0.3 * torch.eye(2), 0.5 * torch.eye(2)])))
    base.double()
    r = Quadratic(torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64))
    lam, steps, B = 0.7, 12, 5
    grid = integrators.time_grid(steps, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    noises = [torch.randn(B, 2, generator=g, dtype=torch.float64) * (scheme == "exponential") for _ in range(steps)]
    xs = [torch.randn(B, 2, generator=g, dtype=torch.float64).requires_grad_(True)]
    for i in range(steps):
        xs.append(integrators.memoryless_step(base.path, base.velocity, xs[-1], float(grid[i]), float(grid[i + 1]),
                                              noises[i], scheme))
        xs[-1].retain_grad()
    (r(xs[-1]).sum() / lam).backward()
    ro = am.Rollout(torch.stack([x.detach() for x in xs]), grid)
    a1, _ = am.terminal_adjoint(r, ro.xs[-1], lam)
    adj = am.lean_adjoint(base, ro, a1, scheme)
    for i in range(steps + 1):
        torch.testing.assert_close(adj[i], -xs[i].grad, rtol=1e-9, atol=1e-12)


def test_lean_adjoint_gives_the_exact_control_for_a_gaussian():
    """Gaussian base, linear reward: ∇b is x-independent, so ã is deterministic and
    −σ²ã/2 must equal the velocity difference of the two flows, Σa/λ·(1−t)/(t²s² + (1−t)²)
    (isotropic Σ = s²I). 200 steps: first-order error ≲ 3 % (measured); a factor-2 error is 100 %."""
    s2, lam = 0.49, 1.0
    base = FlowModel(GaussianMixtureVelocity([1.0], MU[None], s2 * torch.eye(2)[None])).double()
    grid = integrators.time_grid(200, dtype=torch.float64)
    ro = am.rollout(base, 3, grid, torch.Generator().manual_seed(0))
    a1, _ = am.terminal_adjoint(Linear(A_LIN.double()), ro.xs[-1], lam)
    adj = am.lean_adjoint(base, ro, a1)
    t = grid[20:181]                                                     # t ∈ [0.1, 0.9]
    pred = -(base.path.sigma(t) ** 2)[:, None] * adj[20:181, 0] / 2
    exact = (s2 * A_LIN.double() / lam)[None] * ((1 - t) / (t**2 * s2 + (1 - t) ** 2))[:, None]
    assert ((pred - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.05


def _reference_loss(ft, base, ro, adj, idx):
    """The loss of paper eq. 39 written out with its own base forward at the loss times:
    mean over (i ∈ S, trajectory) of ‖(2/σ_i)(v_ft − v_base)(X_i, t_i) + σ_i ã_i‖²."""
    total = 0.0
    for i in idx.tolist():
        t = ro.grid[i].expand(ro.xs.shape[1])
        s = float(ft.path.sigma(ro.grid[i]))
        with torch.no_grad():
            vb = base.velocity(ro.xs[i], t)
        res = (2.0 / s) * (ft.velocity(ro.xs[i], t) - vb) + s * adj[i]
        total = total + res.pow(2).sum(1).mean()
    return total / len(idx)


@pytest.mark.parametrize("scheme", ["exponential", "posterior", "heun"])
def test_base_velocity_from_the_adjoint_sweep_gives_the_two_forward_gradient(scheme):
    """lean_adjoint(..., idx) hands back v_base(X_i, t_i) at the loss times from its VJPs; the loss
    built on it (chunked 2 + 2 + 1 or in one pass) has the gradient, loss and KL of the formula
    with a second base forward (_reference_loss, and adjoint_matching_loss with v_base=None),
    to float32 rounding (~1e-7 relative per operation: rows batched, sums ordered differently). ã itself is unchanged. A v_base row
    taken at the wrong time (e.g. t_{i+1}, or the sweep's reversed order) moves the gradient by O(1)."""
    from tiltflow.methods.finetune import make_finetune_model
    from tiltflow.models.mlp import MLPVelocity

    torch.manual_seed(0)
    base = FlowModel(MLPVelocity(2, (32, 32)))
    base.requires_grad_(False)
    ft = make_finetune_model(base, "copy")
    with torch.no_grad():                      # ft ≠ base, so v_ft − v_base ≠ 0 enters the gradient
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    steps, B = 12, 6
    grid = integrators.time_grid(steps)
    ro = am.rollout(ft, B, grid, torch.Generator().manual_seed(1), scheme=scheme)
    a1, _ = am.terminal_adjoint(Quadratic(torch.eye(2)), ro.xs[-1], 0.7)
    idx, w = am.loss_times(steps, 5, torch.Generator().manual_seed(2))
    adj_old = am.lean_adjoint(base, ro, a1, scheme)
    adj, v_base = am.lean_adjoint(base, ro, a1, scheme, idx)
    assert torch.equal(adj, adj_old) and v_base.shape == (5, B, 2)
    for j, i in enumerate(idx.tolist()):
        torch.testing.assert_close(v_base[j], base.velocity(ro.xs[i], grid[i].expand(B)), rtol=1e-6, atol=1e-7)

    def grads(fn):
        ft.zero_grad(set_to_none=True)
        out = fn()
        return out, [p.grad.clone() for p in ft.parameters()]

    def reference():
        loss = _reference_loss(ft, base, ro, adj, idx)
        loss.backward()
        return float(loss.detach())

    ref_loss, ref = grads(reference)
    two = grads(lambda: am.backward_loss(ft, base, ro, adj, idx, w))
    for chunk in (None, 2):   # base=None: with v_base handed over, the loss runs no base forward
        (loss, kl), g = grads(lambda: am.backward_loss(ft, None, ro, adj, idx, w, chunk, v_base=v_base))
        assert loss == pytest.approx(ref_loss, rel=1e-5) and kl == pytest.approx(two[0][1], rel=1e-5)
        for a, b in zip(g, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    shifted = torch.stack([base.velocity(ro.xs[i + 1], grid[i + 1].expand(B)) for i in idx.tolist()])
    _, g = grads(lambda: am.backward_loss(ft, base, ro, adj, idx, w, v_base=shifted))
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g, ref)) > 0.01
    _, g = grads(lambda: am.backward_loss(ft, base, ro, adj, idx, w, v_base=v_base.flip(0)))
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(g, ref)) > 0.01


def test_gaussian_linear_tilt():
    """N(μ, Σ) · exp(a·x/λ) → N(μ + Σa/λ, Σ); shift Σa = (0.54, 0.25)."""
    ft = finetune(gaussian_base(), Linear(A_LIN), lam=1.0, iters=200, **FAST)
    x = ft.sample(20000, steps=50, seed=1)
    torch.testing.assert_close(x.mean(0), MU + COV @ A_LIN, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=0.05, rtol=0)


def test_gaussian_quadratic_tilt():
    """N(μ, Σ) · exp(−½xᵀAx/λ) → covariance (Σ⁻¹ + A/λ)⁻¹ (entries 0.33/0.06/0.23 vs base 0.49/0.1/0.3)."""
    A, lam = torch.eye(2), 1.0
    ft = finetune(gaussian_base(), Quadratic(A), lam=lam, iters=200, **FAST)
    x = ft.sample(20000, steps=50, seed=1)
    cov_t = torch.linalg.inv(torch.linalg.inv(COV) + A / lam)
    torch.testing.assert_close(torch.cov(x.T), cov_t, atol=0.03, rtol=0)
    torch.testing.assert_close(x.mean(0), cov_t @ torch.linalg.solve(COV, MU), atol=0.05, rtol=0)


def test_heun_rollouts_reach_the_quadratic_tilt_in_10_steps_where_exponential_misses():
    """N(μ, Σ) · exp((−½xᵀAx + b·x)/λ) → N(Σ'(Σ⁻¹μ + b/λ), Σ'), Σ' = (Σ⁻¹ + A/λ)⁻¹, mean shift 0.35.
    With 10 rollout steps the first-order exponential step leaves the mean 0.060 / 0.064 off
    (seeds 0 / 1, 200 iterations) and "heun" 0.012 / 0.009; 0.035 lies between, so the test fails
    if "heun" is no better than the exponential step (benchmarks/sde_schemes.py has the curve)."""
    A, b, lam = torch.diag(torch.tensor([2.0, 1.0])), torch.tensor([1.0, 1.0]), 1.0
    cov_t = torch.linalg.inv(torch.linalg.inv(COV) + A / lam)
    mean_t = cov_t @ (torch.linalg.solve(COV, MU) + b / lam)
    err = {}
    for scheme in ("exponential", "heun"):
        ft = finetune(gaussian_base(), Quadratic(A, b), lam=lam, iters=200, batch_size=128, steps=10, lr=3e-3,
                      lr_final=3e-4, seed=0, progress=False, n_offline=64, scheme=scheme)
        x = ft.sample(20000, steps=50, seed=1)
        err[scheme] = float((x.mean(0) - mean_t).norm())
        if scheme == "heun":
            torch.testing.assert_close(torch.cov(x.T), cov_t, atol=0.03, rtol=0)
    assert err["heun"] < 0.035 < err["exponential"], err


def _mixture_tilt(iters):
    """Samples (20000, 2) of a model fine-tuned for `iters` on the two-mode mixture below, the
    exact tilt, and the mask of samples in the right mode."""
    mix = GaussianMixture.isotropic([0.5, 0.5], [[-1.5, 0.0], [1.5, 0.0]], [0.5, 0.5])
    base = FlowModel(GaussianMixtureVelocity(mix.weights, mix.means, mix.covs))
    a = torch.tensor([0.5, 0.0])
    ft = finetune(base, Linear(a), lam=1.0, iters=iters, **FAST)
    x = ft.sample(20000, steps=50, seed=1)
    return x, mix.tilt_linear(a, 1.0), x[:, 0] > 0


def test_mixture_linear_tilt_moves_mass_to_the_rewarded_mode():
    """The short version of the test below (300 iterations, weight and right mean only): the
    right mode's weight must reach 0.818 ± 0.08 (measured 0.767), where a shift-only tilt stays
    at 0.5 and a sign error goes to 0.18; the right mean 1.625 ± 0.08 (measured 1.643; the base's
    is 1.5)."""
    x, exact, right = _mixture_tilt(300)
    assert right.float().mean().item() == pytest.approx(float(exact.weights[1]), abs=0.08)
    assert x[right, 0].mean().item() == pytest.approx(float(exact.means[1, 0]), abs=0.08)


@pytest.mark.slow
def test_mixture_linear_tilt_reweights_components():
    """Two modes at x₁ = ∓1.5 (std 0.5), equal weights, a = (0.5, 0), λ = 1: the right mode's
    weight becomes e^{1.5}/(1 + e^{1.5}) = 0.818 and each mode moves by Σa = 0.125.

    Moving mass between modes is the slow part of the solve: the decision is taken at small t,
    where the loss weight 4/σ² ≈ 2t is small. Measured (right weight / right mean / left mean):
    250 iterations 0.78 / 1.70 / −1.10, 1000 iterations 0.80 / 1.66 / −1.36 (exact 0.82 / 1.625
    / −1.375). A shift-only tilt keeps the weight at 0.5 and a sign error sends it to 0.18."""
    x, exact, right = _mixture_tilt(1000)
    assert right.float().mean().item() == pytest.approx(float(exact.weights[1]), abs=0.04)
    assert x[right, 0].mean().item() == pytest.approx(float(exact.means[1, 0]), abs=0.05)
    assert x[~right, 0].mean().item() == pytest.approx(float(exact.means[0, 0]), abs=0.08)


def test_vp_diffusion_base_linear_tilt():
    """The same tilt through the VP path's memoryless schedule (the DDPM sampler)."""
    ft = finetune(gaussian_base(VPDiffusion()), Linear(A_LIN), lam=1.0, iters=200, **FAST)
    x = ft.sample(20000, steps=100, seed=1)
    torch.testing.assert_close(x.mean(0), MU + COV @ A_LIN, atol=0.07, rtol=0)


def test_large_lambda_and_constant_reward_leave_the_model_unchanged():
    """A constant reward has ã ≡ 0 and Δv = 0 at the start, so the gradient is exactly zero and
    nothing moves. λ = 1e5 shrinks the target shift to Σa/λ ≈ 6e-6, but Adam normalises the
    gradient's scale, so 20 steps at lr 2e-3 still move the samples by ~2e-3 (measured); the
    bound 1e-2 is < 2 % of the shift at λ = 1 (0.6), which a λ-independent update would reach."""
    base = gaussian_base()
    ref = base.sample(4000, steps=30, seed=5)
    for reward, lam, tol in ((Linear(A_LIN), 1e5, 1e-2), (lambda x: 0.0 * x.sum(1) + 3.0, 1.0, 1e-6)):
        ft = finetune(base, reward, lam=lam, iters=20, **FAST)
        assert (ft.sample(4000, steps=30, seed=5) - ref).abs().max() < tol
    moved = finetune(base, Linear(A_LIN), lam=1.0, iters=20, **FAST)
    assert (moved.sample(4000, steps=30, seed=5) - ref).mean(0).norm() > 0.1  # the same 20 steps at λ = 1 do move


def test_base_is_left_untouched_and_learned_base_moves_by_the_predicted_amount():
    """A pretrained MLP on N(μ, Σ) data: fine-tuning shifts its own mean by Σa/λ."""
    from tiltflow.methods.pretrain import pretrain

    data = torch.distributions.MultivariateNormal(MU, COV).sample((4000,))
    base = pretrain(data, iters=800, hidden=(64, 64), progress=False, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m0 = base.sample(20000, steps=50, seed=1).mean(0)
    lam = 2.0
    ft = finetune(base, Linear(A_LIN), lam=lam, iters=200, **{**FAST, "lr": 5e-4})
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
    shift = ft.sample(20000, steps=50, seed=1).mean(0) - m0
    torch.testing.assert_close(shift, COV @ A_LIN / lam, atol=0.06, rtol=0)


def test_resume_continues_to_the_same_result(tmp_path):
    base = gaussian_base()
    kw = dict(FAST, batch_size=32, steps=10, checkpoint_every=5)
    full = finetune(base, Linear(A_LIN), lam=1.0, iters=10, out=tmp_path / "a", **kw)
    finetune(base, Linear(A_LIN), lam=1.0, iters=5, out=tmp_path / "b", **kw)          # "killed" at 5
    resumed = finetune(base, Linear(A_LIN), lam=1.0, iters=10, out=tmp_path / "b", resume=True, **kw)
    for (k, v), (_, w) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), k
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert len(log) == 10 and '"kl"' in log[-1] and '"reward_cvar_left_10"' in log[-1]


def test_bad_rewards_and_arguments():
    base = gaussian_base()
    kw = dict(FAST, batch_size=8, steps=4)
    cases = [
        (lambda x: x, "shape"),                                    # (batch, 2) instead of (batch,)
        (lambda x: x.sum(1) * float("nan"), "NaN"),
        (lambda x: torch.ones(x.shape[0]), "no gradient"),
    ]
    for reward, msg in cases:
        with pytest.raises(ValueError, match=msg):
            finetune(base, reward, lam=1.0, iters=1, **kw)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam must be"):
            finetune(base, Linear(A_LIN), lam=bad, iters=1, **kw)
    with pytest.raises(ValueError, match="iters must be"):
        finetune(base, Linear(A_LIN), lam=1.0, iters=0, **kw)
    with pytest.raises(ValueError, match="unknown finetune options"):
        finetune(base, Linear(A_LIN), lam=1.0, iters=1, batchsize=3)
    with pytest.raises(ValueError, match="scheme must be one of 'exponential', 'heun'.*got 'huen'"):
        finetune(base, Linear(A_LIN), lam=1.0, iters=1, scheme="huen", **kw)
    with pytest.raises(ValueError, match="solver 'cmcd' builds its own batch"):
        finetune(base, Linear(A_LIN), lam=1.0, iters=1, scheme="heun", solver="cmcd", **kw)
