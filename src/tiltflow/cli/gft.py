"""`tiltflow gft`: Gradual Fine-Tuning of a run's model toward target samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..methods import gft as gft_mod
from ..methods.gft import GFTConfig, gradual_finetune
from .flags import add_config_flags, base_run_flag, build, config_dict, config_from, run_folder_flags, with_report_to
from .runs import (EVAL_SEED_OFFSET, RUN_INFO, load_model, open_run_tracker, plots, print_config, run_info,
                   track_results, writes)


def load_samples(path) -> torch.Tensor:
    """Samples (n, d) from a .npy file or a .safetensors file (key "samples", or its only tensor)."""
    path = Path(path)
    if path.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"--target must be a .npy or .safetensors file (no pickle formats), got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no target file {str(path)!r}")
    if path.suffix == ".npy":
        import numpy as np
        return torch.as_tensor(np.load(path, allow_pickle=False))
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    if "samples" in tensors:
        return tensors["samples"]
    if len(tensors) != 1:
        raise ValueError(f"{path} holds tensors {sorted(tensors)}; name the samples 'samples'")
    return next(iter(tensors.values()))


def schedule(text: str):
    """A schedule name, or comma-separated temperatures such as 1,0.1,0."""
    if text in gft_mod.SCHEDULES:
        return text
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--schedule must be one of {', '.join(gft_mod.SCHEDULES)} or comma-separated "
                         f"temperatures like 1,0.1,0; got {text!r}") from None


def cmd_gft(args) -> int:
    values = config_from(args, GFTConfig)
    values["schedule"] = schedule(values["schedule"])
    cfg = config_dict(build(GFTConfig, values))
    base = load_model(args.run, cfg["device"])
    target = load_samples(args.target)
    progress = not args.no_progress
    if not progress:
        print_config("gft", GFTConfig(**cfg))
    with open_run_tracker(args.report_to, args.out, "gft", cfg) as tracker:     # the run's records, then its figure
        ft = gradual_finetune(base, target, out=args.out, progress=progress, resume=args.resume,
                              **with_report_to(gradual_finetune, tracker, cfg))
        if not writes():
            return 0
        out = Path(args.out)
        ckpt.write_json(out / RUN_INFO, {"command": "gft", "base_run": str(args.run), "target": str(args.target),
                                         "task": run_info(args.run).get("task")})
        metrics = json.loads((out / "metrics.json").read_text())
        plots_mod = plots()
        if plots_mod is not None and len(ft.shape) == 1 and ft.shape[0] == 2:
            seed = cfg["seed"] + EVAL_SEED_OFFSET
            sde = cfg["flow"] == "stochastic"
            plots_mod.plot_samples(out / "samples.png",
                                   {"pretrained": base.sample(2000, steps=50, sde=sde, seed=seed),
                                    "target samples": target[:2000].float(),
                                    "GFT": ft.sample(2000, steps=50, sde=sde, seed=seed)},
                                   title=f"gradual fine-tuning ({cfg['variant']}, {cfg['coupling']} coupling)")
        track_results(tracker, args.out, ["samples.png"],
                      {k: v for k, v in metrics.items() if k.startswith(("energy_distance", "straightness"))})
    print(f"energy distance to the target samples: GFT {metrics['energy_distance']:.4f}, "
          f"pretrained {metrics['energy_distance_pretrained']:.4f}; straightness {metrics['straightness']:.4f}")
    print(f"wrote {args.out}/: model.safetensors, metrics.json, log.jsonl" + (", samples.png" if plots_mod else ""))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("gft", help="gradual fine-tuning of a run's model toward target samples",
                       description="Adapt the model of --run to the samples in --target by Gradual Fine-Tuning "
                                   "(a cooling schedule of objectives from the pretrained to the target velocity); "
                                   "writes a run folder with metrics.json and samples.png.")
    base_run_flag(s)
    s.add_argument("--target", required=True, help="target samples (n, d): .npy or .safetensors")
    add_config_flags(s, GFTConfig, skip=("schedule",))
    s.add_argument("--schedule", default="geometric",
                   help="geometric, linear, cosine, or comma-separated temperatures such as 1,0.1,0 "
                        "(0 alone: standard fine-tuning) (default: geometric)")
    run_folder_flags(s, "runs/gft")
    s.set_defaults(func=cmd_gft)
