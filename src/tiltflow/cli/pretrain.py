"""`tiltflow pretrain`: fit a flow model to a 2-D task by flow matching."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..methods.pretrain import PretrainConfig, pretrain
from ..models.flow_model import FlowModel
from ..tasks import toy2d
from .flags import add_config_flags, build, config_dict, config_from, run_folder_flags, with_report_to
from .runs import EVAL_SEED_OFFSET, RUN_INFO, open_run_tracker, plots, print_config, track_results, writes


def run_pretrain(task_name: str, out, cfg: dict, resume: bool, progress: bool, report_to: str = "none") -> FlowModel:
    """Pretrain on the toy2d task `task_name` with PretrainConfig fields `cfg`; rank 0 also writes
    cli.json and samples.png."""
    task = toy2d.get_task(task_name)
    if not progress:
        print_config("pretrain", PretrainConfig(**cfg))
    with open_run_tracker(report_to, out, "pretrain", cfg) as tracker:     # the run's records, then its figure
        model = pretrain(task, out=out, resume=resume, progress=progress, **with_report_to(pretrain, tracker, cfg))
        if not writes():
            return model
        out = Path(out)
        ckpt.write_json(out / RUN_INFO, {"command": "pretrain", "task": task_name})
        plots_mod = plots()
        if plots_mod is not None:
            g = torch.Generator().manual_seed(cfg["seed"] + EVAL_SEED_OFFSET)
            plots_mod.plot_samples(out / "samples.png",
                                   {"data": task.sample(2000, generator=g),
                                    "model": model.sample(2000, steps=50, seed=cfg["seed"] + EVAL_SEED_OFFSET)},
                                   title=f"pretrained on {task_name}")
        track_results(tracker, out, ["samples.png"])
    return model


def cmd_pretrain(args) -> int:
    cfg = config_dict(build(PretrainConfig, config_from(args, PretrainConfig)))
    run_pretrain(args.task, args.out, cfg, args.resume, not args.no_progress, args.report_to)
    if writes():
        print(f"wrote {args.out}/: model.safetensors, metrics.json, log.jsonl, samples.png")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("pretrain", help="fit a flow model to a 2-D task by flow matching",
                       description="Fit a flow model to a 2-D task; writes a run folder and samples.png.")
    s.add_argument("--task", default="mixture", help=f"one of: {', '.join(toy2d.TASKS)} (default: mixture)")
    add_config_flags(s, PretrainConfig)
    run_folder_flags(s, "runs/pre")
    s.set_defaults(func=cmd_pretrain)
