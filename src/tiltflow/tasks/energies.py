"""Energies E(x) for sampling exp(−E): 2-D Gaussian mixture (40 modes), many-well, DW-4, LJ-13, LJ-55.

Each energy is a callable E(x) -> (batch,) for x: (batch, dim), with `dim`, `log_Z` (None when
unknown) and, for particle systems, `n_particles`, `spatial_dim` and `project` (remove the centre
of mass: the energies are translation invariant, so exp(−E) is only normalisable on the
mean-free subspace, where samplers must live). `sample(n, generator)` draws exact samples where
they exist (Gaussian mixture, many-well); DW-4 and LJ-13 reference samples come from long MCMC
(benchmarks/energy_reference.py), never downloaded.

Conventions follow the samplers literature (FAB, DEM, Adjoint Sampling): GMM-40 is FAB's instance,
which DEM uses too, mode for mode: after torch.manual_seed(0), means (rand(40, 2) − 0.5)·2·40 in
float32 and std softplus(1) = 1.3133 in every coordinate (fab-torch's GMM with loc_scaling=40,
log_var_scaling=1); we draw the same numbers from a local generator seeded 0, so the global random
stream is untouched. Many-well = d/2 copies of the double well log p(x1, x2) = −x1⁴ + 6x1² + ½x1 −
½x2²; DW-4 and LJ-13 are the energies of DEM and Adjoint Sampling (bgflow's potentials as those papers' code
calls them): DW-4 = Σ_{i<j} 0.9(d_ij − 4)⁴ − 4(d_ij − 4)², i.e. Köhler et al.'s (1/2τ) Σ_{i≠j}
with a = 0, b = −4, c = 0.9, d0 = 4, τ = 1; LJ-13 = ε Σ_{i≠j} [(r_m/d)¹² − 2(r_m/d)⁶] (ordered
pairs, so twice the sum over i < j; FAB's LJ-13 is half of this) with ε = r_m = τ = 1, plus DEM's
harmonic term ½Σ‖x_i − x̄‖², with no cut-off or floor at short range (the samplers clip forces
instead: EnergyConfig.energy_grad_clip, as Adjoint Sampling's max_grad_E_norm).
"""

from __future__ import annotations

import math

import torch


def mean_free(n_particles: int, spatial_dim: int):
    """x (batch, n·d) -> x with the centre of mass of the n particles removed."""
    def project(x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(x.shape[0], n_particles, spatial_dim)
        return (y - y.mean(1, keepdim=True)).reshape(x.shape)
    return project


class GaussianMixtureEnergy:
    """E(x) = −log Σ_k π_k N(x; μ_k, s² I) with equal weights π_k = 1/K: normalised, log Z = 0, exact
    samples. The defaults are FAB's GMM-40 (means uniform in [−40, 40]², s = softplus(1))."""

    def __init__(self, n_modes: int = 40, dim: int = 2, loc_scale: float = 40.0,
                 std: float = math.log1p(math.e), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        # fab-torch: torch.manual_seed(seed); (torch.rand((n_mixes, dim)) − 0.5)·2·loc_scaling, in float32
        self.means = ((torch.rand(n_modes, dim, generator=g) - 0.5) * 2 * loc_scale).double()
        self.std, self.dim, self.log_Z = float(std), dim, 0.0
        self.name = f"gmm{n_modes}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d2 = (x[:, None, :] - self.means.to(x)[None]).pow(2).sum(-1)               # (B, K)
        logp = (torch.logsumexp(-0.5 * d2 / self.std**2, 1) - math.log(len(self.means))
                - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi)))
        return -logp

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        dev = None if generator is None else generator.device     # drawn on the generator's device
        k = torch.randint(len(self.means), (n,), generator=generator, device=dev)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=dev)
        return (self.means.to(dev)[k] + self.std * eps).float()


class ManyWell:
    """d/2 independent double wells: E(x) = Σ_j x_{2j}⁴ − 6x_{2j}² − ½x_{2j} + ½x_{2j+1}².

    log Z = (d/2)·(log ∫e^{−E₁} + ½ log 2π) by 1-D quadrature; exact samples by inverse CDF.
    """

    def __init__(self, dim: int = 32):
        if dim % 2:
            raise ValueError(f"many-well dim must be even, got {dim}")
        self.dim, self.name = dim, f"manywell{dim}"
        self._grid = torch.linspace(-4.0, 4.0, 200001, dtype=torch.float64)
        w = torch.exp(-self._e1(self._grid))
        h = float(self._grid[1] - self._grid[0])
        self._cdf = torch.cumsum(w, 0) * h
        z1 = float(self._cdf[-1])
        self.log_Z = dim / 2 * (math.log(z1) + 0.5 * math.log(2 * math.pi))

    @staticmethod
    def _e1(x):
        return x**4 - 6 * x**2 - 0.5 * x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self._e1(x[:, 0::2]) + 0.5 * x[:, 1::2] ** 2).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        m = self.dim // 2
        dev = None if generator is None else generator.device     # drawn on the generator's device
        grid, cdf = self._grid.to(dev), self._cdf.to(dev)
        u = torch.rand(n * m, generator=generator, dtype=torch.float64, device=dev) * cdf[-1]
        x1 = grid[torch.searchsorted(cdf, u).clamp(max=len(grid) - 1)].reshape(n, m)
        x2 = torch.randn(n, m, generator=generator, dtype=torch.float64, device=dev)
        return torch.stack([x1, x2], -1).reshape(n, self.dim).float()


