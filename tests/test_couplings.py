"""Minibatch couplings against brute force and duality.

Exact OT between two uniform n-point sets is a permutation σ minimising Σ_i ‖x0_i − x1_σ(i)‖²
(Birkhoff–von Neumann), found here by enumerating all n! permutations; its dual potentials
satisfy u_i + v_j ≤ c_ij with equality of the two optimal values (strong duality); a Sinkhorn
plan has the prescribed marginals up to its stopping tolerance.
"""

import itertools
import sys

import numpy as np
import pytest
import torch

from tiltflow import couplings
from tiltflow.methods import gft, pretrain


def _sets(n, m=None, dims=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *dims, generator=g), torch.randn(m or n, *dims, generator=g) + 0.5


def _brute_force(x0, x1):
    """min over permutations σ of (1/n) Σ_i ‖x0_i − x1_σ(i)‖², and the minimiser."""
    c = torch.cdist(x0.reshape(len(x0), -1).double(), x1.reshape(len(x1), -1).double()).pow(2)
    best = min(itertools.permutations(range(len(x0))), key=lambda s: float(c[range(len(x0)), s].sum()))
    return float(c[range(len(x0)), best].sum()) / len(x0), torch.tensor(best)


@pytest.mark.parametrize("n,seed", [(3, 0), (5, 1), (6, 2), (6, 3)])
def test_exact_ot_is_the_best_permutation(n, seed):
    """The emd plan is a permutation / n of brute-force minimal cost; ot_pairing and pair("ot")
    return that permutation (distinct costs a.s., so the minimiser is unique)."""
    x0, x1 = _sets(n, seed=seed)
    best_cost, best = _brute_force(x0, x1)
    plan = couplings.plan(x0, x1, "ot")
    c = torch.cdist(x0.double(), x1.double()).pow(2).numpy()
    np.testing.assert_allclose((plan * c).sum(), best_cost, rtol=1e-12)   # float64 sums of n terms
    np.testing.assert_array_equal(plan.argmax(1), best.numpy())
    np.testing.assert_allclose(plan.max(1), 1.0 / n, rtol=1e-12)
    perm = couplings.ot_pairing(x0, x1)          # (x0[perm], x1) optimal: x0[perm][best[i]] = x0[i]
    assert torch.equal(perm[best], torch.arange(n))
    a, b = couplings.pair(x0, x1, "ot", torch.Generator().manual_seed(0))
    assert torch.equal(a, x0) and torch.equal(b, x1[best])


def test_exact_ot_on_image_shaped_batches_matches_brute_force():
    x0, x1 = _sets(5, dims=(1, 2, 2), seed=4)
    _, best = _brute_force(x0, x1)
    assert torch.equal(couplings.ot_pairing(x0, x1)[best], torch.arange(5))


def test_ot_dual_potentials_certify_the_optimum():
    """u_i + v_j ≤ c_ij for all i, j and Σu/n + Σv/n = the primal optimum = brute force."""
    x0, x1 = _sets(6, seed=5)
    c = torch.cdist(x0.double(), x1.double()).pow(2).numpy()
    cost, u, v = couplings.ot_dual(c)
    best_cost, _ = _brute_force(x0, x1)
    assert cost == pytest.approx(best_cost, rel=1e-12)
    assert (u[:, None] + v[None, :] <= c + 1e-10).all()          # dual feasibility up to rounding
    assert u.mean() + v.mean() == pytest.approx(best_cost, rel=1e-9)


@pytest.mark.parametrize("n,m", [(40, 40), (30, 50)])
def test_sinkhorn_and_independent_plans_have_the_uniform_marginals(n, m):
    """Rows sum to 1/n and columns to 1/m: exactly for independent; for sinkhorn to its stopThr,
    1e-6 on the 2-norm of the marginal error (so on every entry); entropic OT is cheaper than the
    product coupling and dearer than exact OT."""
    x0, x1 = _sets(n, m, seed=6)
    c = torch.cdist(x0.double(), x1.double()).pow(2).numpy()
    ind = couplings.plan(x0, x1, "independent")
    np.testing.assert_allclose(ind.sum(1), 1.0 / n, rtol=1e-12)
    np.testing.assert_allclose(ind.sum(0), 1.0 / m, rtol=1e-12)
    sk = couplings.plan(x0, x1, "sinkhorn", reg=0.05)
    assert (sk >= 0).all()
    np.testing.assert_allclose(sk.sum(1), 1.0 / n, atol=1e-6)
    np.testing.assert_allclose(sk.sum(0), 1.0 / m, atol=1e-6)
    assert (sk * c).sum() < (ind * c).sum()
    ex = couplings.plan(x0, x1, "ot")
    assert (ex * c).sum() <= (sk * c).sum() + 1e-12      # exact OT is the minimum over all plans


def test_the_methods_use_the_one_coupling_module():
    # gft and pretrain keep their public names, now the couplings module's functions (no copies)
    assert gft.coupling_plan is couplings.plan and gft.pair is couplings.pair
    assert pretrain.ot_pairing is couplings.ot_pairing


def test_bad_coupling_and_missing_pot(monkeypatch):
    x0, x1 = _sets(4)
    with pytest.raises(ValueError, match="coupling must be 'independent', 'ot' or 'sinkhorn', got 'emd'"):
        couplings.plan(x0, x1, "emd")
    monkeypatch.setitem(sys.modules, "ot", None)        # makes `import ot` raise ImportError
    with pytest.raises(ImportError, match=r"coupling='sinkhorn' needs POT: pip install 'tiltflow\[ot\]'"):
        couplings.plan(x0, x1, "sinkhorn")
    with pytest.raises(ImportError, match=r"gradual_finetune needs POT: pip install 'tiltflow\[ot\]'"):
        couplings.require_ot("gradual_finetune")
    # the product coupling needs no POT
    assert couplings.pair(x0, x1, "independent", torch.Generator())[1] is x1
