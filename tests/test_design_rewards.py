"""Differentiable rewards of design states: the predictor's invariances and learning, the rewards'
gradients against finite differences, and the energy against RDKit's MMFF94 directly."""

import math

import pytest
import torch

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

from tiltflow.tasks.design import K, N_MAX, TYPE_SCALE, TYPES, encode  # noqa: E402
from tiltflow.tasks.design_rewards import (  # noqa: E402
    INVALID_ENERGY, EnergyReward, PropertyPredictor, PropertyReward, cached_predictor, fit_predictor,
    load_predictor, property_labels, save_predictor)


def synthetic_states(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """n random 'molecules' of 4–12 atoms: random types, Gaussian coordinates (std 1.5 Å), centred."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, N_MAX, 3 + K, dtype=dtype)
    for i in range(n):
        m = int(torch.randint(4, 13, (1,), generator=g))
        t = torch.randint(1, K, (m,), generator=g)
        p = torch.randn(m, 3, generator=g, dtype=dtype) * 1.5
        x[i, :m, :3] = p - p.mean(0)
        x[i, torch.arange(m), 3 + t] = TYPE_SCALE
        x[i, m:, 3] = TYPE_SCALE
    return x


def n_oxygen(x):
    return (x[..., 3:].argmax(-1) == TYPES.index("O")).sum(-1).double()


def toy_dipole(x):
    """|Σ q_i r_i| with fixed per-type charges, neutralised over the present atoms."""
    t = x[..., 3:].argmax(-1)
    q = torch.tensor([0.0, 0.3, -0.1, -0.4, -0.5, -0.3], dtype=x.dtype)[t]
    present = (t != 0).to(x.dtype)
    q = (q - (q * present).sum(-1, keepdim=True) / present.sum(-1, keepdim=True)) * present
    return (q[..., None] * x[..., :3]).sum(1).norm(dim=-1).double()


def random_orthogonal(seed: int, reflect: bool) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    if (torch.linalg.det(q) < 0) != reflect:
        q = q * torch.tensor([1.0, 1.0, -1.0])
    return q


@pytest.mark.parametrize("readout", ["dipole", "sum"])
def test_predictor_is_e3_and_permutation_invariant(readout):
    torch.manual_seed(0)
    net = PropertyPredictor(hidden=32, layers=3, readout=readout).eval()
    x = synthetic_states(8, seed=1)
    x[..., 3:] += 0.3 * torch.randn(x[..., 3:].shape)      # off the one-hot corners, as generated states are
    y = net(x)
    perm = torch.randperm(N_MAX)
    for reflect in (False, True):
        q = random_orthogonal(2, reflect)
        moved = x.clone()
        moved[..., :3] = x[..., :3] @ q.T + torch.tensor([1.5, -2.0, 0.7])
        moved = moved[:, perm]
        # float32: distances are recomputed from rotated coordinates, ~1e-6 relative rounding
        torch.testing.assert_close(net(moved), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("readout, label", [("sum", n_oxygen), ("dipole", toy_dipole)])
def test_predictor_learns_a_known_label(readout, label):
    """Number of O atoms (additive) and a fixed-charge dipole: after training the held-out MAE is
    below 0.2 label std; the untrained network's is about one std (checked, so training matters)."""
    x_train, x_test = synthetic_states(512, 0), synthetic_states(128, 1)
    y_train, y_test = label(x_train), label(x_test)
    torch.manual_seed(0)
    untrained = PropertyPredictor(hidden=32, layers=2, readout=readout).eval()
    untrained.std.fill_(float(y_train.std()))
    untrained.mean.fill_(float(y_train.mean()) if readout == "sum" else 0.0)
    with torch.no_grad():
        mae0 = float((untrained(x_test).double() - y_test).abs().mean())
    net, report = fit_predictor(x_train, y_train, x_test, y_test, readout=readout, iters=300, batch_size=32,
                                hidden=32, layers=2, seed=0)
    assert report["label_std"] == pytest.approx(float(y_test.std(unbiased=False)), rel=1e-6)
    assert mae0 > 0.5 * report["label_std"]
    assert report["mae"] < 0.2 * report["label_std"], report
    assert report["r2"] > 0.9, report


def test_fit_predictor_refuses_constant_labels_and_bad_shapes():
    x = synthetic_states(8, 0)
    with pytest.raises(ValueError, match="must vary"):
        fit_predictor(x, torch.ones(8), x, torch.arange(8.0), iters=1)
    with pytest.raises(ValueError, match="one label per state"):
        fit_predictor(x, torch.arange(7.0), x, torch.arange(8.0), iters=1)
    with pytest.raises(ValueError, match=rf"\(batch, {N_MAX}, {3 + K}\)"):
        fit_predictor(x[:, :5], torch.arange(8.0), x, torch.arange(8.0), iters=1)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = PropertyPredictor(hidden=16, layers=2, readout="sum", property="logp")
    net.mean.fill_(1.5)
    path = save_predictor(net, tmp_path / "p.safetensors", report={"mae": 0.1})
    back = load_predictor(path)
    x = synthetic_states(4, 0)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    assert back.config() == net.config() and back.report == {"mae": 0.1}
    assert b"pickle" not in path.read_bytes()[:64]
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="safetensors"):
        load_predictor(tmp_path / "bad.safetensors")