def _pair_distances(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(batch, n·d) -> (batch, n(n−1)/2) distances of all particle pairs."""
    y = x.reshape(x.shape[0], n, d)
    i, j = torch.triu_indices(n, n, 1)
    return (y[:, i] - y[:, j]).norm(dim=-1)


class DoubleWellParticles:
    """DW-4: E = (1/2τ) Σ_{i≠j} a(d_ij − d0) + b(d_ij − d0)² + c(d_ij − d0)⁴ (ordered pairs, Köhler et
    al. 2020 eq. for the DW system), 4 particles in 2-D."""

    def __init__(self, n_particles: int = 4, spatial_dim: int = 2, a: float = 0.0, b: float = -4.0,
                 c: float = 0.9, d0: float = 4.0, tau: float = 1.0):
        self.n_particles, self.spatial_dim, self.dim = n_particles, spatial_dim, n_particles * spatial_dim
        self.a, self.b, self.c, self.d0, self.tau = a, b, c, d0, tau
        self.project, self.log_Z, self.name = mean_free(n_particles, spatial_dim), None, f"dw{n_particles}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = _pair_distances(x, self.n_particles, self.spatial_dim) - self.d0
        return (self.a * r + self.b * r**2 + self.c * r**4).sum(1) / self.tau      # Σ_{i≠j} = 2 Σ_{i<j}

    def distances(self, x):
        return _pair_distances(x, self.n_particles, self.spatial_dim)


class LennardJones:
    """LJ-13: E = (ε/τ) Σ_{i≠j} [(r_m/d)¹² − 2(r_m/d)⁶] + ½ Σ_i ‖x_i − x̄‖², 13 particles in 3-D
    (ordered pairs as in DEM and Adjoint Sampling: the pair minimum is −2ε at d = r_m).

    The plain potential, as DEM's and Adjoint Sampling's code computes it: smooth for d > 0 and
    repulsive all the way in (a pair at d = r_m/2 adds 2ε(2¹² − 2·2⁶) = 7936ε, at d = r_m/10 about
    2·10¹²ε). In float32 the force 24ε r_m¹²/d¹³ overflows below d ≈ 1.4·10⁻³ r_m (E itself below
    6.5·10⁻⁴ r_m); sample_energy then raises rather than train on a non-finite force.
    """

    def __init__(self, n_particles: int = 13, spatial_dim: int = 3, eps: float = 1.0, rm: float = 1.0,
                 tau: float = 1.0, oscillator: float = 1.0):
        self.n_particles, self.spatial_dim, self.dim = n_particles, spatial_dim, n_particles * spatial_dim
        self.eps, self.rm, self.tau, self.oscillator = eps, rm, tau, oscillator
        self.project, self.log_Z, self.name = mean_free(n_particles, spatial_dim), None, f"lj{n_particles}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = _pair_distances(x, self.n_particles, self.spatial_dim)
        q = (self.rm / d) ** 6
        lj = (2 * self.eps / self.tau) * (q**2 - 2 * q).sum(1)       # Σ_{i≠j} = 2 Σ_{i<j}
        y = x.reshape(x.shape[0], self.n_particles, self.spatial_dim)
        return lj + 0.5 * self.oscillator * (y - y.mean(1, keepdim=True)).pow(2).sum((1, 2))

    def distances(self, x):
        return _pair_distances(x, self.n_particles, self.spatial_dim)


# Sampler settings that work for each energy (`tiltflow sample-energy` defaults; benchmarks/energies.py):
# the prior scale s should be about the target's spread.
SAMPLER_DEFAULTS = {
    "gmm40": dict(prior_scale=25.0, energy_grad_clip=100.0),
    "manywell": dict(prior_scale=1.0),        # s = 2 or 3 sends some coordinates to the lighter well (log Z off by 10-13)
    "dw4": dict(prior_scale=2.0),
    # tuned in benchmarks/energies.py (its SETTINGS note the trials); the MLP fails on LJ-13
    "lj13": dict(prior_scale=0.7, energy_grad_clip=100.0, network="egnn", hidden=(32, 32, 32), samples_per_rollout=64,
                 batch_size=128, lr=3e-3, lr_final=3e-4),
    "lj55": dict(prior_scale=1.0, energy_grad_clip=100.0, network="egnn", hidden=(32, 32, 32), samples_per_rollout=64,
                 batch_size=128, lr_final=1e-4),      # LJ-13's settings, not tuned (no CPU-sized run)
}


def get_energy(name: str):
    """'gmm40', 'manywell' (32-D), 'dw4', 'lj13', 'lj55' (DEM's LJ-55: the same potential, 55 particles)."""
    table = {"gmm40": GaussianMixtureEnergy, "manywell": ManyWell, "dw4": DoubleWellParticles,
             "lj13": LennardJones, "lj55": lambda: LennardJones(n_particles=55)}
    if name not in table:
        raise ValueError(f"energy must be one of {sorted(table)}, got {name!r}")
    return table[name]()
