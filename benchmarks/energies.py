"""How well does Adjoint Sampling sample GMM-40, many-well (32-D), DW-4 and LJ-13, and at what cost?

For each energy `tilt.sample_energy` (Adjoint Sampling + replay buffer, mean-free for particles)
trains for a fixed number of rollouts (about 10 minutes or less on one thread); the particle
energies use the E(n)- and permutation-equivariant EGNN control of the paper (rows "dw4", "lj13")
and, as a baseline at the same settings otherwise, the MLP on flattened coordinates ("dw4_mlp",
"lj13_mlp"). Then 4000 samples are compared with reference samples — exact for GMM-40 and many-well,
long MALA (benchmarks/energy_reference.py, run it first) for DW-4 and LJ-13 — by the metrics the
Adjoint Sampling paper reports where we can compute them: W1 and W2 between the energy histograms,
for particles W1 between interatomic-distance histograms (permutation invariant), otherwise W2
between samples (POT, exact OT on 2000 points), log Z error of the Crooks estimate where log Z is
known, ESS fraction, and training wall time. GMM-40 also reports how many of the 40 modes hold at
least 20 of the 4000 samples (exact sampling: ~100 each); many-well the fraction of x_{2j} > 0
(exact: 0.84, the ½x tilt).

Instances (tasks/energies.py): GMM-40 is FAB's and DEM's (fab-torch GMM after torch.manual_seed(0),
std softplus(1)); LJ-13 is the plain potential of DEM / Adjoint Sampling with the harmonic term and no
short-range floor (forces clipped at norm 100 in the sampler, as Adjoint Sampling's max_grad_E_norm),
so rare overlapping pairs give energies of 10⁶ and more: the energy W1/W2 of a poor sampler are
dominated by them. Metric conventions differ in the literature's code: DEM logs energy_w2 =
ot.emd2_1d(E_ref, E_gen), the *squared* W2 of the energy histograms; adjoint_samplers takes its
square root (as here).

Figure results/energies.png: GMM-40 samples over exact ones; for the others the energy histograms
of sampler and reference (particles: EGNN and MLP), and the interatomic-distance histograms of
DW-4 and LJ-13. Writes results/energies.json.
`--quick`: a few rollouts each (a smoke test of the script, not a measurement; writes *_quick files).
`--only=ROW,...` runs some rows and writes results/energies_part_<rows>.json, so that rows can run
side by side; `--merge` then combines the parts into results/energies.json and the figure.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import RESULTS, save_figure, setup_torch, write_json  # noqa: E402

from tiltflow.methods.sample_energy import sample_energy  # noqa: E402
from tiltflow.tasks.energies import get_energy  # noqa: E402

# row -> (energy, sample_energy settings, rollouts (epochs), rollouts with --quick)
EGNN = dict(network="egnn", hidden=(32, 32, 32), iters_per_rollout=20)
SETTINGS = {
    "gmm40": ("gmm40", dict(prior_scale=25.0, energy_grad_clip=100.0, iters_per_rollout=20, lr=1e-3), 600, 20),
    "manywell": ("manywell", dict(prior_scale=1.0, iters_per_rollout=20, lr=1e-3), 600, 20),
    "dw4": ("dw4", dict(prior_scale=2.0, samples_per_rollout=128, batch_size=128, lr=3e-3, lr_final=3e-4, **EGNN),
            200, 2),
    "dw4_mlp": ("dw4", dict(prior_scale=2.0, iters_per_rollout=20, lr=1e-3), 600, 20),
    "lj13": ("lj13", dict(prior_scale=1.0, energy_grad_clip=100.0, samples_per_rollout=64, batch_size=128, lr=1e-3,
                          lr_final=1e-4, **EGNN), 250, 2),
    "lj13_mlp": ("lj13", dict(prior_scale=1.0, energy_grad_clip=100.0, iters_per_rollout=20, lr=1e-3), 600, 20),
}


def w_1d(a, b, p=1):
    """W_p between two 1-D samples by their quantile functions on 1999 levels."""
    q = np.linspace(0, 1, 2001)[1:-1]
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float((np.abs(np.quantile(a, q) - np.quantile(b, q)) ** p).mean() ** (1 / p))


def w1_1d(a, b):
    return w_1d(a, b, 1)


def w2(x, y, n=2000):
    import ot
    x, y = x[:n].double().numpy(), y[:n].double().numpy()
    M = ot.dist(x, y)
    return float(np.sqrt(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), M, numItermax=10**6)))


def reference(E, name):
    if name in ("gmm40", "manywell"):
        return E.sample(4000, torch.Generator().manual_seed(0))
    path = RESULTS / f"ref_{name}.safetensors"
    if not path.exists():
        return None
    return load_file(path)["x"][-4000:]


def run(row, quick):
    name, kw, epochs, quick_epochs = SETTINGS[row]
    epochs = quick_epochs if quick else epochs
    E = get_energy(name)
    ref = reference(E, name)
    if ref is None:
        print(f"skip {row}: run benchmarks/energy_reference.py first")
        return None, None
    t0, c0 = time.perf_counter(), time.process_time()
    s = sample_energy(E, E.dim, iters=epochs * kw.get("iters_per_rollout", 20), progress=False, **kw)
    train, train_cpu = time.perf_counter() - t0, time.process_time() - c0   # CPU time: the machine may be shared
    n = 2000 if hasattr(E, "distances") else 4000      # the EGNN's rollouts dominate the cost for particles
    n = 500 if quick else n
    x = s.sample(n, seed=1)
    pw = s.log_Z(n, seed=2)
    ex, er = E(x.double()).numpy(), E(ref.double()).numpy()
    rec = {"energy": name, "network": s.config.network, "train_s": train, "train_cpu_s": train_cpu, "epochs": epochs,
           "n_eval": n,
           "load_average_1min_at_end": os.getloadavg()[0],
           "gradient_steps": s.config.iters, "energy_w1": w_1d(ex, er, 1),
           "energy_w2": w_1d(ex, er, 2), "energy_median_sample": float(np.median(ex)),
           "energy_median_ref": float(np.median(er)), "ess_fraction": pw.ess_fraction, "log_Z_est": pw.log_Z,
           "log_Z_true": E.log_Z}
    if E.log_Z is not None:
        rec["log_Z_err"] = abs(pw.log_Z - E.log_Z)
    if hasattr(E, "distances"):
        dx, dr = E.distances(x).flatten().numpy(), E.distances(ref).flatten().numpy()
        rec["distance_w1"] = w_1d(dx, dr, 1)
    else:
        dx = dr = None
        rec["w2"] = w2(x, ref)
    if name == "gmm40":
        counts = torch.bincount(torch.cdist(x.double(), E.means).argmin(1), minlength=len(E.means))
        rec["modes_with_20_samples"] = int((counts >= 20).sum())
    if name == "manywell":
        rec["frac_x1_positive"] = float((x[:, 0::2] > 0).double().mean())
        rec["frac_x1_positive_exact"] = float((ref[:, 0::2] > 0).double().mean())
    print(row, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    return rec, (x[:2000].numpy(), ref[:2000].numpy(), ex, er, dx, dr)


QUICK = "--quick" in sys.argv


def figure(samples):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [k for k in ("gmm40", "manywell", "dw4", "lj13") if k in samples]
    panels += [k + "_dist" for k in ("dw4", "lj13") if k in samples]
    fig, ax = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4))
    ax = np.atleast_1d(ax)
    for a, key in zip(ax, panels):
        row = key.removesuffix("_dist")
        x, ref, ex, er, dx, dr = samples[row]
        if key == "gmm40":
            a.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.3, label="exact")
            a.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, label="sampler")
        elif key.endswith("_dist"):
            bins = np.linspace(0, np.percentile(dr, 99.9) * 1.3, 80)
            a.hist(dr, bins, alpha=0.5, density=True, label="reference (MALA)")
            a.hist(np.clip(dx, bins[0], bins[-1]), bins, histtype="step", density=True, label="EGNN")
            if row + "_mlp" in samples:
                a.hist(np.clip(samples[row + "_mlp"][4], bins[0], bins[-1]), bins, histtype="step",
                       density=True, label="MLP")
            a.set_xlabel("interatomic distance")
        else:
            lo, hi = np.percentile(er, [0.5, 99.5])
            bins = np.linspace(lo - 0.2 * (hi - lo), hi + 0.8 * (hi - lo), 60)
            a.hist(er, bins, alpha=0.5, density=True, label="exact" if row == "manywell" else "reference (MALA)")
            a.hist(np.clip(ex, bins[0], bins[-1]), bins, histtype="step", density=True,
                   label="EGNN" if row + "_mlp" in SETTINGS else "sampler")
            if row + "_mlp" in samples:
                a.hist(np.clip(samples[row + "_mlp"][2], bins[0], bins[-1]), bins, histtype="step",
                       density=True, label="MLP")
            a.set_xlabel("energy")
        a.set_title(row + (" distances" if key.endswith("_dist") else ""))
        a.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, "energies_quick" if QUICK else "energies")


def main(quick=False, only=None):
    setup_torch()
    rows = list(SETTINGS) if only is None else only
    unknown = set(rows) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; valid: {list(SETTINGS)}")
    out, samples = {}, {}
    for row in rows:
        rec, smp = run(row, quick)
        if rec is not None:
            out[row], samples[row] = rec, smp
    name = "energies_quick" if quick else "energies"
    part = "" if only is None else "_part_" + "_".join(rows)
    np.savez_compressed(RESULTS / f"{name}_samples{part or '_all'}.npz",     # what --merge redraws the figure from
                        **{f"{r}__{i}": np.asarray(a, dtype=np.float32)
                           for r, s in samples.items() for i, a in enumerate(s) if a is not None})
    write_json(name + part, {"quick": quick, "settings": _settings(), "results": out})
    if only is None:
        figure(samples)


def _settings():
    return {row: {"energy": e, **kw, "epochs": ep, "epochs_quick": qe} for row, (e, kw, ep, qe) in SETTINGS.items()}


def merge(quick=False):
    """Combine the parts written by `--only` runs (run side by side) into one JSON and figure."""
    name = "energies_quick" if quick else "energies"
    out, samples = {}, {}
    for f in sorted(RESULTS.glob(f"{name}_part_*.json"), key=lambda f: f.stat().st_mtime):   # newest wins
        d = json.loads(f.read_text())
        out.update(d["results"])
        for row, rec in d["results"].items():
            rec.setdefault("environment", d["environment"])
    for f in sorted(RESULTS.glob(f"{name}_samples_part_*.npz"), key=lambda f: f.stat().st_mtime):
        z = np.load(f)
        for key in z.files:
            row, i = key.rsplit("__", 1)
            samples.setdefault(row, [None] * 6)[int(i)] = z[key]
    out = {row: out[row] for row in SETTINGS if row in out}
    write_json(name, {"quick": quick, "settings": _settings(), "results": out})
    figure({row: samples[row] for row in SETTINGS if row in samples})


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    if "--merge" in sys.argv:
        merge(quick)
    else:
        only = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")), None)
        main(quick=quick, only=only)
