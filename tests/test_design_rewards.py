"""Differentiable rewards of design states: the predictor's invariances and learning, the rewards'
gradients against finite differences, and the energy against RDKit's MMFF94 directly."""

import math

import pytest
import torch

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

from tiltflow.tasks.design import K, N_MAX, TYPE_SCALE, TYPES, decode, encode  # noqa: E402
from tiltflow.tasks.design_rewards import (  # noqa: E402
    INVALID_ENERGY, EnergyReward, PredictorEnsemble, PropertyPredictor, PropertyReward, cached_predictor,
    fit_predictor, load_predictor, property_labels, save_predictor)


def synthetic_states(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """n random 'molecules' of 3–9 atoms: random types, Gaussian coordinates (std 1.5 Å), centred."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, N_MAX, 3 + K, dtype=dtype)
    for i in range(n):
        m = int(torch.randint(3, N_MAX + 1, (1,), generator=g))
        t = torch.randint(1, K, (m,), generator=g)
        p = torch.randn(m, 3, generator=g, dtype=dtype) * 1.5
        x[i, :m, :3] = p - p.mean(0)
        x[i, torch.arange(m), 3 + t] = TYPE_SCALE
        x[i, m:, 3] = TYPE_SCALE
    return x


def n_oxygen(x):
    oxygen = torch.tensor([t.startswith("O") for t in TYPES])
    return oxygen[x[..., 3:].argmax(-1)].sum(-1).double()


def toy_dipole(x):
    """|Σ q_i r_i| with fixed per-type charges, neutralised over the present atoms."""
    t = x[..., 3:].argmax(-1)
    charge = {"C": -0.1, "N": -0.4, "O": -0.5, "F": -0.3}      # plus 0.3 per hydrogen
    q = torch.tensor([0.0] + [charge[s[0]] + 0.3 * int(s[1:]) for s in TYPES[1:]], dtype=x.dtype)[t]
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


def test_ensemble_is_the_mean_of_its_members_and_round_trips(tmp_path):
    x_train, x_test = synthetic_states(64, 0), synthetic_states(16, 1)
    net, report = fit_predictor(x_train, n_oxygen(x_train), x_test, n_oxygen(x_test), readout="sum", iters=5,
                                hidden=8, layers=1, members=3, seed=4)
    assert isinstance(net, PredictorEnsemble) and len(net.members) == 3
    assert report["members"] == 3 and len(report["member_mae"]) == 3
    # members start from seeds 4, 5, 6: a single fit from seed 5 is the second member
    single, _ = fit_predictor(x_train, n_oxygen(x_train), x_test, n_oxygen(x_test), readout="sum", iters=5,
                              hidden=8, layers=1, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(net(x_test), torch.stack([m(x_test) for m in net.members]).mean(0))
        torch.testing.assert_close(single(x_test), net.members[1](x_test))
    back = load_predictor(save_predictor(net, tmp_path / "e.safetensors", report))
    assert isinstance(back, PredictorEnsemble) and back.config() == net.config() and back.report == report
    with torch.no_grad():
        torch.testing.assert_close(back(x_test), net(x_test), rtol=0, atol=0)
    r = PropertyReward(back, scale=2.0)
    with torch.no_grad():
        torch.testing.assert_close(r(x_test), 2.0 * net(x_test))
    with pytest.raises(ValueError, match="share one architecture"):
        PredictorEnsemble([PropertyPredictor(hidden=8, layers=1), PropertyPredictor(hidden=16, layers=1)])
    with pytest.raises(ValueError, match="members"):
        fit_predictor(x_train, n_oxygen(x_train), x_test, n_oxygen(x_test), iters=1, members=0)


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
    p1, r1 = cached_predictor("logp", data, iters=3, members=1, cache_dir=tmp_path)
    files = list(tmp_path.glob("design-predictor-logp-*.safetensors"))
    assert len(files) == 1 and r1["iters"] == 3
    data.recipe["build_seconds"] = 2.0          # timing is not part of the key
    p2, r2 = cached_predictor("logp", data, iters=3, members=1, cache_dir=tmp_path)
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
    """Ethanol (ETKDG + MMFF94), encoded; heavy-atom coordinates perturbed so the energy has a gradient."""
    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    AllChem.MMFFOptimizeMolecule(mol)
    x = encode(mol).double()
    g = torch.Generator().manual_seed(0)
    x[:3, :3] += perturb * torch.randn(3, 3, generator=g, dtype=torch.float64)
    return mol, x


def state_of(types: list, pos) -> torch.Tensor:
    x = torch.zeros(N_MAX, 3 + K, dtype=torch.float64)
    for i, (t, p) in enumerate(zip(types, pos)):
        x[i, :3] = torch.tensor(p, dtype=torch.float64)
        x[i, 3 + TYPES.index(t)] = TYPE_SCALE
    x[len(types):, 3] = TYPE_SCALE
    return x


def test_energy_reward_is_minus_rdkit_mmff_with_relaxed_hydrogens_and_exact_gradient():
    mol, x = ethanol_state()
    (dec,) = decode(x[None])
    props = AllChem.MMFFGetMoleculeProperties(dec)
    # E* = min over hydrogens: RDKit's own minimisation with the heavy atoms fixed, from decode's placement
    ff = AllChem.MMFFGetMoleculeForceField(dec, props)
    e_placed = ff.CalcEnergy()
    for i in range(3):
        ff.AddFixedPoint(i)
    ff.Minimize(maxIts=2000)       # moves dec's conformer in place
    e_star = ff.CalcEnergy()
    # relaxing lowers the energy of decode's placement and keeps the heavy atoms where the state has them
    assert e_star < e_placed - 0.1
    torch.testing.assert_close(torch.tensor(ff.Positions(), dtype=x.dtype).reshape(-1, 3)[:3], x[:3, :3], rtol=0, atol=1e-6)
    r = EnergyReward()
    xg = x[None].clone().requires_grad_(True)
    out = r(xg)
    assert out.shape == (1,)
    assert float(out.detach()) == pytest.approx(-e_star, abs=1e-4)
    (g,) = torch.autograd.grad(out.sum(), xg)
    assert g[0, 3:].abs().max() == 0 and g[0, :, 3:].abs().max() == 0   # absent nodes, type channels
    # the envelope theorem: ∇E* is ∂E/∂r_heavy at the relaxed hydrogens. Finite differences of the
    # reward itself (hydrogens placed and relaxed again at each side) agree to the relaxation's
    # convergence; a gradient that ignored the hydrogens (or held them fixed) would be off by O(1)
    h = 1e-4
    for i in range(3):
        for k in range(3):
            xp, xm = x.clone(), x.clone()
            xp[i, k] += h
            xm[i, k] -= h
            fd = (r(xp[None]) - r(xm[None])) / (2 * h)
            assert float(fd) == pytest.approx(float(g[0, i, k]), rel=1e-3, abs=1e-3)
    # scale divides, clip caps the energy (zero gradient beyond it)
    assert float(EnergyReward(scale=10.0)(x[None])) == pytest.approx(-e_star / 10.0, abs=1e-4)
    clipped = EnergyReward(clip=e_star - 1.0)
    xg = x[None].clone().requires_grad_(True)
    out = clipped(xg)
    assert float(out.detach()) == pytest.approx(-(e_star - 1.0))
    assert torch.autograd.grad(out.sum(), xg)[0].abs().max() == 0


def test_energy_reward_penalises_undecodable_states_with_zero_gradient():
    _, ethanol = ethanol_state()
    bad = {
        "CH2 alone (no bond orders fill its valence)": state_of(["C2"], [(0, 0, 0)]),
        "empty": state_of([], []),
        "two fluorines 1.4 Å from one carbon C3 (over-valent)": state_of(["C3", "F0", "F0"], [(0, 0, 0), (1.4, 0, 0),
                                                                                          (-1.4, 0, 0)]),
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
    with pytest.raises(ValueError, match="hydrogen_iters"):
        EnergyReward(hydrogen_iters=0)
    with pytest.raises(ValueError, match=rf"\(batch, {N_MAX}, {3 + K}\)"):
        EnergyReward()(torch.zeros(2, N_MAX, 3))
