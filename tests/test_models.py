"""FlowModel I/O, the analytic velocity, and input validation."""

import pytest
import torch

from tiltflow.models import FlowModel, GaussianMixtureVelocity, MLPVelocity, ResidualVelocity


def test_analytic_velocity_matches_closed_form_gaussian():
    """v = μ + (tΣ − (1 − t)I)(t²Σ + (1 − t)²I)⁻¹(x − tμ) for one rectified-flow Gaussian."""
    mu, S = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([[0.49, 0.1], [0.1, 0.3]], dtype=torch.float64)
    net = GaussianMixtureVelocity([1.0], mu[None], S[None])
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    for i in range(5):
        ti = t[i]
        v = mu + (ti * S - (1 - ti) * eye) @ torch.linalg.solve(ti**2 * S + (1 - ti) ** 2 * eye, x[i] - ti * mu)
        torch.testing.assert_close(net(x[i:i + 1], t[i:i + 1])[0], v)


def test_analytic_velocity_is_the_flow_matching_regression_target():
    """E[α̇x1 + β̇x0 | x_t] by brute force on a 1-D two-component mixture near one x."""
    net = GaussianMixtureVelocity([0.4, 0.6], [[-1.0], [2.0]], [[[0.3]], [[0.5]]])
    g = torch.Generator().manual_seed(0)
    comp = torch.rand(2_000_000, generator=g) < 0.4
    x1 = torch.where(comp, -1 + 0.3**0.5 * torch.randn(2_000_000, generator=g), 2 + 0.5**0.5 * torch.randn(2_000_000, generator=g))
    x0 = torch.randn(2_000_000, generator=g)
    t = 0.6
    xt = t * x1 + (1 - t) * x0
    near = (xt - 0.5).abs() < 0.01
    target = (x1 - x0)[near].mean()
    assert float(net(torch.tensor([[0.5]]), torch.tensor([t]))) == pytest.approx(float(target), abs=0.03)


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    m = FlowModel(MLPVelocity(2, (16, 16)))
    path = m.save(tmp_path / "m.safetensors")
    m2 = FlowModel.load(path)
    torch.testing.assert_close(m.sample(64, steps=10, seed=3), m2.sample(64, steps=10, seed=3), rtol=0, atol=0)
    r = FlowModel(ResidualVelocity(GaussianMixtureVelocity([1.0], [[1.0, 0.0]], torch.eye(2)[None]), MLPVelocity(2, (8,))))
    r2 = FlowModel.load(r.save(tmp_path / "r.safetensors"))
    torch.testing.assert_close(r.sample(16, steps=5, seed=1), r2.sample(16, steps=5, seed=1), rtol=0, atol=0)


def test_loading_another_architecture_fails_clearly(tmp_path):
    path = FlowModel(MLPVelocity(2, (16, 16))).save(tmp_path / "m.safetensors")
    other = FlowModel(MLPVelocity(2, (32,)))
    with pytest.raises(ValueError, match="different model"):
        other.load_weights(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        FlowModel.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no model file"):
        FlowModel.load(tmp_path / "missing.safetensors")


def test_same_seed_same_samples_and_shapes():
    m = FlowModel(MLPVelocity(3, (8,)))
    a, b = m.sample(10, steps=4, seed=7), m.sample(10, steps=4, seed=7)
    assert a.shape == (10, 3) and torch.equal(a, b)
    traj, grid = m.sample(10, steps=4, sde=True, seed=1, return_trajectory=True)
    assert traj.shape == (5, 10, 3) and grid.shape == (5,)


@pytest.mark.parametrize("sde", [False, True])
def test_seed_none_gives_fresh_samples_reproducible_under_manual_seed(sde):
    """seed=None: a fresh seed from the global torch RNG, so two calls differ (a seed-0 default
    would return the same samples twice) and torch.manual_seed(k) before each call repeats them."""
    m = FlowModel(MLPVelocity(2, (8,)))
    a, b = m.sample(16, steps=3, sde=sde), m.sample(16, steps=3, sde=sde)
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    c = m.sample(16, steps=3, sde=sde)
    torch.manual_seed(5)
    torch.testing.assert_close(m.sample(16, steps=3, sde=sde), c, rtol=0, atol=0)
    torch.testing.assert_close(m.sample(16, steps=3, sde=sde, seed=11), m.sample(16, steps=3, sde=sde, seed=11),
                               rtol=0, atol=0)
    g = torch.Generator().manual_seed(11)   # an explicit seed means a generator seeded with it
    torch.testing.assert_close(m.sample(16, steps=3, sde=sde, generator=g), m.sample(16, steps=3, sde=sde, seed=11),
                               rtol=0, atol=0)


def test_bad_input():
    m = FlowModel(MLPVelocity(2, (8,)))
    for kw in ({"n": 0}, {"n": 4, "steps": 0}, {"n": 4, "steps": -3}):
        with pytest.raises(ValueError, match="n must|steps must"):
            m.sample(**kw)
    with pytest.raises(ValueError, match="x must have shape"):
        m.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureVelocity([1.0, 2.0], [[0.0, 0.0]], torch.eye(2)[None])
    with pytest.raises(ValueError, match="cond"):
        MLPVelocity(2, (8,), cond_dim=3)(torch.zeros(1, 2), torch.zeros(1))
