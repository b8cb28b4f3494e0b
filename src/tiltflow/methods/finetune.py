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

Many prompts (`prompts=[c_1, ..., c_P]`, e.g. the rows of encode_prompts): each micro-batch is
rolled out, rewarded and regressed under one prompt's condition. Micro-batch k of the run
(k = iteration · shards + shard, the same numbering on every process) takes prompt π_e(k mod P)
with e = k div P and π_e a permutation drawn from (seed, e) alone: every prompt once per epoch of
P micro-batches, in a shuffled order, a pure function of the iteration (so resume and data
parallel need no extra state and the micro-batch streams are untouched). Stage 1 draws the
offline samples across the prompts (n_offline split evenly over them) and by default solves ONE
threshold η* over the pooled rewards r(x, c) — the papers do not say how a multi-prompt η* is set.
CVaR(..., per_prompt=True) instead solves one η*_p per prompt on that prompt's own n_offline/P
offline samples (the same draws, grouped) and rolls out micro-batches of prompt p with g_{η*_p}:
the tail is then each prompt's own tail, not the pooled one (raise n_offline with the number of
prompts). Quantile tracking (CVaR(track=True)) follows the quantile of each micro-batch, i.e. of
one prompt.

Memory and speed. Peak memory follows the micro-batch batch_size / (processes · grad_accum), not
the global batch, and not n_offline: stage 1 draws and rewards the offline samples a micro-batch at
a time and keeps only their rewards (objectives taking `rewards=`, i.e. CVaR); each micro-batch is
rolled out (no graph), its lean adjoint integrated one VJP at a time, and its loss backpropagated
before the next one starts. Within a micro-batch the loss
evaluates the fine-tuned net on (loss times × micro-batch) rows at once; `loss_chunk` = k
backpropagates it k times at a time instead (gradients add up to the same value),
`gradient_checkpointing` recomputes a diffusers network's activations block by block in backward,
and `mixed_precision` ("bf16", "fp16") runs the model forward passes (rollout, adjoint VJPs, loss,
offline samples) under torch.autocast on the run's device, while the states, the lean adjoint ã,
the loss reduction, the gradients and Adam stay float32 (fp16 adds a GradScaler).

LoRA (`lora_rank=`, diffusers adapters): one copy of the network. The frozen base and the trained
model are new modules over the caller's own weight tensors (FlowModel.copy(share_weights=True); a
caller's model on another device is copied there once); the trained model alone gets a float32
peft LoRA (make_lora_model), so the base velocity is the network without the adapter and the
caller's model is left as it was (no LoRA, same flags). The returned model shares those frozen
tensors with the caller's: writing into one's weights in place changes the other's. Only the LoRA
trains and needs gradients, checkpoints hold only it (the rest is the base, fingerprinted in the
config), and the run folder gets lora.safetensors next to the full model.safetensors. The base of
every run is such a view of the caller's weights, not a copy.

