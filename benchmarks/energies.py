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

Beside the published numbers (`PUBLISHED`, written into the JSON with their sources) each row also
gets `paper_metrics`, the tables' own metrics computed their way (tiltflow.energy_metrics): for DW-4
and LJ-13 Adjoint Sampling's Table 1 — geometric W2 (ground cost after the best permutation, then
the best orthogonal map) and E(·) W2 (√ of the 1-D W2² of the energies), 2000 samples against 2000
reference samples; for GMM-40 iDEM's x-W2 (exact OT on coordinates, 1000 against 1000 exact
samples, mean ± std over 2 sample batches × 5 reference batches). Each comes with a floor: the same
metric for a second reference batch in place of the samples, what an exact sampler scores at this
sample size. Our particle references are this repository's MALA runs, theirs Klein et al. 2023's
MCMC test sets, so the published and our numbers share a metric but not a reference set.

Figure results/energies.png: GMM-40 samples over exact ones; for the others the energy histograms
of sampler and reference (particles: EGNN and MLP), and the interatomic-distance histograms of
DW-4 and LJ-13. Writes results/energies.json.
`--quick`: a few rollouts each (a smoke test of the script, not a measurement; writes *_quick files).
`--only=ROW,...` runs some rows and writes results/energies_part_<rows>.json, so that rows can run
side by side; `--merge` then combines the parts with the rows already in results/energies.json
(parts win) into that file, results/energies_samples_all.npz and the figure.
`--metrics-only`: recompute `paper_metrics` (and the `published` block) from the saved samples
(results/energies_samples_all.npz) into results/energies.json without training (a few minutes).
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

from tiltflow.energy_metrics import geometric_w2, wasserstein_1d, wasserstein_2  # noqa: E402
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
    # LJ-13 tuning, one `--only=lj13` run each (energy median / reference −43.4, E(·) W2, ESS): s = 1, lr 1e-3 → 1e-4,
    # 250 rollouts: −28.2, 15.6, 0.26 %; s = 0.7: −29.2, 14.4, 0.33 %; s = 0.7, lr 3e-3 → 3e-4: −36.2, 7.3, 0.71 %;
    # s = 0.7, lr 1e-2 → 1e-3: −36.5, 13.0, 0.59 %; s = 0.7, lr 3e-3 → 3e-4, 400 rollouts (kept): −39.4, 4.5, 0.78 %.
    "lj13": ("lj13", dict(prior_scale=0.7, energy_grad_clip=100.0, samples_per_rollout=64, batch_size=128, lr=3e-3,
                          lr_final=3e-4, **EGNN), 400, 2),
    "lj13_mlp": ("lj13", dict(prior_scale=1.0, energy_grad_clip=100.0, iters_per_rollout=20, lr=1e-3), 600, 20),
}


def w_1d(a, b, p=1):
    """W_p between two 1-D samples by their quantile functions on 1999 levels."""
    q = np.linspace(0, 1, 2001)[1:-1]
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float((np.abs(np.quantile(a, q) - np.quantile(b, q)) ** p).mean() ** (1 / p))


def w1_1d(a, b):
    return w_1d(a, b, 1)


def reference(E, name, second=False):
    """4000 reference samples; `second`: 2000 others (exact: another seed; MALA: the first kept states
    of the same 200 chains, 6000 steps before the last 4000), the floor batch of `paper_metrics`."""
    if name in ("gmm40", "manywell"):
        return E.sample(2000 if second else 4000, torch.Generator().manual_seed(1 if second else 0))
    path = RESULTS / f"ref_{name}.safetensors"
    if not path.exists():
        return None
    x = load_file(path)["x"]
    return x[:2000] if second else x[-4000:]


