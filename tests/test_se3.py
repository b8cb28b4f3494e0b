"""SE3Velocity: proper-rotation, translation and permutation equivariance; the chirality term breaks
reflection equivariance (and only it does); mean-free coordinate velocity; save/load."""

import pytest
import torch

from tiltflow.models import FlowModel, SE3Velocity
from tiltflow.models.egnn import CENTROID_EPS

torch.set_num_threads(1)

N, K = 7, 4


def _net(**kw):
    torch.manual_seed(0)
    return SE3Velocity(n_nodes=N, n_types=K, hidden=16, layers=3, **kw)


def _orthogonal(seed, proper=True, dtype=torch.float32):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype))
    return q * torch.sign(torch.linalg.det(q)) * (1 if proper else -1)


def _state(seed, batch=4):
    """(batch, N, 3 + K): mean-free coordinates of a few Å, continuous type channels."""
    g = torch.Generator().manual_seed(seed)
    pos = 1.5 * torch.randn(batch, N, 3, generator=g)
    return torch.cat([pos - pos.mean(1, keepdim=True), 2.0 * torch.rand(batch, N, K, generator=g)], dim=-1)


T = torch.tensor([0.0, 0.3, 0.7, 0.95])


def _moved(x, R, a=torch.zeros(3)):
    return torch.cat([x[..., :3] @ R.T + a, x[..., 3:]], dim=-1)


def test_proper_rotation_and_translation():
    # v_x(R x + a) = R v_x(x) − a/(1 − t + ε) (the centroid term), v_c(R x + a) = v_c(x);
    # float32 through 3 layers of |v| ~ 1: rounding ~1e-6, 1e-4 leaves a margin
    net = _net()
    x = _state(1)
    R, a = _orthogonal(2), torch.tensor([0.4, -1.2, 2.0])
    v, w = net(x, T), net(_moved(x, R, a), T)
    shift = a / (1 - T + CENTROID_EPS)[:, None, None]
    torch.testing.assert_close(w[..., :3], v[..., :3] @ R.T - shift, rtol=0, atol=1e-4)
    torch.testing.assert_close(w[..., 3:], v[..., 3:], rtol=0, atol=1e-4)
    assert v[..., :3].abs().max() > 1e-2 and v[..., 3:].abs().max() > 1e-2     # not trivially zero


def test_permutation_equivariance():
    net = _net()
    x = _state(3)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(net(x[:, perm], T), net(x, T)[:, perm], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chiral", [True, False])
def test_reflection_breaks_equivariance_only_through_the_cross_product(chiral):
    # (Qa) × (Qb) = −Q (a × b) for a reflection Q: with φ_c zeroed the network is E(3)-equivariant,
    # with generic weights the mirrored input does not give the mirrored output
    net = _net()
    if not chiral:
        for layer in net.layers:
            torch.nn.init.zeros_(layer.cross[-1].weight)
            torch.nn.init.zeros_(layer.cross[-1].bias)
    x = _state(5)
    Q = _orthogonal(6, proper=False)
    v, w = net(x, T), net(_moved(x, Q), T)
    gap = (w[..., :3] - v[..., :3] @ Q.T).abs().max()
    if chiral:
        assert gap > 1e-2, gap
    else:
        assert gap < 1e-4, gap
        torch.testing.assert_close(w[..., 3:], v[..., 3:], rtol=0, atol=1e-4)


def test_coordinate_velocity_is_mean_free_and_flat_input_works():
    net = _net()
    x = _state(7)
    v = net(x, T)
    assert v.shape == x.shape
    assert v[..., :3].mean(1).abs().max() < 1e-6                 # float32 rounding of a mean of 7
    torch.testing.assert_close(net(x.reshape(4, -1), T), v.reshape(4, -1))
    with pytest.raises(ValueError, match=r"shape \(batch, 7, 7\)"):
        net(torch.zeros(2, N, 3), T[:2])


def test_cross_product_weights_train():
    # φ_c is not dead at initialisation: every layer's output weights get a gradient
    net = _net()
    x = _state(8)
    loss = net(x, T)[..., :3].pow(2).sum()
    loss.backward()
    assert all(layer.cross[-1].weight.grad.abs().sum() > 0 for layer in net.layers)


def test_flow_model_save_load_round_trip(tmp_path):
    model = FlowModel(_net(), "rectified", (N, 3 + K))
    path = model.save(tmp_path / "se3.safetensors")
    loaded = FlowModel.load(path)
    assert isinstance(loaded.net, SE3Velocity) and loaded.net.config() == model.net.config()
    assert loaded.shape == (N, 3 + K)
    x = _state(9)
    torch.testing.assert_close(loaded.velocity(x, 0.3), model.velocity(x, 0.3), rtol=0, atol=0)
    s = loaded.sample(3, steps=4, seed=0)
    assert s.shape == (3, N, 3 + K) and torch.isfinite(s).all()
    assert s[..., :3].mean(1).abs().max() < 1e-3        # centroid carried to ε c_0 (egnn docstring)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_nodes must be an integer >= 2"):
        SE3Velocity(n_nodes=1)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        SE3Velocity(hidden=0)


# --- EGNNVelocity(chiral=True): the same cross-product term on a molecular graph ---------------

Z = [6, 6, 8, 1, 1, 1, 1, 1, 1]                      # ethanol, heavy atoms first
BONDS = [[0, 1], [1, 2], [0, 3], [0, 4], [0, 5], [1, 6], [1, 7], [2, 8]]


@pytest.mark.parametrize("proper", [True, False])
def test_chiral_egnn_is_equivariant_under_proper_rotations_only(proper):
    from tiltflow.models import EGNNVelocity
    torch.manual_seed(0)
    net = EGNNVelocity(Z, BONDS, hidden=16, layers=3, chiral=True).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 3, generator=g, dtype=torch.float64)
    x = (x - x.mean(1, keepdim=True)).reshape(4, 27)
    R = _orthogonal(2, proper, torch.float64)
    v = net(x, T.double()).reshape(4, 9, 3)
    w = net((x.reshape(4, 9, 3) @ R.T).reshape(4, 27), T.double()).reshape(4, 9, 3)
    gap = (w - v @ R.T).abs().max()
    assert (gap < 1e-10) if proper else (gap > 1e-3), gap        # float64: rounding only


def test_chiral_egnn_config_round_trips_and_old_configs_stay_e3(tmp_path):
    from tiltflow.models import EGNNVelocity
    chiral = FlowModel(EGNNVelocity(Z, BONDS, hidden=8, layers=2, chiral=True), "rectified", (27,))
    loaded = FlowModel.load(chiral.save(tmp_path / "c.safetensors"))
    assert loaded.net.chiral and loaded.net.config()["chiral"] is True
    x = torch.randn(2, 27, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded.velocity(x, 0.4), chiral.velocity(x, 0.4), rtol=0, atol=0)
    # a checkpoint written before the option has no "chiral" key and must keep loading as E(3)
    assert "chiral" not in EGNNVelocity(Z, BONDS, hidden=8, layers=2).config()
    with pytest.raises(ValueError, match="chiral=True needs 3-D"):
        EGNNVelocity.particles(4, spatial_dim=2, chiral=True)
