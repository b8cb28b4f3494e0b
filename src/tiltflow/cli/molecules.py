"""`tiltflow molecules`: conformers of one molecule. Pretrain an E(3)-equivariant EGNN flow on
ETKDG + MMFF94 conformers, fine-tune it toward −MMFF94 energy (expected or CVaR), write SDF."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from ..methods.finetune import finetune
from ..methods.pretrain import pretrain
from ..validation import in_interval, one_of, positive, positive_int
from .evaluation import print_eval_table
from .finetune import make_objective
from .flags import (add_config_flags, build, config_dict, config_from, positive_ints, resolve_deprecated,
                    run_folder_flags)
from .runs import EVAL_SEED_OFFSET, open_run_tracker, prepare_run, track_results, writes


@dataclass
class MoleculesConfig:
    """Conformers of one molecule: pretrain an EGNN on ETKDG + MMFF94 conformers, fine-tune it
    toward −MMFF94 energy (expected or CVaR), write SDF (saved as config.json in the folder)."""
    smiles: str = "CCO"                   # SMILES, or a .smi/.sdf/.mol file (its first molecule)
    n_conformers: int = 256               # ETKDG + MMFF94 conformers (the data), cached on disk
    reward: str = "mmff"                  # mmff: −MMFF94 energy (kcal/mol); rg: −radius of gyration (Å)
    objective: str = "cvar"               # expected or cvar
    level: float = 0.1                    # CVaR tail mass β
    tail: str = "left"                    # CVaR tail; left: lift the worst (highest-energy) conformers
    lam: float = 100.0                    # KL weight λ (in reward units: kcal/mol for mmff)
    pretrain_iters: int = 1000            # optimiser steps of the EGNN's flow-matching pretraining
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    hidden: tuple = (64, 64, 64, 64)      # EGNN: (width,) * layers
    iters: int = 40                       # Adjoint Matching iterations
    batch_size: int = 64                  # trajectories per fine-tuning iteration
    steps: int = 20                       # memoryless-SDE steps per trajectory
    lr: float = 2e-4                      # fine-tuning learning rate
    n_offline: int = 1024                 # base samples for the CVaR threshold (stage 1)
    n_samples: int = 100                  # samples of base and fine-tuned model written as SDF and evaluated
    sample_steps: int = 50                # Heun steps of the ODE samples
    seed: int = 0
    device: str = "auto"                  # auto: the GPU when there is one, else the CPU
    pretrain_steps: int | None = field(default=None, metadata={"deprecated": "pretrain_iters"})

    def __post_init__(self):
        resolve_deprecated(self)
        if not isinstance(self.smiles, str) or not self.smiles:
            raise ValueError(f"smiles must be a SMILES string or a .smi/.sdf/.mol file, got {self.smiles!r}")
        one_of(self.reward, "reward", ("mmff", "rg"))
        one_of(self.objective, "objective", ("expected", "cvar"))
        in_interval(self.level, "level", 0.0, 1.0)
        one_of(self.tail, "tail", ("left", "right"))
        positive(self.lam, "lam")
        for name in ("n_conformers", "pretrain_iters", "pretrain_batch_size", "iters", "batch_size", "steps",
                     "n_offline", "sample_steps"):
            positive_int(getattr(self, name), name)
        positive(self.pretrain_lr, "pretrain_lr")
        positive(self.lr, "lr")
        positive_ints(self.hidden, "hidden")
        positive_int(self.n_samples, "n_samples", minimum=2)      # diversity compares pairs
        positive_int(self.seed, "seed", minimum=0)


def cmd_molecules(args) -> int:
    from ..tasks import molecules      # RDKit is optional: imported only here

    cfg = build(MoleculesConfig, config_from(args, MoleculesConfig))
    out = Path(args.out)
    progress = not args.no_progress
    task = molecules.conformers(cfg.smiles, n=cfg.n_conformers, seed=cfg.seed)   # bad SMILES: ValueError
    reward = task.reward(cfg.reward)
    obj = make_objective(cfg.objective, reward, cfg.level, cfg.tail, 0.0)
    if writes():        # under torchrun only rank 0 prints, samples and writes
        print(f"tiltflow molecules: {cfg}")
        print(f"tiltflow molecules: {task}")
    prepare_run(out, config_dict(cfg), args.resume, resumable_keys=("pretrain_iters", "pretrain_steps", "iters"))
    t = time.perf_counter()
    base = pretrain(task.data, cfg.pretrain_iters, network="egnn", cond=task.graph, hidden=cfg.hidden,
                    batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr, seed=cfg.seed, device=cfg.device,
                    out=out / "pre", resume=args.resume, progress=progress,
                    report_to=args.report_to)
    timings = {"pretrain_s": time.perf_counter() - t}
    t = time.perf_counter()
    # init="copy": a residual MLP on top of the EGNN would break E(3) equivariance
    with open_run_tracker(args.report_to, out / "ft", "molecules", config_dict(cfg)) as tracker:   # records, results
        ft = finetune(base, obj, lam=cfg.lam, iters=cfg.iters, batch_size=cfg.batch_size, steps=cfg.steps,
                      lr=cfg.lr, init="copy", n_offline=cfg.n_offline, seed=cfg.seed, device=cfg.device,
                      out=out / "ft", resume=args.resume, progress=progress, report_to=tracker)
        timings["finetune_s"] = time.perf_counter() - t
        if not writes():
            return 0
        label = "finetuned"
        models, seed = {"data": task.evaluate(task.data[: cfg.n_samples])}, cfg.seed + EVAL_SEED_OFFSET
        written = []
        for name, model in (("base", base), (label, ft)):
            x = model.sample(cfg.n_samples, steps=cfg.sample_steps, seed=seed).cpu()
            drawn = float(task.handedness(x).double().mean()) if task.graph.chiral else None
            x = task.mirror_to_reference(x)     # a chiral molecule's wrong-handed draws, mirrored
            models[name] = {**task.evaluate(x), "handedness_share_drawn": drawn}
            written.append(task.write_sdf(x, out / f"{name}.sdf").name)
        ckpt.write_json(out / "summary.json", {"config": config_dict(cfg), "molecule": task.name,
                                               "atoms": task.n_atoms, "models": models, "timings": timings})
        track_results(tracker, out / "ft", [], models)
    print(f"\n{task.name}, {cfg.n_samples} ODE samples per model (energies in kcal/mol):")
    # the worst-10 % energy is minus the reward's left CVaR (reward = −E)
    rows = {name: {**st, "worst10_energy": -st["reward_cvar_left_0.1"]} for name, st in models.items()}
    print_eval_table(rows, [("energy_q50", "median E"), ("worst10_energy", "worst-10% E"), ("rate_valid", "valid"),
                            ("diversity_rmsd", "RMSD (Å)")])
    print(f"wrote {args.out}/: {', '.join(written)}, summary.json, pre/, ft/")
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("molecules", help="conformers of one molecule: pretrain an EGNN, fine-tune on MMFF94, write SDF",
                       description="Generate conformers of --smiles (ETKDG + MMFF94, cached), pretrain an "
                                   "E(3)-equivariant EGNN flow on them, fine-tune it toward −MMFF94 energy "
                                   "(default: left CVaR, the worst conformers), and write base.sdf, finetuned.sdf "
                                   "(energies, validity flags) and summary.json. Needs RDKit: "
                                   "pip install 'tiltflow[mol]'.")
    add_config_flags(s, MoleculesConfig)
    run_folder_flags(s, "runs/mol", "continue each stage from its newest checkpoint")
    s.set_defaults(func=cmd_molecules)