# Published numbers in the metrics of `paper_metrics`, mean ± std over their seeds / batches.
_AS = "Havens et al. 2025, Adjoint Sampling (AS), ICML 2025, arXiv 2504.11713"
PUBLISHED = {
    "sources": {
        "AS_table1": {
            "paper": _AS, "table": "Table 1 (DW-4, LJ-13; its iDEM row was computed by the AS authors in the same metric)",
            "quoted_from": "Liu et al. 2025, Adjoint Schrodinger Bridge Sampler, arXiv 2506.22565v2, Table 2, whose App. "
                           "D.1.2 states that its PIS/DDS/iDEM/AS rows for DW-4, LJ-13, LJ-55 reuse AS Table 1 (the AS "
                           "PDF itself was not at hand when these were copied)",
            "protocol": "3 seeds; 2000 model vs 2000 reference samples; W2 with the ground cost min over permutations "
                        "and O(3) (ASBS App. D.1.3 eqs. 80-81); E(.) W2 = 1-D W2 of the energies",
            "reference_set": "MCMC test sets of Klein et al. 2023 (DEM's data/test_split_DW4.npy, test_split_LJ13-1000.npy)"},
        "course_correction": {
            "paper": "Aggarwal, Penaherrera, Shao, Jeon, Koes 2025, Models trained with unnormalized density functions: "
                     "a need for a course correction, ICLR 2025 blogpost track, "
                     "https://iclr-blogposts.github.io/2025/blog/ebm-vs-mcmc/",
            "table": "Table 1 (GMM)",
            "protocol": "iDEM trained with its official configs; x-W2 of 1000 samples vs the 1000-sample exact test set "
                        "(torch seed 0); mean ± std over 25 batches (5 runs x 5 batches); 'exact' = samples drawn from "
                        "the GMM itself",
            "note": "iDEM's own paper (Akhound-Sadegh et al. 2024, arXiv 2402.06121) reports GMM-40 x-W2 too; its table "
                    "was not retrievable here, so that number is not quoted"},
    },
    "dw4": {"AS": {"W2": 0.62, "W2_std": 0.06, "E_W2": 0.55, "E_W2_std": 0.12, "source": "AS_table1"},
            "iDEM": {"W2": 0.70, "W2_std": 0.06, "E_W2": 0.55, "E_W2_std": 0.14, "source": "AS_table1"}},
    "lj13": {"AS": {"W2": 1.67, "W2_std": 0.01, "E_W2": 2.40, "E_W2_std": 1.25, "source": "AS_table1"},
             "iDEM": {"W2": 1.61, "W2_std": 0.01, "E_W2": 30.78, "E_W2_std": 24.46, "source": "AS_table1"}},
    "gmm40": {"iDEM": {"x_W2": 7.698, "x_W2_std": 1.442, "source": "course_correction"},
              "exact": {"x_W2": 4.159, "x_W2_std": 0.604, "source": "course_correction"}},
}