def small_molecule_states(smiles_list) -> torch.Tensor:
    states = []
    for i, smi in enumerate(smiles_list):
        mol = Chem.AddHs(Chem.MolFromSmiles(smi))
        AllChem.EmbedMolecule(mol, randomSeed=i + 1)
        AllChem.MMFFOptimizeMolecule(mol)
        states.append(encode(mol))
    return torch.stack(states)


def test_labels_and_cached_predictor(tmp_path):
    """Labels are design.properties of the decoded states; the cached predictor is trained once,
    then read back from the cache (same outputs, same report) instead of being trained again."""
    from types import SimpleNamespace
    x = small_molecule_states(["CCO", "CC(C)=O", "CC#N", "CCCC", "OCCO", "CF"])
    dip = property_labels(x, "dipole")
    assert dip.shape == (6,) and abs(dip[3]) < 0.05 < dip[2]     # butane ≈ apolar, acetonitrile polar
    with pytest.raises(ValueError, match="property must be one of"):
        property_labels(x, "mass")
    data = SimpleNamespace(train=x, test=x, recipe={"source": "test", "build_seconds": 1.0})
    p1, r1 = cached_predictor("logp", data, iters=3, cache_dir=tmp_path)
    files = list(tmp_path.glob("design-predictor-logp-*.safetensors"))
    assert len(files) == 1 and r1["iters"] == 3
    data.recipe["build_seconds"] = 2.0          # timing is not part of the key
    p2, r2 = cached_predictor("logp", data, iters=3, cache_dir=tmp_path)
    assert r2 == r1 and "train_seconds" in r2
    torch.testing.assert_close(p2(x), p1(x))


def test_property_reward_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = PropertyPredictor(hidden=16, layers=2).double()
    r = PropertyReward(net, scale=-2.0)
    x = synthetic_states(3, 0, torch.float64)
    x = x + 0.1 * torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(r(x), -2.0 * net(x))
        torch.testing.assert_close(r(x.flatten(1)), r(x))           # the flat layout is accepted
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(r(xg).sum(), xg)
    assert g[..., 3:].abs().sum() > 0 and g[..., :3].abs().sum() > 0   # both coordinates and types
    h = 1e-5     # central differences in float64: error O(h²) ≈ 1e-10, far below the rtol
    for seed in range(3):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with torch.no_grad():
            fd = (r(x + h * v) - r(x - h * v)).sum() / (2 * h)
        assert float(fd) == pytest.approx(float((g * v).sum()), rel=1e-6)
    assert not any(p.requires_grad for p in r.predictor.parameters())   # the reward never trains it
    with pytest.raises(ValueError, match=rf"\(batch, {N_MAX}, {3 + K}\).*got \(3, {N_MAX}, 5\)"):
        r(x[..., :5])


def ethanol_state(perturb: float = 0.05) -> tuple:
    """Ethanol (ETKDG + MMFF94), encoded; coordinates perturbed so the energy has a gradient."""
    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    AllChem.MMFFOptimizeMolecule(mol)
    x = encode(mol).double()
    g = torch.Generator().manual_seed(0)
    n = mol.GetNumAtoms()
    x[:n, :3] += perturb * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return mol, x


