"""EGNN velocity: E(3) equivariance, mean-free output and samples, save/load; the pseudoscalar input."""

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


def _moved_and_expected(net, proper: bool):
    """(v(x), v(R x + a), R v(x) − centroid shift) for four mean-free x; the last two are equal for
    an equivariant net."""
    g = torch.Generator().manual_seed(1)
    x = _mean_free(1.5 * torch.randn(4, 27, generator=g, dtype=torch.float64))
    t = torch.tensor([0.0, 0.3, 0.7, 0.95], dtype=torch.float64)
    R, a = _orthogonal(2, proper), torch.tensor([0.4, -1.2, 2.0], dtype=torch.float64)
    moved = (x.reshape(4, 9, 3) @ R.T + a).reshape(4, 27)
    v, v_moved = net(x, t), net(moved, t)
    shift = a / (1 - t + CENTROID_EPS)[:, None]
    expected = (v.reshape(4, 9, 3) @ R.T - shift[:, None, :]).reshape(4, 27)
    return v, v_moved, expected


@pytest.mark.parametrize("proper", [True, False])
def test_rotating_and_translating_the_input_rotates_the_velocity(proper):
    # E(3): v(R x + a) = R v(x) on mean-free x, after removing the centroid term −a/(1 − t + ε)
    net = _net()
    v, v_moved, expected = _moved_and_expected(net, proper)
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


# --- pseudoscalar input: SE(3) but not E(3) ----------------------------------------------------

def _pseudo_net():
    return _net(chiral=True, pseudoscalar=True)


def test_signed_volume_of_a_regular_tetrahedron():
    # unit vectors to the corners (1, 1, 1), (1, −1, −1), (−1, 1, −1) of a cube-inscribed tetrahedron:
    # det = 4, norms √3 each, so χ = 4 / 3√3; a reflection flips it, an atom with < 3 bonds gets 0
    net = _pseudo_net()
    pos = torch.randn(1, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pos[0, 0] = 0.0
    pos[0, 1], pos[0, 3], pos[0, 4] = (torch.tensor(v, dtype=torch.float64) for v in ([1, 1, 1], [1, -1, -1], [-1, 1, -1]))
    chi = net.signed_volumes(pos)
    assert abs(float(chi[0, 0]) - 4 / 3 ** 1.5) < 1e-6                   # ε = 1e-6 in the denominator
    assert chi[0, 2] == 0 and (chi[0, 3:] == 0).all()                    # O has 2 bonds, H 1
    torch.testing.assert_close(net.signed_volumes(-pos), -chi, rtol=0, atol=0)


@pytest.mark.parametrize("proper", [True, False])
def test_pseudoscalar_network_is_rotation_but_not_reflection_equivariant(proper):
    # v(R x + a) = R v(x) for det R = +1 (χ invariant, cross term a pseudo-vector); for det R = −1
    # χ changes sign, so the mirrored input's velocity is not the mirrored velocity
    net = _pseudo_net()
    v, v_moved, expected = _moved_and_expected(net, proper)
    gap = (v_moved - expected).abs().max()
    if proper:
        assert gap < 1e-10, gap                                            # float64 rounding
    else:
        assert gap > 1e-3, gap


def test_pseudoscalar_alone_breaks_reflection_symmetry():
    # without the cross term every vector is a sum of x_i − x_j; the gap under x ↦ −x comes from χ
    net = _net(pseudoscalar=True)
    x = _mean_free(torch.randn(3, 27, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    t = torch.full((3,), 0.4, dtype=torch.float64)
    assert (net(-x, t) + net(x, t)).abs().max() > 1e-3


def test_pseudoscalar_defaults_follow_the_graph_and_old_configs_load_without_it(tmp_path):
    from types import SimpleNamespace
    graph = SimpleNamespace(atomic_numbers=torch.tensor(Z), bonds=torch.tensor(BONDS),
                            bond_orders=torch.ones(len(BONDS)), chiral=True)
    assert EGNNVelocity.from_graph(graph, hidden=8, layers=1).pseudoscalar
    assert not EGNNVelocity.from_graph(graph, hidden=8, layers=1, chiral=False).pseudoscalar
    assert not EGNNVelocity.from_graph(SimpleNamespace(**{**vars(graph), "chiral": False}), hidden=8, layers=1).pseudoscalar
    # a checkpoint written before the option (config with "chiral" but no "pseudoscalar") rebuilds
    # the network it was: same parameters, pseudoscalar off
    old = EGNNVelocity(Z, BONDS, hidden=8, layers=1, chiral=True)
    assert "pseudoscalar" not in old.config()
    assert set(EGNNVelocity(**{k: v for k, v in old.config().items() if k != "class"}).state_dict()) == set(old.state_dict())
    model = FlowModel(_pseudo_net().float(), "rectified", (27,))
    loaded = FlowModel.load(model.save(tmp_path / "pseudo.safetensors"))
    assert loaded.net.pseudoscalar
    x = torch.randn(2, 27, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.velocity(x, 0.3), model.velocity(x, 0.3))


def test_bad_graph_raises():
    with pytest.raises(ValueError, match="bonds must index atoms"):
        EGNNVelocity([6, 8], [[0, 2]])
    with pytest.raises(ValueError, match="at least 2 atoms"):
        EGNNVelocity([6], [])
    with pytest.raises(ValueError, match="pseudoscalar=True needs 3-D"):
        EGNNVelocity([0, 0, 0], [], spatial_dim=2, pseudoscalar=True)