def paper_metrics(E, name, x):
    """The metrics of `PUBLISHED` for samples x: (n >= 2000, dim), computed the papers' way against this
    benchmark's reference, each with its floor (a second reference batch in place of x); None for many-well."""
    if name == "gmm40":        # iDEM: eval batches of 1000 against a 1000-sample exact test set
        b = min(1000, len(x) // 2)                      # --quick draws fewer
        refs = [E.sample(b, torch.Generator().manual_seed(10 + r)) for r in range(5)]

        def batches(ys):
            v = [wasserstein_2(y, r) for y in ys for r in refs]
            return float(np.mean(v)), float(np.std(v, ddof=1))
        (m, s), (fm, fs) = batches([x[:b], x[b:2 * b]]), batches(reference(E, name, second=True)[:2 * b].split(b))
        return {"x_W2": m, "x_W2_std": s, "floor_x_W2": fm, "floor_x_W2_std": fs, "n": b, "batch_pairs": 10}
    if not hasattr(E, "distances"):
        return None
    ref, other = reference(E, name)[:2000], reference(E, name, second=True)
    k, d, x = E.n_particles, E.spatial_dim, x[:2000]
    e = lambda t: E(t.double())   # noqa: E731
    return {"W2": geometric_w2(x, ref, k, d), "E_W2": wasserstein_1d(e(x), e(ref)),
            "floor_W2": geometric_w2(other, ref, k, d), "floor_E_W2": wasserstein_1d(e(other), e(ref)), "n": len(x)}


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
        rec["w2"] = wasserstein_2(x[:2000], ref[:2000])      # exact OT on 2000 points
    if name == "gmm40":
        counts = torch.bincount(torch.cdist(x.double(), E.means).argmin(1), minlength=len(E.means))
        rec["modes_with_20_samples"] = int((counts >= 20).sum())
    if name == "manywell":
        rec["frac_x1_positive"] = float((x[:, 0::2] > 0).double().mean())
        rec["frac_x1_positive_exact"] = float((ref[:, 0::2] > 0).double().mean())
    rec["paper_metrics"] = paper_metrics(E, name, x)
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
    _save_samples(RESULTS / f"{name}_samples{part or '_all'}.npz", samples)   # what --merge and --metrics-only read
    write_json(name + part, {"quick": quick, "settings": _settings(), "published": PUBLISHED, "results": out})
    if only is None:
        figure(samples)


def _settings():
    return {row: {"energy": e, **kw, "epochs": ep, "epochs_quick": qe} for row, (e, kw, ep, qe) in SETTINGS.items()}


def _save_samples(path, samples):
    np.savez_compressed(path, **{f"{r}__{i}": np.asarray(a, dtype=np.float32)
                                 for r, smp in samples.items() for i, a in enumerate(smp) if a is not None})


def _load_samples(path, samples):
    z = np.load(path)
    for key in z.files:
        row, i = key.rsplit("__", 1)
        samples.setdefault(row, [None] * 6)[int(i)] = z[key]


def merge(quick=False):
    """Combine the parts written by `--only` runs (run side by side) with the rows already in
    results/energies.json and its samples (a part wins over them) into one JSON, samples file and figure."""
    name = "energies_quick" if quick else "energies"
    out, samples = {}, {}
    if (RESULTS / f"{name}.json").exists():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        for row, rec in old["results"].items():
            out[row] = {**rec, "environment": rec.get("environment", old["environment"])}
    if (RESULTS / f"{name}_samples_all.npz").exists():
        _load_samples(RESULTS / f"{name}_samples_all.npz", samples)
    for f in sorted(RESULTS.glob(f"{name}_part_*.json"), key=lambda f: f.stat().st_mtime):   # newest wins
        d = json.loads(f.read_text())
        out.update(d["results"])
        for row, rec in d["results"].items():
            rec.setdefault("environment", d["environment"])
    for f in sorted(RESULTS.glob(f"{name}_samples_part_*.npz"), key=lambda f: f.stat().st_mtime):
        _load_samples(f, samples)
    out = {row: out[row] for row in SETTINGS if row in out}
    samples = {row: samples[row] for row in SETTINGS if row in samples}
    _save_samples(RESULTS / f"{name}_samples_all.npz", samples)
    write_json(name, {"quick": quick, "settings": _settings(), "published": PUBLISHED, "results": out})
    figure(samples)


def metrics_only(quick=False):
    """Recompute every row's `paper_metrics` from the saved samples, and the `published` block, in place:
    the rest of results/energies.json (training settings, environment) stays as the training run wrote it."""
    setup_torch()
    name = "energies_quick" if quick else "energies"
    path = RESULTS / f"{name}.json"
    data, z = json.loads(path.read_text()), np.load(RESULTS / f"{name}_samples_all.npz")
    for row, rec in data["results"].items():
        t0 = time.perf_counter()
        rec["paper_metrics"] = paper_metrics(get_energy(rec["energy"]), rec["energy"], torch.from_numpy(z[f"{row}__0"]))
        print(row, rec["paper_metrics"], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    data["published"] = PUBLISHED
    data["paper_metrics_date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    if "--merge" in sys.argv:
        merge(quick)
    elif "--metrics-only" in sys.argv:
        metrics_only(quick)
    else:
        only = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")), None)
        main(quick=quick, only=only)
