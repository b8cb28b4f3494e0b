"""`tiltflow sample-energy`: a sampler for exp(−E) of a benchmark energy by Adjoint Sampling,
with log Z by the Crooks estimator, ESS and energies of its samples."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..methods.sample_energy import EnergyConfig, sample_energy
from ..metrics import energy_distance
from ..validation import positive_int
from .flags import add_config_flags, build, config_dict, merge, run_folder_flags, with_report_to
from .runs import EVAL_SEED_OFFSET, RUN_INFO, open_run_tracker, plots, print_config, track_results, writes


def cmd_sample_energy(args) -> int:
    from ..tasks.energies import SAMPLER_DEFAULTS, get_energy
    energy = get_energy(args.energy)
    given = {f.name: getattr(args, f.name) for f in fields(EnergyConfig)
             if hasattr(args, f.name) and getattr(args, f.name) is not None}
    cfg = config_dict(build(EnergyConfig, merge(EnergyConfig, SAMPLER_DEFAULTS[args.energy], given), given))
    for name in ("n_samples", "n_eval"):
        positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    progress = not args.no_progress
    if not progress:
        print_config("sample-energy", EnergyConfig(**cfg))
    t0 = time.perf_counter()
    with open_run_tracker(args.report_to, args.out, "sample_energy", cfg) as tracker:   # records, then results
        sampler = sample_energy(energy, energy.dim, out=args.out, resume=args.resume, progress=progress,
                                **with_report_to(sample_energy, tracker, cfg))
        train_s = time.perf_counter() - t0
        if not writes():   # under torchrun only rank 0 evaluates, writes and plots
            return 0
        out, seed = Path(args.out), cfg["seed"] + EVAL_SEED_OFFSET
        x = sampler.sample(args.n_samples, seed=seed).cpu()
        import numpy as np
        np.save(out / "samples.npy", x.numpy(), allow_pickle=False)
        pw = sampler.log_Z(args.n_eval, seed=seed + 1)
        with torch.no_grad():
            e = energy(x.double())
        metrics = {"energy": args.energy, "dim": energy.dim, "n_samples": args.n_samples,
                   "energy_mean": float(e.mean()), "energy_median": float(e.median()),
                   "crooks": pw.summary(), "log_Z": pw.log_Z, "ess_fraction": pw.ess_fraction,
                   "log_Z_exact": energy.log_Z, "train_s_this_call": train_s}
        if energy.log_Z is not None:
            metrics["log_Z_error"] = pw.log_Z - energy.log_Z
        y = None
        if hasattr(energy, "sample"):   # exact samples exist (gmm40, manywell)
            g = torch.Generator().manual_seed(seed)
            y, y2 = energy.sample(args.n_samples, g), energy.sample(args.n_samples, g)
            metrics["energy_distance_to_exact"] = energy_distance(x[:2000], y[:2000])
            metrics["energy_distance_noise_floor"] = energy_distance(y2[:2000], y[:2000])
        ckpt.write_json(out / "metrics.json", metrics)
        ckpt.write_json(out / RUN_INFO, {"command": "sample-energy", "energy": args.energy})
        written = ["model.safetensors", "samples.npy", "metrics.json", "log.jsonl"]
        plots_mod = plots() if energy.dim == 2 else None
        if plots_mod is not None:
            panels = {"sampler": x} if y is None else {"exact": y, "sampler": x}
            plots_mod.plot_samples(out / "samples.png", panels, title=f"{args.energy}: Adjoint Sampling",
                                   density=lambda z: -energy(z), density_label="−E")
            written.append("samples.png")
        track_results(tracker, out, ["samples.png"], {k: v for k, v in metrics.items() if k != "crooks"})
    print(f"log Z (Crooks, {args.n_eval} paths) {pw.log_Z:.4f}" +
          (f" (exact {energy.log_Z:.4f})" if energy.log_Z is not None else "") +
          f"; ESS {pw.ess:.0f} ({100 * pw.ess_fraction:.1f} %); median energy {metrics['energy_median']:.3f}")
    print(f"wrote {args.out}/: " + ", ".join(written))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("sample-energy", help="train a sampler for exp(−E) of gmm40, manywell, dw4, lj13 or lj55",
                       description="Train a sampler for exp(−E) by Adjoint Sampling with a replay buffer; writes a "
                                   "run folder with model.safetensors, samples.npy, metrics.json (log Z by the Crooks "
                                   "estimator, ESS, energies) and samples.png for 2-D energies. Unset flags take the "
                                   "energy's defaults (tasks/energies.py SAMPLER_DEFAULTS), then EnergyConfig's.")
    s.add_argument("--energy", required=True, help="one of: gmm40, manywell, dw4, lj13, lj55")
    add_config_flags(s, EnergyConfig, no_defaults=True)
    s.add_argument("--n-samples", type=int, default=2000, help="samples written to samples.npy (default: 2000)")
    s.add_argument("--n-eval", type=int, default=2000, help="paths of the log Z / ESS estimate (default: 2000)")
    run_folder_flags(s, "runs/energy")
    s.set_defaults(func=cmd_sample_energy)