Text encoders (a model from diffusers_adapter.from_diffusers with its pipeline's encoders): once
cond/prompts are encoded they move to the CPU for the run (SD3's T5-XXL off the accelerator; a new
prompt is still encoded on demand) and back when finetune returns.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint as ckpt
from .. import distributed as dist
from .. import integrators
from ..metrics import mean_pairwise_distance, reward_summary
from ..models.flow_model import FlowModel, ResidualVelocity
from ..models.mlp import MLPVelocity
from ..objectives import ExpectedReward, _call_reward, _rewards_of, tail_fraction
from ..solvers import adjoint_matching as am
from ..solvers import get_solver
from ..training import Trainer, cosine
from ..validation import one_of
from . import prompts as pr


@dataclass
class FinetuneConfig:
    """Settings of one Adjoint Matching run (printed and saved in the run folder)."""
    lam: float = 1.0                 # KL weight λ: p* ∝ p_base exp(g/λ)
    iters: int = 500                 # optimiser steps (one fresh rollout batch each)
    batch_size: int = 256            # trajectories per iteration, over all processes (the global batch)
    grad_accum: int = 1              # micro-batches per process and iteration (gradient accumulation)
    steps: int = 50                  # memoryless-SDE steps of each rollout (on the grid of `grid`)
    lr: float = 1e-3                 # Adam learning rate
    lr_final: float | None = None    # cosine decay of the learning rate to this value at `iters` (None: constant)
    n_loss_times: int | None = None  # times per trajectory in the loss (None: every interior time)
    grad_clip: float = 1.0           # clip the global gradient norm (AM paper uses clipping too)
    init: str = "auto"               # "copy": train a copy of the base net; "residual": base + zero-init MLP; "auto": residual for vectors
    residual_hidden: tuple = (128, 128)
    scheme: str = "exponential"      # rollout and adjoint step (integrators.memoryless_step): "exponential", or "heun" (2 network calls a step, second order: fewer steps)
    solver: str = "adjoint_matching" # loss: adjoint_matching, adjoint_sampling, *_score_matching, cmcd (solvers/)
    solver_options: dict = field(default_factory=dict)  # keyword arguments of the solver (e.g. {"weights": False})
    n_offline: int = 4096            # base samples for the objective's stage 1 (CVaR threshold)
    checkpoint_every: int = 100
    max_nonfinite: int = 5           # stop after this many optimiser steps in a row skipped for a NaN/inf loss or gradient
    seed: int = 0
    device: str = "auto"             # "auto": the model's accelerator, else the GPU if any, else the CPU (distributed.device)
    lora_rank: int | None = None     # diffusers adapters: train a LoRA of this rank only (None: per `init`)
    lora_alpha: float | None = None  # LoRA scale α (None: α = rank)
    lora_targets: tuple | None = None  # module names the LoRA wraps (None: the adapter's default, add_lora)
    loss_chunk: int | None = None    # loss times per backward pass (None: all at once); same gradient, less activation memory
    gradient_checkpointing: bool = False  # diffusers adapters: recompute the fine-tuned network's activations in backward
    mixed_precision: str = "no"      # "no", "bf16" or "fp16": torch.autocast on the model forward passes (fp16 adds a GradScaler)
    grid: str = "auto"               # time grid of rollouts and stage 1: "auto" the network's own (SD3: the scheduler's shifted grid), else uniform; "uniform"

    def __post_init__(self):
        _validate(self)

# run settings that are left out of config.json / the config hash while at their default, so
# runs made before they existed still resume
_OPTIONAL_KEYS = {"lora_rank": None, "lora_alpha": None, "lora_targets": None, "loss_chunk": None,
                  "gradient_checkpointing": False, "mixed_precision": "no", "grid": "auto"}
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    if cfg.lora_rank is not None:
        if isinstance(cfg.lora_rank, bool) or not isinstance(cfg.lora_rank, int) or cfg.lora_rank <= 0:
            raise ValueError(f"lora_rank must be a positive integer or None, got {cfg.lora_rank!r}")
        if cfg.init == "residual":
            raise ValueError("lora_rank trains a LoRA on a copy of the network; use init='copy' or 'auto'")
    elif cfg.lora_alpha is not None or cfg.lora_targets is not None:
        raise ValueError("lora_alpha and lora_targets need lora_rank")
    if cfg.lora_targets is not None and (isinstance(cfg.lora_targets, str) or not cfg.lora_targets):
        raise ValueError(f"lora_targets must be a non-empty list of module names, got {cfg.lora_targets!r}")
    if cfg.loss_chunk is not None:
        if isinstance(cfg.loss_chunk, bool) or not isinstance(cfg.loss_chunk, int) or cfg.loss_chunk <= 0:
            raise ValueError(f"loss_chunk must be a positive integer or None, got {cfg.loss_chunk!r}")
        if cfg.solver != "adjoint_matching":
            raise ValueError(f"loss_chunk applies to solver='adjoint_matching', not {cfg.solver!r}")
    if not isinstance(cfg.gradient_checkpointing, bool):
        raise ValueError(f"gradient_checkpointing must be True or False, got {cfg.gradient_checkpointing!r}")
    if cfg.mixed_precision not in ("no", *_AMP_DTYPES):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {cfg.mixed_precision!r}")
    one_of(cfg.scheme, "scheme", integrators.SCHEMES)     # integrators.memoryless_step
    if cfg.scheme != "exponential" and cfg.solver != "adjoint_matching":
        raise ValueError(f"scheme={cfg.scheme!r} steps Adjoint Matching's rollouts and adjoint; solver "
                         f"{cfg.solver!r} builds its own batch, so leave scheme at 'exponential'")
    if cfg.grid not in ("auto", "uniform"):
        raise ValueError(f"grid must be 'auto' (the network's own time grid, else uniform) or 'uniform', got {cfg.grid!r}")


def _offline_batch(base: FlowModel, draws, micro: int, steps: int, gens: dict, amp, reward=None, grid="auto",
                   scheme="exponential"):
    """Stage-1 base samples (n, *dims), or only their rewards r(x, c) as float64 (n,) when `reward` is given.

    draws: [(shard i, count, condition c, repeat)] in order: `count` memoryless-SDE samples under c
    from shard i's stream, drawn and rewarded `micro` rows at a time under no_grad and `amp`, so
    that peak memory follows the micro-batch, not n_offline (a latent model decodes `micro` images
    at a time). The reward sees c repeated to the rows (repeat) or c as it is. The chunks of a shard
    draw from its stream one after another: a count ≤ micro draws what one call for all drew.
    grid, scheme: the time grid ("auto" or "uniform", FlowModel.time_grid) and the step
    (integrators.memoryless_step), as the rollouts'.
    """
    out = []
    for i, n, c, repeat in draws:
        for s in range(0, n, micro):
            m = min(micro, n - s)
            with torch.no_grad(), amp():
                x = base.sample(m, steps=steps, sde=True, cond=c, generator=gens[i], grid=grid, scheme=scheme)
                out.append(x if reward is None else
                           _rewards_of(reward, x, pr.repeat(c, m) if repeat else c).detach().double())
    if out:
        return torch.cat(out)
    return torch.zeros(0, *base.shape, device=base.device) if reward is None else \
        torch.zeros(0, dtype=torch.float64, device=base.device)


def _stage1_record(stage1):
    """stage1.json: the objective's solution, or per prompt {"eta": [η*_p], "per_prompt": [solution_p]}."""
    one = lambda s: asdict(s) if hasattr(s, "__dataclass_fields__") else s  # noqa: E731
    if isinstance(stage1, list):
        return {"eta": [s.eta for s in stage1], "per_prompt": [one(s) for s in stage1]}
    return one(stage1)


def _autocast(mixed_precision: str, device: torch.device):
    """A factory of autocast contexts for the model forward passes (a no-op for "no")."""
    if mixed_precision == "no":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[mixed_precision])


