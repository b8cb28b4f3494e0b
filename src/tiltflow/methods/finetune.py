"""finetune: one exponential tilt p* ∝ p_base · exp(g/λ) of a FlowModel by Adjoint Matching.

The objective decides g: ExpectedReward hands over r itself; CVaR solves its 1-D threshold
problem on an offline batch of base samples first (TFFT stage 1) and hands over the hinge
pseudo-reward. The loop owns rollouts, the lean adjoint, the optimiser, diagnostics, checkpoints
and the progress bar; the mathematics lives in solvers/adjoint_matching.py.

Data parallel (torchrun / accelerate launch, see distributed.py): the global batch `batch_size`
is cut into world_size × grad_accum micro-batches, each simulated with its own seeded stream;
every process rolls out and integrates the lean adjoint of its own micro-batches, gradients are
averaged over processes before clipping, and stage 1 sees the offline samples of all processes.
Only rank 0 writes the run folder and shows the progress bar.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..metrics import mean_pairwise_distance, reward_summary
from ..models.flow_model import FlowModel, ResidualVelocity
from ..models.mlp import MLPVelocity
from ..objectives import ExpectedReward
from ..solvers import adjoint_matching as am
from ..solvers import get_solver
from .. import integrators


@dataclass
class FinetuneConfig:
    """Settings of one Adjoint Matching run (printed and saved in the run folder)."""
    lam: float = 1.0                 # KL weight λ: p* ∝ p_base exp(g/λ)
    iters: int = 500                 # optimiser steps (one fresh rollout batch each)
    batch_size: int = 256            # trajectories per iteration, over all processes (the global batch)
    grad_accum: int = 1              # micro-batches per process and iteration (gradient accumulation)
    steps: int = 50                  # memoryless-SDE steps of each rollout (uniform grid on [0, 1])
    lr: float = 1e-3                 # Adam learning rate
    lr_final: float | None = None    # cosine decay of the learning rate to this value at `iters` (None: constant)
    n_loss_times: int | None = None  # times per trajectory in the loss (None: every interior time)
    grad_clip: float = 1.0           # clip the global gradient norm (AM paper uses clipping too)
    init: str = "auto"               # "copy": train a copy of the base net; "residual": base + zero-init MLP; "auto": residual for vectors
    residual_hidden: tuple = (128, 128)
    scheme: str = "exponential"            # rollout and adjoint step (integrators.memoryless_step)
    solver: str = "adjoint_matching" # loss: adjoint_matching, adjoint_sampling, *_score_matching, cmcd (solvers/)
    solver_options: dict = field(default_factory=dict)  # keyword arguments of the solver (e.g. {"weights": False})
    n_offline: int = 4096            # base samples for the objective's stage 1 (CVaR threshold)
    checkpoint_every: int = 100
    max_nonfinite: int = 5           # stop after this many optimiser steps in a row skipped for a NaN/inf loss or gradient
    seed: int = 0
    device: str = "cpu"


def _validate(cfg: FinetuneConfig):
    if not (isinstance(cfg.lam, (int, float)) and cfg.lam > 0 and cfg.lam == cfg.lam and cfg.lam != float("inf")):
        raise ValueError(f"lam must be a positive finite number, got {cfg.lam!r}")
    for name in ("iters", "batch_size", "steps", "n_offline", "grad_accum", "checkpoint_every", "max_nonfinite"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if cfg.steps < 2:
        raise ValueError(f"steps must be at least 2 (the loss uses interior times), got {cfg.steps}")
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not 0 < cfg.lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {cfg.lr!r}")
    if cfg.lr_final is not None and not 0 <= cfg.lr_final <= cfg.lr:
        raise ValueError(f"lr_final must be in [0, lr] or None, got {cfg.lr_final}")
    from ..solvers import SOLVERS
    if cfg.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {cfg.solver!r}")
    if cfg.init not in ("auto", "copy", "residual"):
        raise ValueError(f"init must be 'auto', 'copy' or 'residual', got {cfg.init!r}")


def make_finetune_model(base: FlowModel, init: str = "auto", residual_hidden=(128, 128), seed: int = 0) -> FlowModel:
    """The model to train: a copy of the base, or base (frozen) + zero-initialised residual MLP.

    Both start exactly equal to the base. "auto" picks "residual" for vector data (the 2-D and
    small MLP bases: the residual starts at exactly zero, and closed-form bases have no weights
    to copy) and "copy" otherwise (images, particles: the paper fine-tunes all weights).
    """
    net = base.copy().net
    if init == "auto":
        init = "residual" if len(base.shape) == 1 else "copy"
    if init == "residual":
        if len(base.shape) != 1:
            raise ValueError("init='residual' builds an MLP and needs vector data; use init='copy'")
        with torch.random.fork_rng(devices=[]):  # the residual's init depends on `seed` only
            torch.manual_seed(seed)
            res = MLPVelocity(base.shape[0], tuple(residual_hidden), zero_init=True)
        net = ResidualVelocity(net, res)
    else:
        net.requires_grad_(True)
    return FlowModel(net, base.path, base.shape).to(base.device)


def finetune(model: FlowModel, objective, lam: float = 1.0, iters: int = 500, *, out=None,
             resume: bool = False, progress: bool = True, trainable: Callable | None = None,
             cond=None, callback: Callable | None = None, **kwargs) -> FlowModel:
    """Fine-tune `model` toward p* ∝ p_model · exp(g/λ); returns a new FlowModel (base untouched).

    objective: an objective (ExpectedReward, CVaR, ...) or a plain reward callable r(x, cond) -> (batch,).
    out: run folder (config.json, log.jsonl, metrics.json, model.safetensors, checkpoints/);
    resume: continue from the newest valid checkpoint in `out`.
    trainable: optional filter (name, parameter) -> bool choosing which parameters train.
    kwargs: any FinetuneConfig field (batch_size, steps, lr, n_loss_times, seed, device, ...).
    callback(iteration, record) is called after each logged iteration.
    """
    if not isinstance(model, FlowModel):
        raise ValueError(f"model must be a tiltflow FlowModel, got {type(model).__name__}")
    unknown = set(kwargs) - set(FinetuneConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown finetune options {sorted(unknown)}; valid: {sorted(FinetuneConfig.__dataclass_fields__)}")
    cfg = FinetuneConfig(lam=lam, iters=iters, **kwargs)
    _validate(cfg)
    if not hasattr(objective, "pseudo_reward"):
        if not callable(objective):
            raise ValueError(f"objective must be an objective or a reward callable, got {objective!r}")
        objective = ExpectedReward(objective)
    world, rank = dist.setup()
    main = rank == 0
    shards = world * cfg.grad_accum
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size must be divisible by processes × grad_accum = {world} × {cfg.grad_accum}, "
                         f"got {cfg.batch_size}; it is the global batch, split into equal micro-batches")
    micro = cfg.batch_size // shards
    device = dist.device(cfg.device)
    base = model.copy().to(device).eval()
    base.requires_grad_(False)
    ft = make_finetune_model(base, cfg.init, cfg.residual_hidden, cfg.seed)
    dist.broadcast_module(ft)
    params = [p for n, p in ft.named_parameters() if p.requires_grad and (trainable is None or trainable(n, p))]
    if not params:
        raise ValueError("no trainable parameters (check `trainable` and `init`)")
    opt = torch.optim.Adam(params, lr=cfg.lr)
    solver = get_solver(cfg.solver, **cfg.solver_options)
    if solver is not None:
        solver.check_base(base)
    # One stream per micro-batch (shard); this process owns shards rank·grad_accum, ...
    mine = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)
    gens = {i: torch.Generator(device=device).manual_seed(dist.shard_seed(cfg.seed, i)) for i in mine}
    gen_names = {i: "train" if i == 0 else f"train_{i}" for i in mine}
    grid = integrators.time_grid(cfg.steps, device=device)

    # Stage 1 of the objective (e.g. the CVaR threshold) on an offline batch of base samples,
    # drawn shard by shard and gathered, so every process solves it on the same n_offline samples.
    t_stage1 = time.perf_counter()
    x_off = None
    if getattr(objective, "needs_offline", True):
        sizes = dist.shard_sizes(cfg.n_offline, shards)
        x_off = torch.cat([base.sample(sizes[i], steps=cfg.steps, sde=True, cond=cond, generator=gens[i])
                           for i in mine if sizes[i] > 0])
        x_off = dist.all_gather(x_off)
    reward = objective.pseudo_reward(x_off, cfg.lam, cond)
    t_stage1 = time.perf_counter() - t_stage1
    raw_reward = getattr(objective, "reward", reward)
    stage1 = getattr(objective, "solution", None)

    run = None
    start, nonfinite_total = 0, 0
    config_record = {**asdict(cfg), "objective": repr(objective), "base": base.config(),
                     "base_weights": ckpt.fingerprint(base), "shards": shards}
    resumable = ("iters", "steps", "grad_accum")
    chash = ckpt.config_hash(config_record, resumable)
    if out is not None:
        run = Path(out)
        if main:
            ckpt.prepare_run(out, config_record, resume, resumable_keys=resumable)
            if stage1 is not None:
                ckpt.write_json(run / "stage1.json", asdict(stage1) if hasattr(stage1, "__dataclass_fields__") else stage1)
        if resume:
            meta = ckpt.load_latest(run, {"model": ft}, opt, {gen_names[i]: gens[i] for i in mine},
                                    warn=print if main else (lambda msg: None), config_hash=chash)
            if meta is not None:
                start = meta["step"]
                nonfinite_total = meta.get("extra", {}).get("nonfinite_total", 0)
            if main:
                ckpt.truncate_jsonl(run / "log.jsonl", "iter", start)
        elif main and (run / "log.jsonl").exists():
            (run / "log.jsonl").unlink()
    progress = progress and main
    if progress:
        print(f"tiltflow finetune: {config_record['objective']}  " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items())
              + (f"  processes={world} (micro-batch {micro})" if world > 1 else ""))

    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not progress,
               desc="finetune", dynamic_ncols=True)
    record = {}
    nonfinite_run = 0
    for it in bar:
        t0 = time.perf_counter()
        if cfg.lr_final is not None:  # cosine, a function of the iteration only (resume-safe)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * it / cfg.iters))
        opt.zero_grad(set_to_none=True)
        losses, kls, x1s, gs = [], [], [], []
        t_roll = t_adj = 0.0
        for i in mine:
            gen = gens[i]
            ft.eval()
            ta = time.perf_counter()
            if solver is None:
                ro = am.rollout(ft, micro, grid, gen, cond, cfg.scheme)
                tb = time.perf_counter()
                a1, g_val = am.terminal_adjoint(reward, ro.xs[-1], cfg.lam, cond)
                adj = am.lean_adjoint(base, ro, a1, cfg.scheme)
                tc = time.perf_counter()
                idx, w = am.loss_times(cfg.steps, cfg.n_loss_times, gen)
                ft.train()
                loss, kl = am.adjoint_matching_loss(ft, base, ro, adj, idx, w)
                x1 = ro.xs[-1]
            else:  # the other losses: one batch of end points (or paths), then their regression
                batch = solver.batch(ft, base, reward, cfg.lam, micro, grid, gen, cond)
                tb = tc = time.perf_counter()
                ft.train()
                loss, kl = solver.loss(ft, base, batch, cfg.n_loss_times, gen, cond)
                x1, g_val = batch.x1, batch.r
            # mean over micro-batches; the average over processes follows in average_gradients
            (loss / cfg.grad_accum).backward()
            t_roll, t_adj = t_roll + (tb - ta), t_adj + (tc - tb)
            losses.append(float(loss.detach()))
            kls.append(kl)
            x1s.append(x1)
            gs.append(g_val)
        t2 = time.perf_counter()
        dist.average_gradients(params)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        local = {"loss": sum(losses) / len(losses), "kl": sum(kls) / len(kls)}
        x1 = torch.cat(x1s)
        with torch.no_grad():
            g_all = torch.cat(gs)
            r = raw_reward(x1, cond) if raw_reward is not reward else g_all
        local["diversity"] = mean_pairwise_distance(x1[:256])
        reduced = dist.mean(local)
        if not (math.isfinite(reduced["loss"]) and math.isfinite(gnorm)):
            # skipped on every process alike: the loss mean and the averaged gradient are shared
            nonfinite_run += 1
            nonfinite_total += 1
            if nonfinite_run >= cfg.max_nonfinite:
                raise FloatingPointError(
                    f"{nonfinite_run} iterations in a row (up to {it + 1}) had a NaN or inf loss or gradient "
                    "and were skipped; no weights were changed by them. Lower lr, scale the reward, or "
                    "check the base model")
        else:
            nonfinite_run = 0
            opt.step()
        t3 = time.perf_counter()

        rg = dist.all_gather(torch.stack([r.float().reshape(-1), g_all.float().reshape(-1)], 1))
        record = {"iter": it + 1, "loss": reduced["loss"], "grad_norm": gnorm, "kl": reduced["kl"],
                  **{f"reward_{k}": v for k, v in reward_summary(rg[:, 0]).items()},
                  "pseudo_reward_mean": float(rg[:, 1].mean()),
                  **({"eta": float(reward.eta)} if hasattr(reward, "eta") else {}),
                  "diversity": reduced["diversity"], "nonfinite_skipped": nonfinite_total,
                  "time_rollout": t_roll, "time_adjoint": t_adj, "time_loss": t3 - t0 - t_roll - t_adj}
        bar.set_postfix(loss=f"{record['loss']:.3g}", r=f"{record['reward_mean']:.3g}", kl=f"{record['kl']:.3g}")
        if run is not None:
            if main:
                ckpt.append_jsonl(run / "log.jsonl", record)
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iters:
                states = dist.gather_generator_states(gens)          # collective: every process
                if main:
                    ckpt.save_checkpoint(run, it + 1, {"model": ft}, opt,
                                         {("train" if i == 0 else f"train_{i}"): s for i, s in states.items()},
                                         extra={"shards": shards, "nonfinite_total": nonfinite_total},
                                         config_hash=chash)
        if callback is not None:
            callback(it + 1, record)
    ft.eval()
    ft.requires_grad_(False)
    if run is not None and main:
        ft.save(run / "model.safetensors")
        ckpt.write_json(run / "metrics.json", {
            "final": record, "time_stage1": t_stage1,
            "stage1": asdict(stage1) if stage1 is not None and hasattr(stage1, "__dataclass_fields__") else None})
    dist.barrier()   # the run folder is complete before any process returns
    return ft
