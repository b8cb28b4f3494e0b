"""`tiltflow design`: de novo small molecules. Pretrain an SE(3)-equivariant flow over atom types and
coordinates on RDKit's NCI molecules (or load a base), fine-tune it toward a property (expected
reward or CVaR), evaluate both with RDKit and write SDF files and drawings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt
from ..methods.finetune import finetune
from ..models.flow_model import FlowModel
from ..validation import in_interval, one_of, positive, positive_int
from .evaluation import print_eval_table
from .finetune import make_objective
from .flags import add_config_flags, build, config_dict, config_from, run_folder_flags
from .runs import EVAL_SEED_OFFSET, open_run_tracker, prepare_run, track_results, writes


@dataclass
class DesignConfig:
    """De novo design: pretrain (or load) a molecule flow, fine-tune it toward a property, compare
    (saved as config.json in the folder)."""
    base: str = ""                        # a base model file (.safetensors) to fine-tune; "": pretrain one here
    pretrain_iters: int = 40000           # optimiser steps of the base's flow matching (when base is ""; ~40 min on one CPU thread)
    hidden: int = 64                      # SE3Velocity width
    layers: int = 4                       # SE3Velocity layers
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    pretrain_coupling: str = "equivariant"   # "equivariant": noise aligned to each molecule (node permutation, proper rotation), or "independent"
    reward: str = "dipole"                # dipole: a learned Gasteiger dipole (e·Å); mmff: −MMFF94 energy / 100
    predictor_iters: int = 2000           # optimiser steps of each of the dipole predictor's 4 seeds (trained once, cached)
    objective: str = "cvar"               # expected or cvar
    level: float = 0.1                    # CVaR tail mass β
    tail: str = "right"                   # CVaR tail; right: seek the highest property values
    lam: float = 0.3                      # KL weight λ (in reward units)
    iters: int = 30                       # Adjoint Matching iterations
    batch_size: int = 16                  # trajectories per fine-tuning iteration
    steps: int = 10                       # memoryless-SDE steps per trajectory
    n_loss_times: int = 4                 # loss times per trajectory
    lr: float = 2e-4                      # fine-tuning learning rate
    n_offline: int = 256                  # base samples for the CVaR threshold (stage 1)
    n_samples: int = 256                  # ODE samples of each model, evaluated and written as SDF
    sample_steps: int = 50                # Heun steps of those samples
    seed: int = 0
    device: str = "auto"                  # auto: the GPU when there is one, else the CPU

    def __post_init__(self):
        one_of(self.reward, "reward", ("dipole", "mmff"))
        one_of(self.pretrain_coupling, "pretrain_coupling", ("independent", "equivariant"))
        one_of(self.objective, "objective", ("expected", "cvar"))
        in_interval(self.level, "level", 0.0, 1.0)
        one_of(self.tail, "tail", ("left", "right"))
        positive(self.lam, "lam")
        for name in ("pretrain_iters", "hidden", "layers", "pretrain_batch_size", "predictor_iters", "iters",
                     "batch_size", "n_offline", "n_samples", "sample_steps", "n_loss_times"):
            positive_int(getattr(self, name), name)
        positive_int(self.steps, "steps", minimum=2)
        positive(self.pretrain_lr, "pretrain_lr")
        positive(self.lr, "lr")
        positive_int(self.seed, "seed", minimum=0)
        if self.base and not Path(self.base).is_file():
            raise ValueError(f"base must be a model file (model.safetensors of a run), got {self.base!r}: not found")


def cmd_design(args) -> int:
    from ..tasks import design, design_rewards as dr      # RDKit is optional: imported only here

    cfg = build(DesignConfig, config_from(args, DesignConfig))
    out = Path(args.out)
    progress = not args.no_progress
    data = design.load_dataset()
    if writes():
        print(f"tiltflow design: {cfg}\ntiltflow design: {data}")
    prepare_run(out, config_dict(cfg), args.resume, resumable_keys=("pretrain_iters", "iters"))
    t = time.perf_counter()
    if cfg.base:
        base = FlowModel.load(cfg.base)
    else:
        base = design.pretrain(cfg.pretrain_iters, data=data, hidden=cfg.hidden, layers=cfg.layers,
                               batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr, seed=cfg.seed,
                               coupling=cfg.pretrain_coupling,
                               device=cfg.device, out=out / "pre", resume=args.resume, progress=progress,
                               report_to=args.report_to)
    timings = {"pretrain_s": time.perf_counter() - t}
    t = time.perf_counter()
    report = None
    if cfg.reward == "dipole":
        pred, report = dr.cached_predictor("dipole", data, iters=cfg.predictor_iters, seed=cfg.seed)
        reward = dr.PropertyReward(pred)
    else:
        reward = dr.EnergyReward(scale=100.0, clip=dr.INVALID_ENERGY)
    timings["reward_s"] = time.perf_counter() - t
    t = time.perf_counter()
    obj = make_objective(cfg.objective, reward, cfg.level, cfg.tail, 0.0)
    with open_run_tracker(args.report_to, out / "ft", "design", config_dict(cfg)) as tracker:   # records, results
        ft = finetune(base, obj, lam=cfg.lam, iters=cfg.iters, batch_size=cfg.batch_size, steps=cfg.steps,
                      n_loss_times=cfg.n_loss_times, lr=cfg.lr, n_offline=cfg.n_offline, seed=cfg.seed,
                      device=cfg.device, out=out / "ft", resume=args.resume, progress=progress,
                      report_to=tracker)
        timings["finetune_s"] = time.perf_counter() - t
        if not writes():
            return 0
        models, seed = {}, cfg.seed + EVAL_SEED_OFFSET
        for name, model in (("base", base), ("finetuned", ft)):
            x = design.sample(model, cfg.n_samples, steps=cfg.sample_steps, seed=seed)
            models[name] = design.evaluate(x, data.train_smiles)
            design.to_sdf(x, out / f"{name}.sdf")
            try:
                design.draw(x, out / f"{name}.png")
            except ValueError:      # no valid molecule to draw
                pass
        ckpt.write_json(out / "summary.json", {"config": config_dict(cfg), "predictor": report, "models": models,
                                               "timings": timings})
        track_results(tracker, out / "ft", [(out / f"{n}.png").resolve() for n in models], models)
    cols = [("validity", "valid"), ("uniqueness", "unique"), ("novelty", "novel"), ("atom_stability", "atom st."),
            ("dipole_mean", "dipole"), ("dipole_cvar_left", "CVaR₀.₁ left"), ("dipole_cvar_right", "CVaR₀.₁ right"),
            ("qed_mean", "QED")]
    print(f"\n{cfg.n_samples} ODE samples per model (dipole: RDKit Gasteiger, e·Å, over valid molecules):")
    print_eval_table(models, cols)
    print(f"wrote {args.out}/: base.sdf, finetuned.sdf, base.png, finetuned.png, summary.json, ft/"
          + ("" if cfg.base else ", pre/"))
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("design", help="de novo molecules: pretrain an SE(3) flow, fine-tune toward a property, write SDF",
                       description="Pretrain an SE(3)-equivariant flow over atom types and coordinates on RDKit's NCI "
                                   "molecules with ≤ 9 heavy atoms (about 40 min on one CPU thread; or fine-tune --base, e.g. the stored "
                                   "benchmarks/results/design_base.safetensors), fine-tune it toward a "
                                   "learned dipole or −MMFF94 energy (default: right CVaR), evaluate both with RDKit "
                                   "(validity, uniqueness, novelty, stability, property CVaRs) and write SDF, PNG and "
                                   "summary.json. Needs RDKit: pip install 'tiltflow[mol]'.")
    add_config_flags(s, DesignConfig)
    run_folder_flags(s, "runs/design", "continue each stage from its newest checkpoint")
    s.set_defaults(func=cmd_design)
