"""The equivariant coupling (couplings.equivariant_pairing; Klein, Krämer & Noé 2023) against
brute force and group facts, and a flow trained with it against a known configuration.

For each pair it returns g*·x0 with g* in S_nodes × SO(3) approximately minimising ‖g·x0 − x1‖²:
- a permuted, properly rotated and translated copy of x1 is mapped back onto x1 exactly;
- on 4 nodes the result is never below the brute-force minimum over all 24 permutations, each
  with its optimal proper rotation (Kabsch), and equals it in most pairs;
- the output is a proper rigid transform of x0 with its nodes permuted: pairwise distances and
  the signs of signed volumes are those of x0, the centroid is x0's; a mirror image is not
  superimposed onto the original.
"""

import itertools

import pytest
import torch

from tiltflow import couplings
from tiltflow.methods.pretrain import pretrain
from tiltflow.models.egnn import EGNNVelocity
from tiltflow.models.se3 import SE3Velocity
from tiltflow.tasks.molecules import kabsch_rmsd


def _rotations(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=dtype))
    return q * torch.sign(torch.linalg.det(q))[:, None, None]          # det +1


def _states(b, nodes, width, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, nodes, width, generator=g, dtype=torch.float64)
    x[..., :3] -= x[..., :3].mean(1, keepdim=True)
    return x


def test_a_permuted_rotated_translated_copy_is_mapped_back_exactly():
    x1 = _states(100, 7, 5, seed=0)
    q = _rotations(100, seed=1)
    g = torch.Generator().manual_seed(2)
    perms = torch.stack([torch.randperm(7, generator=g) for _ in range(100)])
    x0 = x1[torch.arange(100)[:, None], perms].clone()
    x0[..., :3] = x0[..., :3] @ q.transpose(1, 2) + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = couplings.equivariant_pairing(x0, x1, nodes=7)
    assert torch.allclose(a[..., :3] - a[..., :3].mean(1, keepdim=True), x1[..., :3], atol=1e-9)
    assert torch.equal(a[..., 3:], x1[..., 3:])                       # the other channels travel with their node
    # flat rows work the same way
    assert torch.allclose(couplings.equivariant_pairing(x0.reshape(100, -1), x1.reshape(100, -1), nodes=7),
                          a.reshape(100, -1))


def test_four_nodes_reach_the_brute_force_minimum_over_the_group():
    b = 40
    x0, x1 = _states(b, 4, 3, seed=3), _states(b, 4, 3, seed=4)
    a = couplings.equivariant_pairing(x0, x1, nodes=4)
    got = (a - a.mean(1, keepdim=True) - x1).pow(2).sum((1, 2))
    # min over proper rotations R of ‖p R − y‖² for each of the 24 orders: nodes · Kabsch RMSD²
    best = torch.tensor([min(4 * float(kabsch_rmsd(x0[i, list(s)], x1[i])) ** 2 for s in itertools.permutations(range(4)))
                         for i in range(b)], dtype=torch.float64)
    assert (got >= best - 1e-9).all()
    # alternating minimisation is a heuristic: it finds the group minimum in most pairs, and is
    # close where it does not (here 37 of 40; the sum is 0.9 % above the minimum)
    assert ((got - best).abs() < 1e-9).float().mean() >= 0.9
    assert (got.sum() - best.sum()) / best.sum() < 0.02
    # and far below the unaligned cost
    assert got.mean() < 0.5 * (x0 - x1).pow(2).sum((1, 2)).mean()


def _signed_volumes(p):
    """(b, nodes, 3) -> (b, C(nodes, 4)) signed volumes of every ordered 4-subset."""
    out = []
    for i, j, k, m in itertools.combinations(range(p.shape[1]), 4):
        out.append(torch.linalg.det(torch.stack([p[:, j] - p[:, i], p[:, k] - p[:, i], p[:, m] - p[:, i]], 1)))
    return torch.stack(out, 1)


