"""EGNN velocity: E(3) equivariance, mean-free output and samples, save/load."""

import pytest
import torch

from tiltflow.models import EGNNVelocity, FlowModel
from tiltflow.models.egnn import CENTROID_EPS

torch.set_num_threads(1)

# ethanol, heavy atoms first: C0 C1 O2, then six H
Z = [6, 6, 8, 1, 1, 1, 1, 1, 1]
BONDS = [[0, 1], [1, 2], [0, 3], [0, 4], [0, 5], [1, 6], [1, 7], [2, 8]]


def _net(**kw):
    torch.manual_seed(0)
    return EGNNVelocity(Z, BONDS, [1.0] * len(BONDS), hidden=32, layers=3, **kw).double()


def _orthogonal(seed, proper=True):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q)) * (1 if proper else -1)


def _mean_free(x):
    p = x.reshape(x.shape[0], -1, 3)
    return (p - p.mean(1, keepdim=True)).reshape(x.shape[0], -1)


@pytest.mark.parametrize("proper", [True, False])
def test_rotating_and_translating_the_input_rotates_the_velocity(proper):
    # E(3): v(R x + a) = R v(x) on mean-free x, after removing the centroid term −a/(1 − t + ε)
    net = _net()
    g = torch.Generator().manual_seed(1)
    x = _mean_free(1.5 * torch.randn(4, 27, generator=g, dtype=torch.float64))
    t = torch.tensor([0.0, 0.3, 0.7, 0.95], dtype=torch.float64)
    R, a = _orthogonal(2, proper), torch.tensor([0.4, -1.2, 2.0], dtype=torch.float64)
    moved = (x.reshape(4, 9, 3) @ R.T + a).reshape(4, 27)
    v, v_moved = net(x, t), net(moved, t)
    shift = a / (1 - t + CENTROID_EPS)[:, None]
    expected = (v.reshape(4, 9, 3) @ R.T - shift[:, None, :]).reshape(4, 27)
    torch.testing.assert_close(v_moved, expected, rtol=0, atol=1e-10)   # float64: rounding only
    assert v.abs().max() > 1e-3


def test_velocity_of_mean_free_input_is_mean_free():
    net = _net()
    x = _mean_free(torch.randn(3, 27, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    v = net(x, torch.full((3,), 0.5, dtype=torch.float64))
    assert v.reshape(3, 9, 3).mean(1).abs().max() < 1e-12


@pytest.mark.parametrize("sde", [False, True])
def test_samples_end_mean_free(sde):
    # Euler/Heun integrate the centroid ODE c' = −c/(1 − t + ε) exactly: c(1) ≈ ε c_0 ≈ 1e-5;
    # the memoryless SDE's data prediction x + (1 − t) v is mean-free up to the same order
    model = FlowModel(_net().float(), "rectified", (27,))
    x = model.sample(64, steps=20, sde=sde, seed=0)
    assert torch.isfinite(x).all()
    # prior centroids are ~N(0, 1/9) per axis; 1e-3 Å allows float32 cancellation in the last
    # step, amplified by 1/ε
    assert x.reshape(64, 9, 3).mean(1).abs().max() < 1e-3


def test_save_load_round_trip(tmp_path):
    model = FlowModel(_net().float(), "rectified", (27,))
    path = model.save(tmp_path / "egnn.safetensors")
    loaded = FlowModel.load(path)
    x = torch.randn(2, 27, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.velocity(x, 0.3), model.velocity(x, 0.3))


def test_bad_graph_raises():
    with pytest.raises(ValueError, match="bonds must index atoms"):
        EGNNVelocity([6, 8], [[0, 2]])
    with pytest.raises(ValueError, match="at least 2 atoms"):
        EGNNVelocity([6], [])