class _Params(torch.nn.Module):
    """A module whose state is just the given parameters (shared, not copied): LoRA checkpoints."""

    def __init__(self, named):
        super().__init__()
        for n, p in named:
            self.register_parameter(n.replace(".", "__"), p)


def make_lora_model(base: FlowModel, rank: int, alpha: float | None = None, targets=None, seed: int = 0) -> FlowModel:
    """The model of a LoRA run: new modules over the base's own frozen tensors plus a float32 LoRA.

    One copy of the network in memory: base, this model and the caller's model (where it is on
    the run's device) hold the same weight tensors; the base's velocity is the network without
    the LoRA (its modules never get one), this model's is the network with it. targets None:
    the adapter's default (diffusers_adapter.add_lora). The LoRA's A init depends on `seed` only.
    """
    from ..models import diffusers_adapter as da
    ft = base.copy(share_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        da.add_lora(ft, rank, alpha, None if targets is None else tuple(targets))
    return ft.to(base.device)


def resolve_init(init: str, base: FlowModel) -> str:
    """init="auto" as finetune and fdc read it: "residual" for vector data (a frozen base plus a
    zero-initialised MLP; closed-form bases have no weights to copy), "copy" otherwise (images,
    particles: all weights train, as in the paper). Whether the base's parameters require
    gradients does not matter (a loaded model's do, a pretrained one's do not)."""
    return ("residual" if len(base.shape) == 1 else "copy") if init == "auto" else init


def make_finetune_model(base: FlowModel, init: str = "auto", residual_hidden=(128, 128), seed: int = 0) -> FlowModel:
    """The model to train: a copy of the base, or base (frozen) + zero-initialised residual MLP.

    Both start exactly equal to the base. "auto" picks "residual" for vector data (the 2-D and
    small MLP bases: the residual starts at exactly zero, and closed-form bases have no weights
    to copy) and "copy" otherwise (images, particles: the paper fine-tunes all weights).
    """
    net = base.copy().net
    init = resolve_init(init, base)
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


def _config(config, lam, iters, kwargs) -> FinetuneConfig:
    """The run's FinetuneConfig: `config` (or the defaults) with lam, iters and kwargs set on it."""
    if config is not None and not isinstance(config, FinetuneConfig):
        raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
    unknown = set(kwargs) - set(FinetuneConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown finetune options {sorted(unknown)}; valid: {sorted(FinetuneConfig.__dataclass_fields__)}")
    given = {**({"lam": lam} if lam is not None else {}), **({"iters": iters} if iters is not None else {}), **kwargs}
    return replace(config, **given) if config is not None else FinetuneConfig(**given)


def _models(model: FlowModel, cfg: FinetuneConfig, device, trainable):
    """(base, ft, named trainable parameters, checkpointed modules) of a run."""
    # the frozen base: views of the caller's weights (no copy) where they already are on `device`
    base = model.copy(share_weights=True).to(device).eval()
    if cfg.lora_rank is not None:
        ft = make_lora_model(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    else:
        ft = make_finetune_model(base, cfg.init, cfg.residual_hidden, cfg.seed)
    if cfg.gradient_checkpointing:
        inner = getattr(ft.net, "model", None)
        if not hasattr(inner, "enable_gradient_checkpointing"):
            raise ValueError("gradient_checkpointing needs a diffusers adapter (models.diffusers_adapter."
                             f"from_diffusers); this model's network is {type(ft.net).__name__}")
        inner.enable_gradient_checkpointing()
    # a LoRA run's frozen weights are the base's own tensors: only the LoRA is ft's to broadcast
    dist.broadcast_module(ft if cfg.lora_rank is None else
                          _Params([(n, p) for n, p in ft.named_parameters() if p.requires_grad]))
    named = [(n, p) for n, p in ft.named_parameters() if p.requires_grad and (trainable is None or trainable(n, p))]
    if not named:
        raise ValueError("no trainable parameters (check `trainable` and `init`)")
    if trainable is not None:   # no gradients (nor their memory) for the parameters that do not train
        chosen = {id(p) for _, p in named}
        for p in ft.parameters():
            if id(p) not in chosen:
                p.requires_grad_(False)
    # LoRA runs checkpoint only the LoRA weights (the rest is the base, fixed by the config hash)
    modules = {"lora": _Params(named)} if cfg.lora_rank is not None else {"model": ft}
    return base, ft, [p for _, p in named], modules


def _stage1(objective, base, cfg, cond, conds, shards, micro, mine, gens, amp):
    """Stage 1 of the objective (e.g. the CVaR threshold) on offline base samples of all processes.

    Returns (g, g_prompt, solution): the pseudo-reward, per prompt [g_p] when the objective solves
    one threshold per prompt (else None), and the objective's stage-1 solution(s).
    """
    needs_offline = getattr(objective, "needs_offline", True)
    per_prompt = conds is not None and getattr(objective, "per_prompt", False) and needs_offline
    # an objective that takes rewards= (CVaR) gets only the offline rewards, computed chunk by chunk
    by_reward = needs_offline and hasattr(objective, "reward") \
        and "rewards" in inspect.signature(objective.pseudo_reward).parameters
    off, cond_off, r = None, cond, objective.reward if by_reward else None
    if needs_offline and conds is None:
        sizes = dist.shard_sizes(cfg.n_offline, shards)
        off = dist.all_gather(_offline_batch(base, [(i, sizes[i], cond, False) for i in mine], micro, cfg.steps,
                                             gens, amp, r, cfg.grid, cfg.scheme))
    elif needs_offline:
        # prompt p gets shard_sizes(n_offline, P)[p] samples, split over the shards; gathered in
        # (shard, prompt) order, which every process knows, so each builds the pooled condition
        P = len(conds)
        part = [dist.shard_sizes(k, shards) for k in dist.shard_sizes(cfg.n_offline, P)]
        if per_prompt and min(sum(q) for q in part) == 0:
            raise ValueError(f"per-prompt thresholds need offline samples of every prompt: n_offline="
                             f"{cfg.n_offline} < {P} prompts")
        off = dist.all_gather(_offline_batch(base, [(i, part[p][i], conds[p], True) for i in mine for p in range(P)],
                                             micro, cfg.steps, gens, amp, r, cfg.grid, cfg.scheme))
        cond_off = pr.cat([pr.stack_prompts(conds, [part[p][i] for p in range(P)])
                           for i in range(shards) if any(part[p][i] for p in range(P))])

    def solve(o, c):
        return objective.pseudo_reward(None, cfg.lam, rewards=o) if by_reward else objective.pseudo_reward(o, cfg.lam, c)

    if not per_prompt:
        return solve(off, cond_off), None, getattr(objective, "solution", None)
    # the same offline samples as the pooled threshold, grouped by prompt: one η*_p each
    owner = torch.tensor([p for i in range(shards) for p in range(len(conds)) for _ in range(part[p][i])],
                         device=off.device)
    g_prompt, solutions = [], []
    for p, c in enumerate(conds):
        o = off[owner == p]
        g_prompt.append(solve(o, pr.repeat(c, o.shape[0])))
        solutions.append(objective.solution)
    return g_prompt[0], g_prompt, solutions


def _micro_batch(ft, base, solver, g, c, gen, grid, micro: int, cfg: FinetuneConfig, amp, backward):
    """One micro-batch of a finetune iteration: roll out, integrate the lean adjoint (or build the
    other solvers' batch), backpropagate its loss / grad_accum. Returns (loss, kl, x1, g(x1), times)."""
    ft.eval()
    ta = time.perf_counter()
    if solver is None:
        with amp():
            ro = am.rollout(ft, micro, grid, gen, c, cfg.scheme)
        tb = time.perf_counter()
        a1, g_val = am.terminal_adjoint(g, ro.xs[-1], cfg.lam, c)
        # loss times first (the same draw from gen as after the sweep: the sweep draws nothing),
        # so that the VJPs hand over the base velocity there and the loss needs no base forward
        idx, w = am.loss_times(cfg.steps, cfg.n_loss_times, gen)
        with amp():   # the VJPs run in low precision; ã itself is accumulated in x's float32
            adj, v_base = am.lean_adjoint(base, ro, a1, cfg.scheme, idx)
        tc = time.perf_counter()
        ft.train()
        # mean over micro-batches; the average over processes follows in the loop
        loss, kl = am.backward_loss(ft, base, ro, adj, idx, w, cfg.loss_chunk, 1.0 / cfg.grad_accum,
                                    backward, amp, v_base)
        return loss, kl, ro.xs[-1], g_val, (ta, tb, tc)
    # the other losses: one batch of end points (or paths), then their regression
    with amp():
        batch = solver.batch(ft, base, g, cfg.lam, micro, grid, gen, c)
    tb = tc = time.perf_counter()
    ft.train()
    with amp():
        loss, kl = solver.loss(ft, base, batch, cfg.n_loss_times, gen, c)
    backward(loss / cfg.grad_accum)
    return float(loss.detach()), kl, batch.x1, batch.r, (ta, tb, tc)


def _summary(parts, raw_reward, r_cond, micro: int, t0: float) -> tuple[dict, dict]:
    """(stats, info) of one iteration from its micro-batches [(g, loss, kl, x1, g(x1), times)].

    stats are averaged over processes by the loop; info holds the reward summary of all processes'
    end points (r itself, or raw_reward(x1, cond) when g is a pseudo-reward), and the phase times.
    """
    x1 = torch.cat([p[3] for p in parts])
    with torch.no_grad():
        g_all = torch.cat([p[4] for p in parts])
        # (objectives' r(x) or r(x, cond) call: a one-argument reward is accepted as well)
        r = g_all if raw_reward is None else _call_reward(raw_reward, x1, r_cond)
    stats = {"loss": sum(p[1] for p in parts) / len(parts), "kl": sum(p[2] for p in parts) / len(parts),
             "diversity": mean_pairwise_distance(x1[:256])}
    thresholds = [(getattr(p[0], "eta", None), getattr(p[0], "tail", None)) for p in parts]
    if all(e is not None and t is not None for e, t in thresholds):
        # fraction of each micro-batch beyond its threshold: β at the optimum (F'(η*) = 0)
        stats["tail_fraction"] = sum(tail_fraction(r_j, e, t) for r_j, (e, t) in
                                     zip(r.split(micro), thresholds)) / len(thresholds)
    rg = dist.all_gather(torch.stack([r.float().reshape(-1), g_all.float().reshape(-1)], 1))
    t_roll = sum(tb - ta for *_, (ta, tb, tc) in parts)
    t_adj = sum(tc - tb for *_, (ta, tb, tc) in parts)
    info = {**{f"reward_{k}": v for k, v in reward_summary(rg[:, 0]).items()},
            "pseudo_reward_mean": float(rg[:, 1].mean()), "time_rollout": t_roll, "time_adjoint": t_adj,
            "time_loss": time.perf_counter() - t0 - t_roll - t_adj}
    return stats, info


def finetune(model: FlowModel, objective, lam: float | None = None, iters: int | None = None, *,
             config: FinetuneConfig | None = None, out=None, resume: bool = False, progress: bool = True,
             trainable: Callable | None = None, cond=None, prompts=None, callback: Callable | None = None,
             report_to="none", **kwargs) -> FlowModel:
    """Fine-tune `model` toward p* ∝ p_model · exp(g/λ); returns a new FlowModel (base untouched).

    objective: an objective (ExpectedReward, CVaR, ...) or a plain reward callable r(x, cond) -> (batch,).
    lam, iters and kwargs (any FinetuneConfig field: batch_size, steps, lr, n_loss_times, seed,
    device, ...) set on `config` (a FinetuneConfig; default: FinetuneConfig()).
    out: run folder (config.json, log.jsonl, metrics.json, model.safetensors, checkpoints/);
    resume: continue from the newest valid checkpoint in `out`. report_to: "none", "tensorboard"
    or "wandb" (the log.jsonl records, on rank 0), or an open tracking.Tracker, left open.
    trainable: optional filter (name, parameter) -> bool choosing which parameters train (the
    others are frozen: no gradient memory).
    cond: one condition for every sample; prompts: instead, a list of per-prompt conditions (or one
    batched encode_prompts dict), one prompt per micro-batch in a shuffled cycle (methods/prompts.py).
    Both may be strings when the model has a prompt encoder (from_diffusers with text encoders).
    lora_rank (with lora_alpha, lora_targets): train only a float32 LoRA on a diffusers adapter, over
    the caller's own frozen weights (one copy of the network; the returned model shares them with
    `model`, which is otherwise left as it was); the run folder then also holds lora.safetensors
    (models.diffusers_adapter.load_lora puts it on the base).
    grid: "auto" rolls out on the network's own time grid (SD3: the scheduler's shifted one), "uniform".
    callback(iteration, record) is called after each iteration; a callback with a third required
    argument gets callback(iteration, record, model) with the model being trained (e.g. to draw
    validation samples; leave its weights alone).
    Memory and speed (module docstring): grad_accum, loss_chunk, gradient_checkpointing, mixed_precision.
    """
    if not isinstance(model, FlowModel):
        raise ValueError(f"model must be a tiltflow FlowModel, got {type(model).__name__}")
    cfg = _config(config, lam, iters, kwargs)
    if not hasattr(objective, "pseudo_reward"):
        if not callable(objective):
            raise ValueError(f"objective must be an objective or a reward callable, got {objective!r}")
        objective = ExpectedReward(objective)
    world, rank, shards, micro = dist.setup_batches(cfg.batch_size, cfg.grad_accum)
    device = dist.device(cfg.device, model)
    cfg = replace(cfg, device=dist.device_name(device))   # the run folder records the device it ran on
    cond, conds, restore_text = pr.prepare(model, cond, prompts, device)
    base, ft, params, modules = _models(model, cfg, device, trainable)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    solver = get_solver(cfg.solver, **cfg.solver_options)
    if solver is not None:
        solver.check_base(base)
    # One stream per micro-batch (shard); this process owns shards rank·grad_accum, ...
    mine = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)
    gens = {i: torch.Generator(device=device).manual_seed(dist.shard_seed(cfg.seed, i)) for i in mine}
    grid = base.time_grid(cfg.steps, cfg.grid, device=device)
    amp = _autocast(cfg.mixed_precision, device)
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
    backward = torch.Tensor.backward if scaler is None else (lambda loss: scaler.scale(loss).backward())

    t_stage1 = time.perf_counter()
    reward, g_prompt, stage1 = _stage1(objective, base, cfg, cond, conds, shards, micro, mine, gens, amp)
    t_stage1 = time.perf_counter() - t_stage1
    raw_reward = getattr(objective, "reward", reward)

    record = {**asdict(cfg), "objective": repr(objective), "base": base.config(),
              "base_weights": ckpt.fingerprint(base), "shards": shards}
    for k, default in _OPTIONAL_KEYS.items():
        if record[k] == default:
            del record[k]
    if conds is not None:
        record["prompts"] = pr.prompt_record(conds)
    trainer = Trainer(
        "finetune", params=params, opt=opt, modules=modules, gens=gens,
        iters=cfg.iters, config=record,
        resumable=("iters", "steps", "grad_accum", "loss_chunk", "gradient_checkpointing"),
        lr_at=cosine(cfg.lr, cfg.lr_final, cfg.iters), grad_clip=cfg.grad_clip, max_nonfinite=cfg.max_nonfinite,
        checkpoint_every=cfg.checkpoint_every, out=out, resume=resume, progress=progress, report_to=report_to,
        scaler=scaler, postfix=("loss", "reward_mean", "kl"), hint="Lower lr, scale the reward, or check the base model",
        banner=f"{record['objective']}  " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items())
        + (f"  processes={world} (micro-batch {micro})" if world > 1 else ""))
    if out is not None and dist.is_main() and stage1 is not None:
        ckpt.write_json(Path(out) / "stage1.json", _stage1_record(stage1))
    schedule = pr.PromptSchedule(len(conds), cfg.seed) if conds is not None else None

    def step(it):
        t0 = time.perf_counter()
        # the prompt of each micro-batch of this iteration (the same on all processes)
        pick = [schedule(it * shards + j) for j in range(shards)] if conds is not None else None
        parts = []
        for i in mine:
            c, g_i = (cond, reward) if conds is None else (conds[pick[i]], g_prompt[pick[i]] if g_prompt else reward)
            parts.append((g_i, *_micro_batch(ft, base, solver, g_i, c, gens[i], grid, micro, cfg, amp, backward)))
        r_cond = cond if conds is None else pr.stack_prompts([conds[pick[i]] for i in mine], [micro] * len(mine))
        stats, info = _summary(parts, None if raw_reward is reward else raw_reward, r_cond, micro, t0)
        info.update({"eta": [float(g_prompt[p].eta) for p in pick]} if g_prompt else
                    {"eta": float(reward.eta)} if hasattr(reward, "eta") else {})
        return stats, {**info, **({"prompts": pick} if conds is not None else {})}

    try:
        last = trainer.run(step, callback=callback, model=ft)
    finally:
        restore_text()
    ft.eval()
    ft.requires_grad_(False)
    if out is not None and dist.is_main():
        ft.save(Path(out) / "model.safetensors")
        from ..models import diffusers_adapter as da
        if isinstance(ft.net, da._DiffusersVelocity) and ft.net.lora is not None:
            da.save_lora(ft, Path(out) / "lora.safetensors")
        ckpt.write_json(Path(out) / "metrics.json", {
            "final": last, "time_stage1": t_stage1, "stage1": None if stage1 is None else _stage1_record(stage1)})
    dist.barrier()   # the run folder is complete before any process returns
    return ft