def test_output_is_a_proper_rigid_motion_of_x0_with_permuted_nodes():
    x0, x1 = _states(30, 6, 4, seed=5) + 0.3, _states(30, 6, 4, seed=6)
    a = couplings.equivariant_pairing(x0, x1, nodes=6)
    # undo the permutation by matching the untouched 4th channel
    order = torch.stack([torch.cdist(a[i, :, 3:], x0[i, :, 3:]).argmin(1) for i in range(30)])
    back = x0[torch.arange(30)[:, None], order]
    assert torch.allclose(torch.cdist(a[..., :3], a[..., :3]), torch.cdist(back[..., :3], back[..., :3]), atol=1e-9)
    assert torch.equal(torch.sign(_signed_volumes(a[..., :3])), torch.sign(_signed_volumes(back[..., :3])))
    assert torch.allclose(a[..., :3].mean(1), x0[..., :3].mean(1), atol=1e-12)


def test_a_mirror_image_is_not_superimposed_and_permute_false_keeps_node_order():
    x1 = _states(20, 5, 3, seed=7)
    mirror = x1 * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    a = couplings.equivariant_pairing(mirror, x1, nodes=5)
    assert (a - x1).pow(2).sum((1, 2)).min() > 1e-3                    # no proper motion maps a chiral set on its mirror
    q = _rotations(20, seed=8)
    a = couplings.equivariant_pairing(x1 @ q.transpose(1, 2), x1, nodes=5, permute=False)
    assert torch.allclose(a, x1, atol=1e-9)


def test_bad_arguments_name_the_value():
    x = torch.zeros(2, 12)
    with pytest.raises(ValueError, match="nodes must be a positive integer dividing a row's 12 entries, got 5"):
        couplings.equivariant_pairing(x, x, nodes=5)
    with pytest.raises(ValueError, match=r"coords must be an integer in \[1, 3\]"):
        couplings.equivariant_pairing(x, x, nodes=4, coords=4)
    with pytest.raises(ValueError, match="same shape"):
        couplings.equivariant_pairing(x, torch.zeros(2, 6), nodes=2)
    with pytest.raises(ValueError, match="coupling='equivariant' needs a network with node symmetries"):
        pretrain(torch.randn(64, 2), 1, coupling="equivariant", progress=False, n_eval=0)


def test_networks_declare_their_symmetries():
    assert SE3Velocity(n_nodes=5, n_types=3).symmetry == {"nodes": 5, "coords": 3, "permute": True}
    assert EGNNVelocity.particles(4, spatial_dim=2).symmetry == {"nodes": 4, "coords": 2, "permute": True}
    # a molecular graph fixes each atom's role: rotations only
    assert EGNNVelocity([6, 8], [[0, 1]]).symmetry == {"nodes": 2, "coords": 3, "permute": False}


def test_a_flow_trained_with_the_equivariant_coupling_draws_the_data_shape():
    """End to end through pretrain: four identical particles on a unit square (random rotation and
    order, centred); the flow must draw squares (sorted pairwise distances 1, 1, 1, 1, √2, √2)
    with zero centroid. The group facts are pinned down by the tests above."""
    g = torch.Generator().manual_seed(0)
    n = 512
    square = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    ang = torch.rand(n, generator=g) * 2 * torch.pi
    rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2)
    data = torch.stack([square[torch.randperm(4, generator=g)] for _ in range(n)]) @ rot.transpose(1, 2)
    net = EGNNVelocity.particles(4, spatial_dim=2, hidden=32, layers=3)
    model = pretrain(data.reshape(n, 8), 1200, network=net, coupling="equivariant", batch_size=64, lr=3e-3,
                     progress=False, n_eval=0, seed=0)
    x = model.sample(256, steps=40, seed=1).reshape(256, 4, 2)
    iu = torch.triu_indices(4, 4, 1)
    d = torch.cdist(x, x)[:, iu[0], iu[1]].sort(1).values
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, 2 ** 0.5, 2 ** 0.5])
    # 0.028 here; 0.047 when the coupling also halves x0 (not a group element, a wrong prior)
    assert (d - target).abs().mean() < 0.04, (d - target).abs().mean(0)
    assert x.mean(1).abs().max() < 1e-3
