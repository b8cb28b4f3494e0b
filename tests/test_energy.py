"""Energies (closed forms) and the Adjoint Sampling energy sampler.

Checks: the mixture energy is normalised (log Z = 0) and many-well's log Z matches brute-force
quadrature; pair energies have their minima where the formulas put them (DW-4 at d0 ± sqrt(−b/2c),
LJ at r_m); a short sampler run on a 4-mode mixture matches exact samples (energy distance) and
puts the right mass in each mode; particle samplers stay mean-free and lower the energy.
"""

import json
import math

import pytest
import torch

from tiltflow.methods.sample_energy import sample_energy
from tiltflow.metrics import energy_distance
from tiltflow.tasks.energies import (DoubleWellParticles, GaussianMixtureEnergy, LennardJones, ManyWell,
                                     get_energy)


def test_mixture_energy_is_normalised():
    """∫exp(−E) over a grid covering all modes (unit std, means in [−4, 4]²) = 1 to 1e-4."""
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0)
    g = torch.linspace(-12, 12, 801)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    Z = float(torch.exp(-E(X.double())).sum()) * float(g[1] - g[0]) ** 2
    assert Z == pytest.approx(1.0, abs=1e-4)


def test_many_well_log_z_and_samples():
    """log Z of 2-D many-well by 2-D grid quadrature; exact samples have E[x1] from the 1-D law."""
    E = ManyWell(dim=2)
    g = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    X = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    Z = float(torch.exp(-E(X)).sum()) * float(g[1] - g[0]) ** 2
    assert E.log_Z == pytest.approx(math.log(Z), abs=1e-4)
    x = E.sample(50000, torch.Generator().manual_seed(0)).double()
    w = torch.exp(-E(X))
    m1 = float((w * X[:, 0]).sum() / w.sum())
    assert float(x[:, 0].mean()) == pytest.approx(m1, abs=0.03)     # 3.5 standard errors
    assert ManyWell(32).log_Z == pytest.approx(16 * math.log(Z), abs=1e-3)


def test_pair_energy_minima_and_mean_free_projection():
    dw = DoubleWellParticles(n_particles=2)
    r = torch.linspace(0.5, 8, 20001, dtype=torch.float64)
    x = torch.zeros(len(r), 4, dtype=torch.float64)
    x[:, 0] = r                                    # two particles at distance r
    e = dw(x)
    # pair term b(d − d0)² + c(d − d0)⁴ has its (equal) minima at d0 ± sqrt(−b/(2c)) = 4 ± 1.49
    assert min(abs(float(r[e.argmin()]) - (4 + k * math.sqrt(4 / 1.8))) for k in (-1, 1)) < 0.01
    lj = LennardJones(n_particles=2, spatial_dim=3, oscillator=0.0)
    y = torch.zeros(len(r), 6)
    y[:, 0] = r
    assert float(r[lj(y).argmin()]) == pytest.approx(1.0, abs=1e-3)
    p = get_energy("lj13").project(torch.randn(5, 39))
    assert p.reshape(5, 13, 3).mean(1).abs().max() < 1e-6
    lj55 = get_energy("lj55")
    assert (lj55.dim, lj55.name) == (165, "lj55")
    with pytest.raises(ValueError, match="energy must be one of"):
        get_energy("lj38")



