"""How well does Adjoint Sampling sample GMM-40, many-well (32-D), DW-4 and LJ-13, and at what cost?

For each energy `tilt.sample_energy` (Adjoint Sampling + replay buffer, MLP control, mean-free for
particles) trains for a fixed budget; then 4000 samples are compared with reference samples —
exact for GMM-40 and many-well, long MALA (benchmarks/energy_reference.py, run it first) for DW-4
and LJ-13 — by the metrics the Adjoint Sampling paper reports where we can compute them:
W1 between the energy histograms, W2 between samples (POT, exact OT on 2000 points; for particles
W1 between interatomic-distance histograms instead, which is permutation invariant), log Z error
of the Crooks estimate where log Z is known, ESS fraction, and training wall time.
Writes results/energies.json and results/energies.png. Budget: 600 rollouts × 20 steps; `--quick`: 60.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import RESULTS, save_figure, setup_torch, write_json  # noqa: E402

from tiltflow.methods.sample_energy import sample_energy  # noqa: E402
from tiltflow.tasks.energies import get_energy  # noqa: E402

SETTINGS = {  # prior scale ~ the target's spread; particles use the mean-free projection
    "gmm40": dict(prior_scale=25.0, energy_grad_clip=100.0),
    "manywell": dict(prior_scale=2.0),
    "dw4": dict(prior_scale=2.0),
    "lj13": dict(prior_scale=1.0, energy_grad_clip=50.0),
}


def w1_1d(a, b):
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    q = np.linspace(0, 1, 2001)[1:-1]
    return float(np.abs(np.quantile(a, q) - np.quantile(b, q)).mean())


def w2(x, y, n=2000):
    import ot
    x, y = x[:n].double().numpy(), y[:n].double().numpy()
    M = ot.dist(x, y)
    return float(np.sqrt(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), M, numItermax=10**6)))


def main(quick=False):
    setup_torch()
    epochs = 60 if quick else 600
    out = {}
    for name, kw in SETTINGS.items():
        E = get_energy(name)
        if name in ("gmm40", "manywell"):
            ref = E.sample(4000, torch.Generator().manual_seed(0))
        else:
            path = RESULTS / f"ref_{name}.safetensors"
            if not path.exists():
                print(f"skip {name}: run benchmarks/energy_reference.py first")
                continue
            ref = load_file(path)["x"][-4000:]
        t0 = time.perf_counter()
        s = sample_energy(E, E.dim, epochs=epochs, batches_per_epoch=20, lr=1e-3, progress=False, **kw)
        train = time.perf_counter() - t0
        x = s.sample(4000, seed=1)
        pw = s.log_Z(4000, seed=2)
        ex, er = E(x.double()).numpy(), E(ref.double()).numpy()
        rec = {"train_s": train, "epochs": epochs, "energy_w1": w1_1d(ex, er),
               "energy_median_sample": float(np.median(ex)), "energy_median_ref": float(np.median(er)),
               "ess_fraction": pw.ess_fraction, "log_Z_est": pw.log_Z, "log_Z_true": E.log_Z}
        if E.log_Z is not None:
            rec["log_Z_err"] = abs(pw.log_Z - E.log_Z)
        if hasattr(E, "distances"):
            rec["distance_w1"] = w1_1d(E.distances(x).flatten(), E.distances(ref).flatten())
        else:
            rec["w2"] = w2(x, ref)
        out[name] = rec
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
        out[name]["_samples"] = (x[:2000].numpy(), ref[:2000].numpy(), ex[:2000], er[:2000])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, len(out), figsize=(4 * len(out), 3.5))
    ax = np.atleast_1d(ax)
    for a, (name, rec) in zip(ax, out.items()):
        x, ref, ex, er = rec.pop("_samples")
        if name == "gmm40":
            a.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.3, label="exact")
            a.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, label="sampler")
        else:
            lo, hi = np.percentile(er, [0.5, 99.5])
            bins = np.linspace(lo - 0.2 * (hi - lo), hi + 0.5 * (hi - lo), 60)
            a.hist(er, bins, alpha=0.5, density=True, label="reference")
            a.hist(np.clip(ex, bins[0], bins[-1]), bins, alpha=0.5, density=True, label="sampler")
            a.set_xlabel("energy")
        a.set_title(name); a.legend(fontsize=7)
    save_figure(fig, "energies")
    write_json("energies", {"quick": quick, "settings": SETTINGS, "results": out})


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
