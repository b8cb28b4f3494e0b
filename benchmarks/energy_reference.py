"""Reference samples for DW-4 and LJ-13 by long MALA runs in-repo (nothing is downloaded).

Question: what does exp(−E) look like for the particle energies, as a reference for
benchmarks/energies.py? Method: Metropolis-adjusted Langevin on the mean-free subspace (proposal
noise projected; the projected Gaussian proposal is symmetric in the subspace, so the MALA ratio is
unchanged), `chains` parallel chains started on a lattice, `burn` steps discarded, then every `thin`-th
state kept. Writes results/ref_dw4.safetensors and results/ref_lj13.safetensors (float32 (n, dim)) and
results/energy_reference.json (acceptance rates, energy statistics, cost). `--quick`: short runs.
"""

from __future__ import annotations

import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import RESULTS, setup_torch, write_json  # noqa: E402

from tiltflow.tasks.energies import get_energy  # noqa: E402


def init(E, n, g):
    """Start away from the repulsive core: particles on a lattice of spacing ~ the pair minimum."""
    k = E.n_particles
    side = int(round(k ** (1 / E.spatial_dim) + 0.5))
    axes = [torch.arange(side, dtype=torch.float64)] * E.spatial_dim
    lattice = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, E.spatial_dim)[:k]
    spacing = getattr(E, "d0", None) or 1.1 * getattr(E, "rm", 1.0)
    x = spacing * lattice[None] + 0.05 * torch.randn(n, k, E.spatial_dim, generator=g, dtype=torch.float64)
    return x.reshape(n, -1)


def mala(E, n_chains, burn, keep, thin, step, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = E.project
    x = P(init(E, n_chains, g))

    def eg(x):
        x = x.detach().requires_grad_(True)
        e = E(x)
        (gr,) = torch.autograd.grad(e.sum(), x)
        return e.detach(), gr

    e, gr = eg(x)
    out, acc, total = [], 0.0, 0
    for k in range(burn + keep * thin):
        prop = x - step * gr + (2 * step) ** 0.5 * P(torch.randn(x.shape, generator=g, dtype=torch.float64))
        e2, g2 = eg(prop)
        fwd = -((prop - x + step * gr) ** 2).sum(1) / (4 * step)
        bwd = -((x - prop + step * g2) ** 2).sum(1) / (4 * step)
        log_a = -e2 + e + bwd - fwd
        ok = torch.log(torch.rand(n_chains, generator=g, dtype=torch.float64)) < log_a
        ok &= torch.isfinite(e2)
        x = torch.where(ok[:, None], prop, x)
        e = torch.where(ok, e2, e)
        gr = torch.where(ok[:, None], g2, gr)
        if k >= burn:
            acc += float(ok.double().mean()); total += 1
            if (k - burn) % thin == 0:
                out.append(x.clone())
    return torch.cat(out).float(), acc / max(total, 1)


def main(quick=False):
    setup_torch()
    report = {}
    for name, step in (("dw4", 0.05), ("lj13", 1e-3)):
        E = get_energy(name)
        t0 = time.perf_counter()
        burn, keep, thin = (2000, 20, 50) if quick else (20000, 50, 200)
        x, acc = mala(E, 200, burn, keep, thin, step)
        e = E(x.double())
        report[name] = {"n": len(x), "acceptance": acc, "energy_mean": float(e.mean()), "energy_std": float(e.std()),
                        "seconds": time.perf_counter() - t0, "step": step, "burn": burn, "thin": thin}
        save_file({"x": x.float().contiguous()}, RESULTS / f"ref_{name}.safetensors")
        print(name, report[name], flush=True)
    write_json("energy_reference", {"quick": quick, **report})


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
