"""Tail-aware fine-tuning (TFFT) end to end, against quadrature.

Base N(μ, Σ) with the exact velocity and reward r(x) = a·x + c, so under the base r ~ N(m, s²),
m = a·μ + c, s² = aᵀΣa. The optimal tilt p* ∝ p_base · exp(g_η*(r)/λ) has a 1-D reward law
p*(r) ∝ N(r; m, s²) · exp(g_η*(r)/λ), whose CVaR we compute by quadrature on a fine grid.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from tiltflow.methods.finetune import finetune
from tiltflow.metrics import cvar
from tiltflow.models import FlowModel, GaussianMixtureVelocity
from tiltflow.objectives import CVaR, solve_threshold

MU = torch.tensor([1.0, -0.5])
COV = 0.49 * torch.eye(2)
A = torch.tensor([1.0, 0.5])
C = 2.0
M, S = float(A @ MU) + C, float(A @ COV @ A) ** 0.5


def reward(x, cond=None):
    return x @ A + C


def tilted_cvar(eta, level, lam, tail, m=M, s=S):
    """CVaR_β of the reward under p*(r) ∝ N(r; m, s²) exp(g_η(r)/λ), by quadrature on a grid."""
    r = np.linspace(m - 12 * s, m + 12 * s + 3 * s * s / (level * lam), 400001)
    g = np.maximum(r - eta, 0) / level if tail == "right" else -np.maximum(eta - r, 0) / level
    logp = stats.norm.logpdf(r, m, s) + g / lam
    p = np.exp(logp - logp.max())
    cdf = integrate.cumulative_trapezoid(p, r, initial=0)
    p, cdf = p / cdf[-1], cdf / cdf[-1]
    if tail == "right":
        q = np.interp(1 - level, cdf, r)
        mask = r >= q
    else:
        q = np.interp(level, cdf, r)
        mask = r <= q
    return float(integrate.trapezoid((r * p)[mask], r[mask]) / level)


def exact_eta(level, lam, tail, law_pdf, lo, hi):
    """η* and F(η*) of F(η) = η + λ log E exp(g_η(r)/λ) for a 1-D reward law: trapezoid quadrature
    on a 2·10⁵-point grid (error ≪ 1e-4 for these smooth laws), dense η grid, then Brent."""
    r = np.linspace(lo, hi, 200_001)
    pdf = law_pdf(r)

    def F(eta):
        g = np.maximum(r - eta, 0) / level if tail == "right" else -np.maximum(eta - r, 0) / level
        return eta + lam * math.log(integrate.trapezoid(pdf * np.exp(g / lam), r))

    sign = 1.0 if tail == "right" else -1.0  # right: min F; left: max F (not concave: global search)
    grid = np.linspace(lo + 2, hi - 2, 400)
    i = int(np.argmin([sign * F(e) for e in grid]))
    res = optimize.minimize_scalar(lambda e: sign * F(e), bounds=(grid[max(i - 1, 0)], grid[min(i + 1, 399)]),
                                   method="bounded", options={"xatol": 1e-6})
    return float(res.x), F(res.x)


@pytest.mark.parametrize("tail", ["right", "left"])
@pytest.mark.parametrize("level", [0.05, 0.2, 1.0])
def test_stage1_matches_quadrature_on_a_mixture_law(tail, level):
    """r ~ 0.6 N(0, 1) + 0.4 N(3, 0.5²), λ = 10, 10⁵ samples: η* within 0.05 of quadrature (β < 1).
    λ = 10 keeps the tilted law inside what 10⁵ base samples cover (tilt slope 1/(βλ) ≤ 2); at
    λ = 1, β = 0.05 the exact η* = 8.4 lies beyond every sample, which no batch method can see.
    At β = 1 η* is not unique (any η ≤ min r for the right tail), so the dual value is compared."""
    pdf = lambda r: 0.6 * stats.norm.pdf(r, 0, 1) + 0.4 * stats.norm.pdf(r, 3, 0.5)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    n = 100_000
    comp = torch.rand(n, generator=g) < 0.6
    r = torch.where(comp, torch.randn(n, generator=g), 3 + 0.5 * torch.randn(n, generator=g)).double()
    sol = solve_threshold(r, level, 10.0, tail)
    eta, val = exact_eta(level, 10.0, tail, pdf, -10.0, 12.0)
    if level < 1:
        assert sol.eta == pytest.approx(eta, abs=0.05)
    assert sol.value == pytest.approx(val, abs=0.02)


def test_level_one_right_tail_is_expected_reward():
    """β = 1: g = (r − η*)₊ with η* ≤ min r, i.e. r minus a constant: the same tilt as r."""
    x = torch.distributions.MultivariateNormal(MU, COV).sample((4096,))
    for track in (False, True):
        obj = CVaR(reward, level=1.0, tail="right", track=track)
        g = obj.pseudo_reward(x, lam=1.0)
        xt = torch.distributions.MultivariateNormal(MU, COV).sample((512,)).requires_grad_(True)
        gv = g(xt)
        diff = (gv - reward(xt)).detach()
        assert diff.std() < 1e-6
        (grad,) = torch.autograd.grad(gv.sum(), xt)
        torch.testing.assert_close(grad, A.expand(512, 2))


def optimal_eta(level, lam, tail):
    """η* of the exact optimum for the Gaussian reward law N(M, S²) (quadrature, exact_eta)."""
    pdf = lambda r: stats.norm.pdf(r, M, S)  # noqa: E731
    return exact_eta(level, lam, tail, pdf, M - 12 * S, M + 12 * S + 3 * S * S / (level * lam))[0]


@pytest.mark.parametrize("tail", ["left", "right"])
def test_end_to_end_cvar_matches_the_exact_tilt_and_beats_expected_reward(tail):
    """λ = 5, β = 0.1: the fine-tuned model's CVaR (10⁴ samples) closes the base → optimum gap
    to within 10 % (the optimum: the tilt at the quadrature η*, not at stage 1's η̂; the sampling
    sd of a 10⁴-sample CVaR is ≈ 0.03, 5 % of the gain; measured: 103 % right, 99 % left), and
    lies above what the exact expected-reward tilt N(μ + Σa/λ, Σ) reaches on the same tail."""
    level, lam = 0.1, 5.0
    base = FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))
    obj = CVaR(reward, level=level, tail=tail)
    ft = finetune(base, obj, lam=lam, iters=300, batch_size=256, steps=50, lr=2e-3, progress=False, seed=0)
    target = tilted_cvar(optimal_eta(level, lam, tail), level, lam, tail)
    base_cvar = tilted_cvar(M, level, 1e9, tail)   # λ → ∞: the base law's own CVaR
    got = cvar(reward(ft.sample(10_000, steps=50, seed=3)), level, tail)
    assert abs(got - target) <= 0.1 * abs(target - base_cvar)
    # the expected-reward tilt shifts r's law by s²/λ; its CVaR in closed form
    z = stats.norm.ppf(1 - level)
    m_er = M + S**2 / lam
    er = m_er + S * stats.norm.pdf(z) / level if tail == "right" else m_er - S * stats.norm.pdf(z) / level
    assert got > er + 0.5 * (target - er)  # a clear margin, not a tie within noise
    assert target > er > base_cvar


def test_right_tail_threshold_is_self_consistent_at_an_aggressive_setting():
    """λ = 1, β = 0.2 (hinge slope 1/(βλ) = 5): stage 1's η̂ ≈ 4.2 from 4096 offline samples is
    0.36 below the quadrature η* = 4.55, and the tilt at η̂ overshoots (CVaR 6.69 against the
    optimum's 5.90, base 3.85). The self-consistent threshold (η = the batch's 0.8-quantile)
    reaches the optimum instead: the logged fraction of each batch beyond η is β (F'(η) = 0 on
    the batch), the fine-tuned law has β ± 0.05 of its mass beyond the true η* (binomial sd of
    4000 samples 0.006; the rest is the fit after 400 short iterations), and its CVaR closes the
    base → optimum gap to within 20 % (measured 87–99 % over 4 seeds; η capped at η̂, the earlier
    code, gives 130 % and 0.38 beyond η*, a fixed η̂ 122 % and 0.34)."""
    level, lam, tail = 0.2, 1.0, "right"
    base = FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))
    obj = CVaR(reward, level=level, tail=tail)
    logs = []
    ft = finetune(base, obj, lam=lam, iters=400, batch_size=128, steps=20, lr=2e-3, progress=False, seed=0,
                  callback=lambda i, rec: logs.append(rec))
    eta = optimal_eta(level, lam, tail)
    assert eta - obj.solution.eta > 0.2                      # the offline estimate is biased low
    assert np.mean([rec["tail_fraction"] for rec in logs[-50:]]) == pytest.approx(level, abs=0.01)
    r = reward(ft.sample(4000, steps=20, seed=3))
    assert float((r > eta).double().mean()) == pytest.approx(level, abs=0.05)
    target, base_cvar = tilted_cvar(eta, level, lam, tail), tilted_cvar(M, level, 1e9, tail)
    assert abs(cvar(r, level, tail) - target) <= 0.2 * (target - base_cvar)


@pytest.mark.slow
def test_right_tail_aggressive_setting_reaches_the_optimum_with_a_longer_run():
    """The setting above with the benchmark's budget (800 iterations, batch 256, 50 steps, lr
    2e-3 → 1e-4 cosine; ~1.5 min): mass beyond the quadrature η* is β ± 0.02 and the CVaR
    closes the base → optimum gap to within 10 % (measured 0.196 and 96 %)."""
    level, lam, tail = 0.2, 1.0, "right"
    base = FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))
    ft = finetune(base, CVaR(reward, level=level, tail=tail), lam=lam, iters=800, batch_size=256, steps=50,
                  lr=2e-3, lr_final=1e-4, progress=False, seed=0)
    eta = optimal_eta(level, lam, tail)
    r = reward(ft.sample(10_000, steps=50, seed=3))
    assert float((r > eta).double().mean()) == pytest.approx(level, abs=0.02)
    target, base_cvar = tilted_cvar(eta, level, lam, tail), tilted_cvar(M, level, 1e9, tail)
    assert abs(cvar(r, level, tail) - target) <= 0.1 * (target - base_cvar)


def test_one_argument_reward_and_the_threshold_log():
    """A reward r(x) without a cond argument works with CVaR in finetune (stage 1, stage 2 and
    the logged raw reward), and log.jsonl records η and the fraction of the batch beyond it."""
    import json
    import tempfile
    base = FlowModel(GaussianMixtureVelocity([1.0], MU[None], COV[None]))
    for tail in ("right", "left"):
        obj = CVaR(lambda x: x @ A + C, level=0.25, tail=tail)
        with tempfile.TemporaryDirectory() as tmp:
            finetune(base, obj, lam=2.0, iters=2, batch_size=32, steps=4, n_offline=256, progress=False, out=tmp)
            recs = [json.loads(line) for line in open(f"{tmp}/log.jsonl")]
            stage1 = json.load(open(f"{tmp}/stage1.json"))
        assert stage1["n_beyond"] == obj.solution.n_beyond > 0
        for rec in recs:
            assert math.isfinite(rec["eta"]) and 0.0 <= rec["tail_fraction"] <= 1.0
        if tail == "right":   # tracked: η is the batch's 0.75-quantile, 8 of 32 beyond it
            assert recs[-1]["tail_fraction"] == pytest.approx(0.25)
        else:                 # fixed at stage 1's η̂
            assert recs[-1]["eta"] == pytest.approx(obj.solution.eta)


def test_bad_input():
    for level in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="level"):
            CVaR(reward, level=level)
    with pytest.raises(ValueError, match="tail"):
        CVaR(reward, level=0.1, tail="up")
    with pytest.raises(ValueError, match="finite"):
        solve_threshold(torch.tensor([0.0, float("nan")]), 0.1, 1.0, "right")