def state_of(symbols: str, pos) -> torch.Tensor:
    x = torch.zeros(N_MAX, 3 + K, dtype=torch.float64)
    for i, (s, p) in enumerate(zip(symbols, pos)):
        x[i, :3] = torch.tensor(p, dtype=torch.float64)
        x[i, 3 + TYPES.index(s)] = TYPE_SCALE
    x[len(symbols):, 3] = TYPE_SCALE
    return x


def test_energy_reward_is_minus_rdkit_mmff_with_matching_gradient():
    mol, x = ethanol_state()
    n = mol.GetNumAtoms()        # AddHs puts the hydrogens after the heavy atoms: encode's order
    ff = AllChem.MMFFGetMoleculeForceField(mol, AllChem.MMFFGetMoleculeProperties(mol))
    e_rdkit = ff.CalcEnergy(x[:n, :3].flatten().tolist())
    r = EnergyReward()
    xg = x[None].clone().requires_grad_(True)
    out = r(xg)
    assert out.shape == (1,)
    assert float(out.detach()) == pytest.approx(-e_rdkit, abs=1e-9)
    (g,) = torch.autograd.grad(out.sum(), xg)
    assert g[0, n:].abs().max() == 0 and g[0, :, 3:].abs().max() == 0   # absent nodes, type channels
    h = 1e-5     # central differences of RDKit's float64 energy; error O(h²) at kcal/mol/Å² curvatures
    for i in range(n):
        for k in range(3):
            xp, xm = x.clone(), x.clone()
            xp[i, k] += h
            xm[i, k] -= h
            fd = (r(xp[None]) - r(xm[None])) / (2 * h)
            assert float(fd) == pytest.approx(float(g[0, i, k]), rel=1e-4, abs=1e-4)
    # scale divides, clip caps the energy (zero gradient beyond it)
    assert float(EnergyReward(scale=10.0)(x[None])) == pytest.approx(-e_rdkit / 10.0, abs=1e-9)
    clipped = EnergyReward(clip=e_rdkit - 1.0)
    xg = x[None].clone().requires_grad_(True)
    out = clipped(xg)
    assert float(out.detach()) == pytest.approx(-(e_rdkit - 1.0))
    assert torch.autograd.grad(out.sum(), xg)[0].abs().max() == 0


def test_energy_reward_penalises_undecodable_states_with_zero_gradient():
    _, ethanol = ethanol_state()
    bad = {
        "methyl radical (no bond orders)": state_of("CHHH", [(0, 0, 0), (1.09, 0, 0), (-0.5, 0.94, 0),
                                                            (-0.5, -0.94, 0)]),
        "empty": state_of("", []),
        "H2 (decodes, MMFF94 has no type)": state_of("HH", [(0, 0, 0), (0.74, 0, 0)]),
        "NaN": torch.full((N_MAX, 3 + K), math.nan, dtype=torch.float64),
    }
    x = torch.stack([ethanol, *bad.values()]).requires_grad_(True)
    out = EnergyReward()(x)
    assert torch.isfinite(out).all()
    assert out[1:].tolist() == [-INVALID_ENERGY] * len(bad)
    assert out[0] > -INVALID_ENERGY
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all() and g[1:].abs().max() == 0 and g[0].abs().max() > 0
    # a batch with nothing valid still has a (zero) gradient: solvers call autograd.grad on it
    only_bad = torch.stack(list(bad.values())[:2]).requires_grad_(True)
    (g,) = torch.autograd.grad(EnergyReward(scale=2.0)(only_bad).sum(), only_bad)
    assert g.abs().max() == 0


def test_energy_reward_validates_its_arguments():
    with pytest.raises(ValueError, match="clip must be at most invalid_energy"):
        EnergyReward(clip=2 * INVALID_ENERGY)
    with pytest.raises(ValueError, match="scale"):
        EnergyReward(scale=0.0)
    with pytest.raises(ValueError, match=rf"\(batch, {N_MAX}, {3 + K}\)"):
        EnergyReward()(torch.zeros(2, N_MAX, 3))
