"""Closed forms for the energy-sampler metrics (tiltflow.energy_metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiltflow.energy_metrics import aligned_sq_distances, geometric_w2, wasserstein_1d, wasserstein_2

ot = pytest.importorskip("ot")
pytest.importorskip("scipy")


def _gaussian_quantiles(n, mu, sigma):
    """n points at the mid-quantiles of N(μ, σ²): an almost exact empirical Gaussian."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return mu + sigma * torch.special.ndtri(u)


def test_w1d_of_two_gaussians_is_the_closed_form():
    # W₂(N(μ₁, σ₁²), N(μ₂, σ₂²))² = (μ₁ − μ₂)² + (σ₁ − σ₂)²; n ≠ m exercises the merged grid.
    a = _gaussian_quantiles(3000, 1.0, 1.0)
    b = _gaussian_quantiles(2000, -0.5, 2.5)
    exact = math.sqrt(1.5**2 + 1.5**2)
    # tolerance: the mid-quantile points miss E z² = 1 by O(log n / n) ≈ 3e-3 relative
    assert wasserstein_1d(a, b) == pytest.approx(exact, rel=5e-3)
    assert wasserstein_1d(b, a) == pytest.approx(wasserstein_1d(a, b), rel=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_w1d_equals_the_transport_problem(p):
    # exact for the empirical measures: equals POT's linear program with cost |a_i − b_j|^p
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, generator=g, dtype=torch.float64)
    b = 3 * torch.rand(23, generator=g, dtype=torch.float64)
    cost = (a[:, None] - b[None]).abs().numpy() ** p
    lp = ot.emd2(np.full(37, 1 / 37), np.full(23, 1 / 23), cost) ** (1 / p)
    assert wasserstein_1d(a, b, p) == pytest.approx(lp, rel=1e-9)


def test_w2_of_a_translated_sample_is_the_shift():
    # W₂²(μ, μ(· − c)) = ‖c‖² for any empirical μ (the identity coupling is optimal after centring)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 3, generator=g, dtype=torch.float64)
    c = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64)
    y = x[torch.randperm(300, generator=g)] + c
    assert wasserstein_2(x, y) == pytest.approx(float(c.norm()), rel=1e-6)


def _rotation(s, angle, g):
    """A rotation by `angle` in a random plane of R^s (a random orthogonal basis, then a plane turn)."""
    q, _ = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))
    turn = torch.eye(s, dtype=torch.float64)
    turn[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return q @ turn @ q.T


def _moved_copies(x, k, s, g, angle):
    """Each configuration with its particles permuted, rotated by `angle` and translated."""
    out = []
    for xi in x.reshape(-1, k, s):
        yi = xi[torch.randperm(k, generator=g)] @ _rotation(s, angle, g) + torch.randn(s, generator=g, dtype=x.dtype)
        out.append(yi.reshape(-1))
    return torch.stack(out)


def _brute_force_sq(xi, yi, k, s):
    """min over all k! permutations and O(s) (Kabsch with reflections) of ‖x̃ − (R ⊗ P) ỹ‖²."""
    import itertools
    X, Y = xi.reshape(k, s), yi.reshape(k, s)
    X, Y = X - X.mean(0), Y - Y.mean(0)
    best = math.inf
    for perm in itertools.permutations(range(k)):
        sigma = torch.linalg.svdvals(Y[list(perm)].T @ X)
        best = min(best, float(X.pow(2).sum() + Y.pow(2).sum() - 2 * sigma.sum()))
    return best


def test_aligned_distance_is_exact_on_moved_copies_and_bounds_the_joint_minimum():
    k, s = 4, 2
    g = torch.Generator().manual_seed(2)
    x = 3 * torch.randn(8, k * s, generator=g, dtype=torch.float64)
    # permuted, translated and slightly rotated copies: the assignment step recovers P (particles
    # are further apart than a 0.05 rad turn moves them), then Kabsch is exact, so D = 0
    y = _moved_copies(x, k, s, g, angle=0.05)
    D = aligned_sq_distances(x, y, k, s)
    assert torch.diagonal(D).abs().max() < 1e-9
    # the joint minimum over S(4) × O(2) by brute force: P first, then R, is an upper bound of it
    # (equal when the assignment picks the optimal P) and at most the plain centred distance
    z = 3 * torch.randn(8, k * s, generator=g, dtype=torch.float64)
    D = aligned_sq_distances(x, z, k, s)
    brute = torch.tensor([[_brute_force_sq(a, b, k, s) for b in z] for a in x], dtype=torch.float64)
    xc = (x.reshape(-1, k, s) - x.reshape(-1, k, s).mean(1, keepdim=True)).reshape(8, -1)
    zc = (z.reshape(-1, k, s) - z.reshape(-1, k, s).mean(1, keepdim=True)).reshape(8, -1)
    assert (D >= brute - 1e-9).all()
    assert (D <= torch.cdist(xc, zc) ** 2 + 1e-9).all()
    assert (D - brute).abs().max() > 1e-3           # the approximation is not the joint minimum


def test_geometric_w2_is_zero_between_symmetry_copies_and_plain_w2_is_not():
    g = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(40, 13 * 3, generator=g, dtype=torch.float64)
    y = _moved_copies(x, 13, 3, g, angle=0.02)[torch.randperm(40, generator=g)]
    assert geometric_w2(x, y, 13, 3) < 1e-5
    assert wasserstein_2(x, y) > 1.0


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="39 entries"):
        aligned_sq_distances(torch.zeros(2, 38), torch.zeros(2, 39), 13, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        wasserstein_1d(torch.tensor([0.0, float("nan")]), torch.zeros(3))