def test_gmm40_is_the_fab_dem_instance():
    """GMM-40 is fab-torch's GMM(dim=2, n_mixes=40, loc_scaling=40, log_var_scaling=1) after
    torch.manual_seed(0), as DEM builds it: the recipe is recomputed here on the global stream (in a
    fork_rng) and must match bit for bit; std = softplus(1); E = −log p of FAB's MixtureSameFamily
    (float64, 1e-9: rounding); building the energy leaves the global random stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        locs = (torch.rand((40, 2)) - 0.5) * 2 * 40          # fab.target_distributions.gmm.GMM
        state = torch.random.get_rng_state()
        E = get_energy("gmm40")
        assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(E.means.float(), locs)
    assert E.means.abs().max() < 40 and len(E.means) == 40
    scale = torch.nn.functional.softplus(torch.tensor(1.0, dtype=torch.float64))
    assert E.std == pytest.approx(float(scale), rel=1e-12)          # 1.3133
    fab = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(40, dtype=torch.float64)),
        torch.distributions.MultivariateNormal(locs.double(), scale_tril=torch.diag_embed(scale * torch.ones(40, 2,
                                                                                         dtype=torch.float64))))
    x = 50 * torch.rand(100, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 25
    torch.testing.assert_close(E(x), -fab.log_prob(x), rtol=0, atol=1e-9)


def test_lennard_jones_is_the_plain_potential_with_no_floor():
    """A pair at distance d (ordered pairs, ε = r_m = 1): E = 2(d⁻¹² − 2d⁻⁶) and |∂E/∂d| = 24(d⁻¹³ − d⁻⁷),
    checked at short range too (float64, rel 1e-10: rounding): E(½) = 7936, E(¼) = 33 538 048, the
    force keeps growing as d falls (a floor would make it 0 there); LJ-13's harmonic term is
    ½ Σ ‖x_i − x̄‖²."""
    lj = LennardJones(n_particles=2, spatial_dim=3, oscillator=0.0)
    for d in (0.1, 0.25, 0.3, 0.5, 0.9, 1.0, 1.7):
        x = torch.zeros(1, 6, dtype=torch.float64)
        x[0, 3] = d
        x.requires_grad_(True)
        e = lj(x)
        (g,) = torch.autograd.grad(e.sum(), x)
        assert float(e.detach()) == pytest.approx(2 * (d**-12 - 2 * d**-6), rel=1e-10)
        assert float(g[0, 3]) == pytest.approx(-24 * (d**-13 - d**-7), rel=1e-10, abs=1e-10)
    e = lambda d: float(lj(torch.tensor([[0, 0, 0, d, 0, 0]], dtype=torch.float64)))
    assert e(0.5) == pytest.approx(7936) and e(0.25) == pytest.approx(33538048)
    y = torch.randn(3, 39, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = LennardJones(oscillator=0.0)(y)
    c = y.reshape(3, 13, 3) - y.reshape(3, 13, 3).mean(1, keepdim=True)
    torch.testing.assert_close(get_energy("lj13")(y) - plain, 0.5 * c.pow(2).sum((1, 2)))


def test_huge_forces_are_clipped_and_non_finite_forces_raise():
    """energy_grad_clip rescales each row of ∇E to norm ≤ clip, also when its float32 squared norm would
    overflow (a pair at d = 0.01: |∇E| ≈ 7·10²⁷, kept at norm 100, direction −x̂ for particle 1); 0 or
    None leaves it alone. Coincident particles (d = 0: NaN force) raise FloatingPointError naming the
    energy, in _energy_grad and in sample_energy, instead of training on a zeroed force."""
    from tiltflow.methods.sample_energy import _energy_grad
    lj = get_energy("lj13")
    x = 0.3 * torch.arange(39, dtype=torch.float32).reshape(1, 13, 3).repeat(2, 1, 1)   # a line, spacing 1.56
    x[1, 1] = x[1, 0] + torch.tensor([0.01, 0.0, 0.0])
    x = x.reshape(2, 39)
    g, _ = _energy_grad(lj, x, 100.0)
    assert float(g[1].norm()) == pytest.approx(100.0, rel=1e-5)
    assert float(g[1, 3] / g[1].norm()) == pytest.approx(-1 / math.sqrt(2), rel=1e-4)  # ∓x̂ on the pair
    raw, _ = _energy_grad(lj, x, None)
    assert torch.equal(g[0], raw[0]) and float(raw[0].norm()) < 100        # a small force is not touched
    assert torch.equal(_energy_grad(lj, x, 0.0)[0], raw) and float(raw[1].abs().max()) > 1e27
    x = x.reshape(2, 13, 3)
    x[1, 1] = x[1, 0]
    with pytest.raises(FloatingPointError, match="energy 'lj13' is NaN or inf at 1 of 2"):
        _energy_grad(lj, x.reshape(2, 39), 100.0)

    class Broken:
        name = "broken"

        def __call__(self, y):
            return torch.sqrt(-(y**2).sum(1) - 1.0)          # NaN everywhere

    with pytest.raises(FloatingPointError, match="energy 'broken'"):
        sample_energy(Broken(), 2, iters=1, samples_per_rollout=8, batch_size=8, steps=5, progress=False)


def test_grad_clip_zero_means_no_clipping():
    """grad_clip=0 disables clipping, as in the other loops: the weights after 4 steps equal those of
    grad_clip=1e9 bit for bit (clip_grad_norm_ multiplies by min(1, max/norm) = 1) and differ from the
    start (zeroing every gradient, the old behaviour, would leave them at the start)."""
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0)
    small = dict(prior_scale=4.0, iters=4, samples_per_rollout=16, iters_per_rollout=2, batch_size=16, steps=5,
                 hidden=(8,), progress=False)
    a = sample_energy(E, 2, grad_clip=0.0, **small).model.state_dict()
    b = sample_energy(E, 2, grad_clip=1e9, **small).model.state_dict()
    c = sample_energy(E, 2, grad_clip=1e9, **{**small, "iters": 1, "iters_per_rollout": 1, "lr": 0.0}).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    with pytest.raises(ValueError, match="grad_clip must be a non-negative"):
        sample_energy(E, 2, grad_clip=-1.0)
    with pytest.raises(ValueError, match="energy_grad_clip must be a non-negative"):
        sample_energy(E, 2, energy_grad_clip=float("inf"))

def test_sampler_matches_a_four_mode_mixture():
    """Adjoint Sampling + replay buffer, 1500 gradient steps (~8 s). Energy distance of the untrained
    prior N(0, 16 I) to exact samples is ~0.9 and of a 600-step run 0.15 (measured)."""
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0, std=1.0, seed=0)
    s = sample_energy(E, 2, prior_scale=4.0, iters=1500, iters_per_rollout=10, lr=2e-3, progress=False)
    x = s.sample(4000, seed=1)
    ref = E.sample(4000, torch.Generator().manual_seed(0))
    ed = energy_distance(x, ref)
    # two of the modes overlap, so compare nearest-mode fractions with the exact sample's
    frac = torch.bincount(torch.cdist(x.double(), E.means).argmin(1), minlength=4).double() / len(x)
    ref_frac = torch.bincount(torch.cdist(ref.double(), E.means).argmin(1), minlength=4).double() / len(ref)
    print("energy distance", ed, "mode fractions", frac.tolist(), "exact", ref_frac.tolist())
    assert ed < 0.1
    assert (frac - ref_frac).abs().max() < 0.05


def test_particle_sampler_is_mean_free_and_lowers_the_energy():
    E = DoubleWellParticles()
    s = sample_energy(E, E.dim, prior_scale=2.0, iters=150, iters_per_rollout=10, lr=2e-3, progress=False)
    x = s.sample(1000, seed=1)
    assert x.reshape(-1, 4, 2).mean(1).abs().max() < 1e-5
    from tiltflow.methods.sample_energy import gaussian_prior
    from tiltflow import estimators
    gen = torch.Generator().manual_seed(1)
    xs, _ = estimators.path_rollout(gaussian_prior(8, 2.0), 1000, torch.linspace(0, 1, 51, dtype=torch.float64),
                                    gen, project=E.project)
    assert float(E(x).median()) < float(E(xs[-1].float()).median()) - 1.0


def test_bad_arguments():
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0)
    with pytest.raises(ValueError, match="dim must be"):
        sample_energy(E, 0)
    with pytest.raises(ValueError, match="unknown sample_energy options"):
        sample_energy(E, 2, epoch=3)
    with pytest.raises(ValueError, match="prior_scale"):
        sample_energy(E, 2, prior_scale=-1.0)


def test_run_folder_resume_is_exact_and_the_sampler_loads_back(tmp_path):
    """Stopping after 2 epochs and resuming to 4 gives bit-identical weights and the same log as one
    4-epoch run (weights, optimiser, replay buffer and random streams are all checkpointed); the
    saved model.safetensors loads back into a sampler that draws the same samples."""
    from tiltflow.methods.sample_energy import EnergySampler
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0)
    small = dict(prior_scale=4.0, samples_per_rollout=32, iters_per_rollout=2, batch_size=32, buffer_size=48,
                 steps=10, hidden=(16, 16), checkpoint_every=2, progress=False)
    full = sample_energy(E, 2, iters=8, out=tmp_path / "full", **small)
    sample_energy(E, 2, iters=4, out=tmp_path / "cut", **small)
    resumed = sample_energy(E, 2, iters=8, out=tmp_path / "cut", resume=True, **small)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert [r["loss"] for r in log] == [r["loss"] for r in full.history]
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["energy"] == "gmm4"

    loaded = EnergySampler.load(tmp_path / "cut" / "model.safetensors", E)
    assert loaded.config.hidden == (16, 16) and len(loaded.history) == 4
    assert torch.equal(loaded.sample(50, seed=3), resumed.sample(50, seed=3))
    assert loaded.log_Z(n=64).ess > 0
    with pytest.raises(ValueError, match="cannot resume"):
        sample_energy(E, 2, iters=8, out=tmp_path / "cut", resume=True, **{**small, "batch_size": 16})


def _dw4_egnn_run(network="egnn", **kw):
    E = DoubleWellParticles()
    small = dict(prior_scale=2.0, samples_per_rollout=32, iters_per_rollout=3, batch_size=32, steps=10,
                 hidden=(16, 16), iters=9, lr=1e-2, progress=False)
    return E, sample_energy(E, E.dim, network=network, **{**small, **kw})


def _rotation_2d(theta, reflect=False):
    c, s = math.cos(theta), math.sin(theta)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return R @ torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)) if reflect else R


def test_egnn_sampler_is_mean_free_equivariant_and_round_trips(tmp_path):
    """network='egnn' on DW-4 after a few (lr 1e-2) steps: the trained velocity, in float64, satisfies
    v(Px) = P v(x) for a permutation P of the particles and v(xRᵀ) = v(x)Rᵀ for a rotation or
    reflection R (closed-form identities of an E(2)- and permutation-equivariant map; 1e-10 is
    float64 rounding). The same check on an MLP control fails by > 1e-3, so the identities test the
    architecture. Samples are mean-free; run folder and EnergySampler.load give the same sampler."""
    import copy
    from tiltflow.methods.sample_energy import EnergySampler
    E, s = _dw4_egnn_run(out=tmp_path / "run")
    assert s.config.network == "egnn"
    assert s.model.net.residual.layers[0].coord[-1].weight.abs().max() > 0    # the control has trained
    x = s.sample(500, seed=1)
    assert x.reshape(-1, 4, 2).mean(1).abs().max() < 1e-5

    def errors(model):
        net = copy.deepcopy(model.net).double()
        g = torch.Generator().manual_seed(0)
        y = E.project(2.0 * torch.randn(16, 8, generator=g, dtype=torch.float64))
        t = torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.05
        v = net(y, t).reshape(16, 4, 2)
        perm = torch.tensor([2, 0, 3, 1])
        e_perm = (net(y.reshape(16, 4, 2)[:, perm].reshape(16, 8), t).reshape(16, 4, 2) - v[:, perm]).abs().max()
        e_rot = max(float((net((y.reshape(16, 4, 2) @ R.T).reshape(16, 8), t).reshape(16, 4, 2) - v @ R.T).abs().max())
                    for R in (_rotation_2d(0.7), _rotation_2d(2.1, reflect=True)))
        return float(e_perm), e_rot, float(v.abs().max())

    e_perm, e_rot, scale = errors(s.model)
    assert scale > 1.0 and e_perm < 1e-10 and e_rot < 1e-10
    _, mlp = _dw4_egnn_run(network="mlp")
    assert min(errors(mlp.model)[:2]) > 1e-3

    loaded = EnergySampler.load(tmp_path / "run" / "model.safetensors", E)
    assert loaded.config.network == "egnn" and loaded.config.hidden == (16, 16)
    assert torch.equal(loaded.sample(50, seed=3), s.sample(50, seed=3))
    path = s.save(tmp_path / "elsewhere" / "sampler.safetensors")     # no config.json beside it:
    alone = EnergySampler.load(path, E)                               # the architecture comes from the file
    assert alone.config.network == "egnn" and alone.config.hidden == (16, 16)
    assert torch.equal(alone.sample(50, steps=10, seed=3), s.sample(50, seed=3))


def test_egnn_needs_a_particle_energy():
    E = GaussianMixtureEnergy(n_modes=4, loc_scale=4.0)
    with pytest.raises(ValueError, match="network='egnn' needs a particle energy"):
        sample_energy(E, 2, network="egnn", iters=1, progress=False)
    with pytest.raises(ValueError, match="network must be"):
        sample_energy(E, 2, network="transformer", iters=1, progress=False)
    with pytest.raises(ValueError, match="one width"):
        sample_energy(DoubleWellParticles(), 8, network="egnn", hidden=(16, 32), iters=1, progress=False)
