"""Learn a sampler of exp(−E) from the energy alone (Adjoint Sampling), and estimate log Z.

The energy is a normalised mixture of four unit Gaussians, E(x) = −log Σ_k ¼ N(x; μ_k, I), so
log Z = log ∫ exp(−E) = 0 and exact samples exist to compare with. sample_energy trains a
memoryless SDE from N(0, s² I) whose terminal law is exp(−E)/Z; `log_Z` reweights its paths
(Crooks) to estimate log Z.

    python examples/04_sample_an_energy.py        # about 10 s on one CPU thread
"""

import math
import os

import torch

import tiltflow as tilt

FAST = os.environ.get("TILTFLOW_EXAMPLE_FAST") == "1"   # a smaller run, for the test suite

MEANS = torch.tensor([[-2.5, -2.5], [-2.5, 2.5], [2.5, -2.5], [2.5, 2.5]])


def energy(x: torch.Tensor) -> torch.Tensor:
    """E(x) for x: (batch, 2); returns (batch,). Any differentiable function of x will do."""
    d2 = (x[:, None, :] - MEANS.to(x)).pow(2).sum(-1)                       # (batch, 4)
    return -torch.logsumexp(-0.5 * d2, dim=1) + math.log(4) + math.log(2 * math.pi)


sampler = tilt.sample_energy(energy, 2, prior_scale=4.0, iters=300 if FAST else 1500, iters_per_rollout=10,
                             lr=2e-3, progress=False)

n = 1000 if FAST else 4000
g = torch.Generator().manual_seed(0)
exact = MEANS[torch.randint(4, (n,), generator=g)] + torch.randn(n, 2, generator=g)
print(f"energy distance to exact samples {tilt.metrics.energy_distance(sampler.sample(n, seed=1), exact):.4f}")
w = sampler.log_Z(n)
print(f"log Z estimate {w.log_Z:.3f} (exact 0), effective sample size {w.ess_fraction:.0%}")
