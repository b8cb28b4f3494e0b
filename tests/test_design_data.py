"""De novo design data: encode/decode round trip, the filter, the split by molecule, the cache,
RDKit evaluation on real and random states, and the Gasteiger dipole's symmetry zeros."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")

from rdkit import Chem  # noqa: E402
from rdkit.Chem import AllChem  # noqa: E402

from tiltflow.tasks import design  # noqa: E402


def _conformer(smiles: str, seed: int = 1):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    return mol


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The first 24 filtered NCI molecules, 3 conformers each, and the folder of its cache."""
    cache = tmp_path_factory.mktemp("design")
    return design.load_dataset(cache_dir=cache, conformers_per_molecule=3, seed=0, max_molecules=24), cache


@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1O", "CC(=O)NC", "N#CC(F)(F)F", "O=C1CCCN1"])
def test_round_trip_keeps_graph_and_coordinates(smiles):
    mol = _conformer(smiles)
    x = design.encode(mol)
    assert x.shape == (design.N_MAX, 3 + design.K) and x.dtype == torch.float32
    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    m = len(heavy)
    # mean-free over all N_MAX nodes, since absent nodes sit at the origin (float32 rounding)
    assert x[:, :3].mean(0).abs().max() < 1e-5
    assert (x[m:, :3] == 0).all() and (x[m:, 3] == design.TYPE_SCALE).all()
    assert torch.allclose(x[:, 3:].sum(-1), torch.full((design.N_MAX,), design.TYPE_SCALE))
    # each node's type is its element and its number of hydrogens
    types = [design.TYPES[k] for k in x[:m, 3:].argmax(-1).tolist()]
    assert types == [f"{a.GetSymbol()}{a.GetTotalNumHs(includeNeighbors=True)}" for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    (out,) = design.decode(x[None])
    assert design.smiles(out) == design.smiles(mol)
    # heavy atom i is node i, at node i's coordinates; the hydrogens follow, all of them
    pos = mol.GetConformer().GetPositions()[heavy]
    pos -= pos.mean(0)
    np.testing.assert_allclose(out.GetConformer().GetPositions()[:m], pos, atol=1e-5)   # float32 storage
    assert [a.GetSymbol() for a in out.GetAtoms()][:m] == [mol.GetAtomWithIdx(i).GetSymbol() for i in heavy]
    assert out.GetNumAtoms() == mol.GetNumAtoms()
    # RDKit's hydrogens sit at bonding distance from their heavy atom (C–H ≈ 1.09, N–H 1.01, O–H 0.96 Å)
    r = out.GetConformer().GetPositions()
    for a in out.GetAtoms():
        if a.GetAtomicNum() == 1:
            assert 0.9 < np.linalg.norm(r[a.GetIdx()] - r[a.GetNeighbors()[0].GetIdx()]) < 1.15


def test_encode_ignores_how_hydrogens_are_held():
    mol = _conformer("CC(=O)NC")
    assert torch.equal(design.encode(mol), design.encode(Chem.RemoveHs(mol)))   # implicit H, same conformer


def test_round_trip_keeps_handedness():
    # L-alanine: the decoded molecule's chirality comes from the 3-D coordinates alone
    mol = _conformer("C[C@H](N)C(=O)O")
    (out,) = design.decode(design.encode(mol)[None])
    assert Chem.MolToSmiles(Chem.RemoveHs(out)) == Chem.MolToSmiles(Chem.MolFromSmiles("C[C@H](N)C(=O)O"))
    mirror = design.encode(mol)
    mirror[:, 0] *= -1
    (out,) = design.decode(mirror[None])
    assert Chem.MolToSmiles(Chem.RemoveHs(out)) == Chem.MolToSmiles(Chem.MolFromSmiles("C[C@@H](N)C(=O)O"))


def test_encode_rejects_what_the_state_cannot_hold():
    with pytest.raises(ValueError, match="Cl"):
        design.encode(_conformer("CCCl"))
    with pytest.raises(ValueError, match="more than N_MAX"):
        design.encode(_conformer("CCCCCCCCCC"))   # 10 heavy atoms
    with pytest.raises(ValueError, match="formal charge 1"):
        design.encode(_conformer("C[N+](C)(C)C"))
    with pytest.raises(ValueError, match="4 hydrogens; a C type holds at most 3"):
        design.encode(_conformer("C"))            # methane
    with pytest.raises(ValueError, match=r"shape \(n, 9, 14\)"):
        design.decode(torch.zeros(9, 14))


def test_filter():
    assert design.passes_filter("CCO") and design.passes_filter("Cc1ccc(O)cc1O")   # 9 heavy atoms
    assert not design.passes_filter("Cc1ccc(O)cc1OC")      # 10 heavy atoms
    assert design.passes_filter("CCCCCCCCC")               # 9 heavy atoms, 29 with hydrogens
    assert not design.passes_filter("C") and not design.passes_filter("O")   # CH₄, H₂O: no such type
    assert not design.passes_filter("C[N+](C)(C)C")        # formal charge
    assert not design.passes_filter("CC(=O)[O-]")
    assert not design.passes_filter("CCCl")                # element outside C/N/O/F
    assert not design.passes_filter("CC.O")                # two fragments
    assert not design.passes_filter("not a smiles")


def test_split_is_by_molecule_and_deterministic(small):
    data, _ = small
    assert not set(data.train_smiles) & set(data.test_smiles)
    assert all(design.split_of(s) == "train" for s in data.train_smiles)
    assert all(design.split_of(s) == "test" for s in data.test_smiles)
    # every row decodes to the molecule its index names
    for x, idx, names in ((data.train, data.train_molecule, data.train_smiles),
                          (data.test, data.test_molecule, data.test_smiles)):
        assert x.shape[0] == idx.shape[0] == 3 * len(names)
        got = [design.smiles(m) for m in design.decode(x)]
        assert got == [names[i] for i in idx.tolist()]
    # the hash rule puts about TEST_FRACTION of the filtered NCI molecules in the test set:
    # 412 molecules, binomial sd ≈ 0.015, so ±0.05 is > 3 sd
    names = [design.smiles(Chem.MolFromSmiles(ln.split()[0]))
             for ln in design._nci_path().read_text().splitlines()[:2000]
             if ln.strip() and design.passes_filter(ln.split()[0])]
    share = np.mean([design.split_of(s) == "test" for s in set(names)])
    assert abs(share - design.TEST_FRACTION) < 0.05


def test_cache_loads_back_identically_and_rebuild_is_reproducible(small):
    data, cache = small
    assert len(list(cache.glob("design-*.safetensors"))) == 1
    assert len(data.train_smiles) + len(data.test_smiles) == 24
    again = design.load_dataset(cache_dir=cache, conformers_per_molecule=3, seed=0, max_molecules=24)
    fresh = design.load_dataset(cache_dir=cache, conformers_per_molecule=3, seed=0, max_molecules=24,
                                use_cache=False)
    for other in (again, fresh):
        for name in ("train", "test", "train_molecule", "test_molecule"):
            assert torch.equal(getattr(data, name), getattr(other, name))
        assert other.train_smiles == data.train_smiles and other.test_smiles == data.test_smiles
    assert again.recipe == data.recipe
    assert data.recipe["conformers_per_molecule"] == 3 and data.recipe["max_molecules"] == 24


def test_evaluate_on_data_and_on_noise(small):
    data, _ = small
    ev = design.evaluate(data.train, data.train_smiles)
    # relaxed MMFF geometries of neutral closed-shell molecules: every atom has its textbook valence
    assert ev["validity"] >= 0.95 and ev["atom_stability"] >= 0.95 and ev["molecule_stability"] >= 0.95
    assert ev["novelty"] == 0.0                                           # the training set itself
    assert ev["uniqueness"] == pytest.approx(len(data.train_smiles) / data.train.shape[0])
    assert 0 < ev["qed_mean"] < 1 and ev["qed_cvar_left"] <= ev["qed_mean"] <= ev["qed_cvar_right"]
    assert math.isfinite(ev["logp_mean"]) and ev["dipole_mean"] > 0
    noise = torch.randn(64, design.N_MAX, 3 + design.K, generator=torch.Generator().manual_seed(0))
    noise[:, :, :3] *= 1.5
    ev = design.evaluate(noise)
    assert ev["validity"] <= 0.1 and ev["molecule_stability"] <= 0.1 and ev["atom_stability"] < 0.6


def test_properties_are_per_molecule_with_nan_for_invalid():
    mols = [design.decode(design.encode(_conformer("CCO"))[None])[0], None]
    p = design.properties(mols)
    assert set(p) == {"qed", "logp", "dipole", "heavy_atoms"}
    assert p["heavy_atoms"][0] == 3 and all(math.isnan(v[1]) for v in p.values())
    assert p["logp"][0] == pytest.approx(-0.0014, abs=1e-3)   # Crippen's logP of ethanol


@pytest.mark.parametrize("smiles", ["O=C=O", "C#C", "FC(F)(F)F"])
def test_dipole_of_symmetric_molecules_is_zero(smiles):
    # D∞h / Td: Σ q_i r_i vanishes by symmetry; MMFF relaxation keeps the symmetry to ~1e-4 Å and
    # RDKit places acetylene's hydrogens on its axis
    assert design.passes_filter(smiles)
    assert design.dipole(design.encode(_conformer(smiles))[None])[0] < 1e-3


@pytest.mark.parametrize("smiles", ["CO", "CF", "C#N"])
def test_dipole_of_polar_molecules_is_positive_and_rotation_invariant(smiles):
    x = design.encode(_conformer(smiles))[None]
    mu = design.dipole(x)[0]
    assert mu > 0.1          # ≥ 0.5 D: methanol, fluoromethane and HCN are strongly polar
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    q = q * torch.sign(torch.det(q))
    y = x.clone()
    y[..., :3] = y[..., :3] @ q.T
    assert design.dipole(y)[0] == pytest.approx(mu, abs=1e-5)


def test_sdf_and_drawing(tmp_path, monkeypatch):
    x = torch.stack([design.encode(_conformer(s)) for s in ("CCO", "c1ccccc1")])
    noise = torch.randn(1, design.N_MAX, 3 + design.K, generator=torch.Generator().manual_seed(0))
    path = design.to_sdf(torch.cat([x, noise]), tmp_path / "out.sdf")
    records = list(Chem.SDMolSupplier(str(path), removeHs=False, sanitize=False))
    assert [r.GetIntProp("valid") for r in records] == [1, 1, 0]
    assert records[1].GetProp("smiles") == "c1ccccc1"
    assert records[0].GetNumAtoms() == 9 and records[2].GetNumAtoms() <= design.N_MAX   # ethanol with H; bare atoms
    np.testing.assert_allclose(records[0].GetConformer().GetPositions()[:3], x[0, :3, :3].numpy(), atol=1e-4)
    png = design.draw(x, tmp_path / "grid.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(__import__("sys").modules, "PIL", None)
    with pytest.warns(UserWarning, match="Pillow"):
        assert design.draw(x, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_bond_order_search_agrees_with_brute_force():
    """_extra_orders finds extra orders b_e ∈ {0, 1, 2} with Σ_{e ∋ i} b_e = need_i exactly when
    one exists (all 3^E assignments enumerated), and what it returns satisfies every atom."""
    import itertools
    g = np.random.default_rng(0)
    found = 0
    for _ in range(300):
        n = int(g.integers(2, 7))
        pairs = list(itertools.combinations(range(n), 2))
        edges = [pairs[k] for k in sorted(g.choice(len(pairs), size=min(len(pairs), int(g.integers(1, 7))),
                                                   replace=False))]
        need = g.integers(0, 4, size=n).tolist()

        def fits(b):
            return all(sum(v for (i, j), v in zip(edges, b) if a in (i, j)) == need[a] for a in range(n))
        exists = any(fits(b) for b in itertools.product(range(3), repeat=len(edges)))
        got = design._extra_orders(n, edges, need)
        assert (got is not None) == exists, (n, edges, need)
        if got is not None:
            assert fits(got)
            found += 1
    assert 20 < found < 280      # both outcomes are exercised
