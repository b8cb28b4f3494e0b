"""gradual_finetune: Gradual Fine-Tuning (GFT) of a flow model toward samples of a target.

Thorkelsdottir & Banerjee, "Gradual Fine-Tuning for Flow Matching Models", arXiv 2601.22495.
Only the paper's abstract was available to us; the objective below is the reconstruction of
../shared/research/algorithms2.md §1 that is exact at every temperature (INFERRED, not SAW).

Intermediate objective at temperature τ ≥ 0 (stochastic flows, same diffusion g(t) for all):

    J_τ(b) = KL(Q_tgt ‖ P_b) + τ KL(P_pre ‖ P_b)
           = ½ E_{Q_tgt} ∫ ‖b − b_tgt‖²/g² dt + τ ½ E_{P_pre} ∫ ‖b − b_pre‖²/g² dt      (Girsanov)

Q_tgt is the interpolant process of the target samples, P_pre the pretrained model's process,
P_b the model being trained. Pointwise in (x, t) the minimiser is the density-weighted average

    b*_τ = (q_t b_tgt + τ p_t b_pre) / (q_t + τ p_t),   likewise v*_τ = (q_t u_tgt + τ p_t v_pre) / (q_t + τ p_t),

the drift (velocity) of the mixture path (Q_tgt + τ P_pre)/(1 + τ): at t = 1 the minimiser
generates π_τ = (p_tgt + τ p_pre)/(1 + τ) exactly, the pretrained model as τ → ∞ and the
target as τ → 0. GFT cools τ along a schedule τ_0 > τ_1 > … > τ_K ≈ 0, training a fixed number
of steps at each temperature, each stage starting from the previous one's minimiser.

For affine paths b − b' = (1 + g²α/(2β(α̇β − β̇α))) (v − v'), so each KL is a time-weighted
velocity regression; with the memoryless g (paths.AffinePath.sigma) the factor is 2 and the
weight 4/g(t)² (2t/(1 − t) for rectified flow).

- flow="stochastic": the Girsanov weight, realised by drawing t with density ∝ 4/g(t)² (truncated
  at t ≤ 1 − STOCHASTIC_T_MAX_GAP, where the weight diverges); sample with the memoryless SDE.
- flow="deterministic": the path KL of two ODE flows is not defined, so the same two regressions
  are weighted uniformly in t (flow matching); same pointwise minimiser, sample with the ODE.

Marginal and conditional objectives (same minimiser):
- variant="marginal": the target term regresses on the marginal velocity u_tgt(x_t, t); from
  samples it is the exact marginal velocity of the empirical measure of `n_ref` target samples
  (posterior-weighted conditional velocities; the x1 that made x_t is among them).
- variant="conditional": regress on the conditional velocity α̇ x1 + β̇ x0 with (x0, x1) from a
  coupling π of N(0, I) and the target: "independent", minibatch exact OT ("ot", ot.emd) or
  entropic OT ("sinkhorn"). Any coupling with these marginals has E_π[α̇x1 + β̇x0 | x_t] = the
  velocity of a path from N(0, I) to the target, so the terminal law of the minimiser is π_τ for
  every coupling; OT only straightens the paths.
The pretrained term always regresses on v_pre itself at points x_t = α_t x̃1 + β_t x0 of the
pretrained path (x̃1 from a pool of `n_pretrained` pretrained ODE samples).

Standard fine-tuning (continue flow matching on the target samples) is the schedule [0.0].

Data parallel (torchrun / accelerate launch, distributed.py), as finetune and pretrain: the
global batch `batch_size` is cut into processes × grad_accum micro-batches, micro-batch i drawn
(target pairs, its coupling, pretrained-path points) from a generator seeded by
distributed.shard_seed(seed, i); the pretrained pool is drawn shard by shard
(shard_seed(seed + 1, i)) and gathered, so every process holds the same pool; gradients are
averaged with one all_reduce before clipping, and rank 0 alone writes the run folder. Minibatch
OT pairs within each micro-batch, so the result depends on processes × grad_accum, not on how
it is split.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..couplings import pair, require_ot
from ..couplings import plan
from ..metrics import energy_distance
from ..models.flow_model import FlowModel
from ..paths import AffinePath
from .finetune import make_finetune_model
from ..tracking import get_logger
from ..training import Trainer, constant, update_ema as _update_ema
from .. import validation as val

LOG_EVERY = 50              # iterations averaged into one log.jsonl record
TAU_ZERO = 1e-2             # the final temperature must be at most this ("≈ 0": ≤ 1 % pretrained mass)
STOCHASTIC_T_MAX_GAP = 0.02  # flow="stochastic" draws t ≤ 1 − gap: the Girsanov weight ∝ 1/(1 − t) is not integrable
N_EVAL = 2000               # model samples for the final energy distance
EVAL_ODE_STEPS = 50


# --- cooling schedules: τ_k for k = 0..K (n = K + 1 temperatures) ----------------------------

def geometric(k: int, n: int, tau_start: float, tau_end: float) -> float:
    """τ_k = τ_0 (τ_K/τ_0)^(k/K): a constant cooling factor per stage (needs τ_K > 0)."""
    return tau_start if n == 1 else tau_start * (tau_end / tau_start) ** (k / (n - 1))


def linear(k: int, n: int, tau_start: float, tau_end: float) -> float:
    """τ_k = τ_0 + (τ_K − τ_0) k/K."""
    return tau_start if n == 1 else tau_start + (tau_end - tau_start) * k / (n - 1)


def cosine(k: int, n: int, tau_start: float, tau_end: float) -> float:
    """τ_k = τ_K + (τ_0 − τ_K)(1 + cos(πk/K))/2: slow at both ends."""
    return tau_start if n == 1 else tau_end + (tau_start - tau_end) * 0.5 * (1.0 + math.cos(math.pi * k / (n - 1)))


SCHEDULES: dict[str, Callable[[int, int, float, float], float]] = {
    "geometric": geometric, "linear": linear, "cosine": cosine}


@dataclass
class GFTConfig:
    """Settings of one Gradual Fine-Tuning run (printed and saved in the run folder)."""
    schedule: str | tuple = "geometric"  # cooling schedule: geometric, linear, cosine, or explicit temperatures
    tau_start: float = 10.0          # first temperature τ_0 (weight of the pretrained term)
    tau_end: float = 1e-3            # last temperature τ_K, must be <= 0.01 (≈ 0)
    stages: int = 8                  # number of temperatures K + 1 of a named schedule
    iters_per_stage: int = 250       # optimiser steps at each temperature
    variant: str = "conditional"     # "conditional" (coupled x1 − x0 targets) or "marginal" (empirical marginal velocity)
    coupling: str = "auto"           # conditional variant: independent, ot (exact minibatch OT), sinkhorn; auto: ot if POT is installed
    sinkhorn_reg: float = 0.05       # entropic regularisation of sinkhorn, relative to the mean pair cost
    flow: str = "deterministic"      # deterministic (uniform t, ODE) or stochastic (Girsanov-weighted t, SDE)
    batch_size: int = 256            # target pairs per step (and as many pretrained-path points), over all processes
    grad_accum: int = 1              # micro-batches per process and step (gradient accumulation)
    lr: float = 5e-4                 # Adam learning rate
    n_pretrained: int = 4096         # pool of pretrained ODE samples x̃1 for the pretrained term
    pretrained_steps: int = 50       # Heun steps used to draw that pool
    n_ref: int = 1024                # marginal variant: target samples defining the empirical marginal velocity
    init: str = "auto"               # copy: train a copy of the pretrained net; residual: base + zero-init MLP; auto: copy if it has weights
    residual_hidden: tuple = (128, 128)  # widths of that residual MLP
    ema: float = 0.995               # decay of the weight average the returned model uses; 0 disables
    grad_clip: float = 1.0           # max global gradient norm; 0 disables clipping
    checkpoint_every: int = 250
    max_nonfinite: int = 5           # stop after this many steps in a row skipped for a NaN/inf loss or gradient
    seed: int = 0
    device: str = "auto"             # "auto": the model's accelerator, else the GPU if any, else the CPU
    steps_per_stage: int | None = field(default=None, metadata={"deprecated": "iters_per_stage"})

    def __post_init__(self):
        if isinstance(self.schedule, (list, np.ndarray, torch.Tensor)):
            self.schedule = tuple(float(v) for v in self.schedule)
        if isinstance(self.residual_hidden, list):
            self.residual_hidden = tuple(self.residual_hidden)
        val.resolve_renamed(self, "GFTConfig")
        _validate(self)

    @property
    def temperatures(self) -> list[float]:
        return temperatures(self)


# --- validation ------------------------------------------------------------------------------

def _number(name, v, lo=-math.inf, lo_open=False):
    return val.in_interval(v, name, lo, math.inf, lo_open=lo_open, hi_open=True)


def _positive_int(name, v):
    return val.positive_int(v, name)


def temperatures(cfg: GFTConfig) -> list[float]:
    """The schedule τ_0 ≥ … ≥ τ_K of `cfg`; ValueError unless it is non-increasing and cools to ≈ 0."""
    if isinstance(cfg.schedule, str):
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)} or a sequence of temperatures, "
                             f"got {cfg.schedule!r}")
        _positive_int("stages", cfg.stages)
        _number("tau_start", cfg.tau_start, 0.0)
        _number("tau_end", cfg.tau_end, 0.0)
        if cfg.schedule == "geometric" and (cfg.tau_end <= 0 or cfg.tau_start <= 0):
            raise ValueError(f"the geometric schedule needs tau_start > 0 and tau_end > 0, got "
                             f"{cfg.tau_start}, {cfg.tau_end}; use a small tau_end such as 1e-3")
        taus = [float(SCHEDULES[cfg.schedule](k, cfg.stages, cfg.tau_start, cfg.tau_end)) for k in range(cfg.stages)]
    else:
        try:
            taus = [float(v) for v in cfg.schedule]
        except (TypeError, ValueError):
            raise ValueError(f"schedule must be a name or a sequence of temperatures, got {cfg.schedule!r}")
    if not taus:
        raise ValueError("schedule is empty: give at least one temperature")
    if any(not math.isfinite(v) or v < 0 for v in taus):
        raise ValueError(f"temperatures must be finite and >= 0, got {taus}")
    if any(b > a for a, b in zip(taus, taus[1:])):
        raise ValueError(f"a cooling schedule must not increase, got {taus}")
    if taus[-1] > TAU_ZERO:
        raise ValueError(f"the schedule must cool to ≈ 0 (final temperature <= {TAU_ZERO}) so that the last "
                         f"objective targets the data, got final temperature {taus[-1]:g}; lower tau_end")
    return taus


def _validate(cfg: GFTConfig) -> list[float]:
    taus = temperatures(cfg)
    for name in ("iters_per_stage", "batch_size", "grad_accum", "n_pretrained", "pretrained_steps", "n_ref",
                 "checkpoint_every", "max_nonfinite"):
        _positive_int(name, getattr(cfg, name))
    _number("lr", cfg.lr, 0.0, lo_open=True)
    _number("grad_clip", cfg.grad_clip, 0.0)
    _number("sinkhorn_reg", cfg.sinkhorn_reg, 0.0, lo_open=True)
    val.in_interval(cfg.ema, "ema (0 disables averaging)", 0.0, 1.0, lo_open=False, hi_open=True)
    if cfg.variant not in ("conditional", "marginal"):
        raise ValueError(f"variant must be 'conditional' or 'marginal', got {cfg.variant!r}")
    if cfg.coupling not in ("auto", "independent", "ot", "sinkhorn"):
        raise ValueError(f"coupling must be 'auto', 'independent', 'ot' or 'sinkhorn', got {cfg.coupling!r}")
    if cfg.variant == "marginal" and cfg.coupling not in ("independent", "auto"):
        raise ValueError(f"variant='marginal' regresses on the marginal velocity of the independent coupling; "
                         f"use coupling='independent' with it, or variant='conditional' for coupling={cfg.coupling!r}")
    if cfg.flow not in ("deterministic", "stochastic"):
        raise ValueError(f"flow must be 'deterministic' or 'stochastic', got {cfg.flow!r}")
    if cfg.init not in ("auto", "copy", "residual"):
        raise ValueError(f"init must be 'auto', 'copy' or 'residual', got {cfg.init!r}")
    val.integer(cfg.seed, "seed")
    return taus


def check_target_samples(x, shape: tuple) -> torch.Tensor:
    """target_samples as a float tensor (n, *shape); ValueError on a wrong shape, NaN or inf."""
    if hasattr(x, "__array__") and not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"target_samples must be a tensor or array (n, {', '.join(map(str, shape))}), "
                         f"got {type(x).__name__}")
    x = x.detach()
    if tuple(x.shape[1:]) != tuple(shape) or x.ndim != len(shape) + 1:
        raise ValueError(f"target_samples must have shape (n, {', '.join(map(str, shape))}) to match the model, "
                         f"got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"target_samples needs at least 2 samples, got {x.shape[0]}")
    if not x.is_floating_point():     # integer, bool or complex
        raise ValueError(f"target_samples must be a real floating-point tensor, got dtype {x.dtype}"
                         + ("" if x.is_complex() else "; convert with .float()"))
    bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).sum())
    if bad:
        raise ValueError(f"target_samples has {bad} of {x.shape[0]} rows with NaN or inf; drop or fix them")
    return x.float()


coupling_plan = plan      # gft.coupling_plan, its name before couplings.py


# --- the two regressions ---------------------------------------------------------------------

def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def empirical_velocity(path: AffinePath, x: torch.Tensor, t: torch.Tensor, x1_ref: torch.Tensor) -> torch.Tensor:
    """Marginal velocity of the path from N(0, I) to the empirical measure of x1_ref (m, *dims).

    u(x, t) = Σ_j w_j (α̇ x1_j + β̇ (x − α x1_j)/β),  w_j ∝ exp(−‖x − α x1_j‖²/(2β²)),
    the independent-coupling velocity E[α̇x1 + β̇x0 | x_t = x] for x1 uniform on x1_ref.
    x: (batch, *dims), t: (batch,); returns (batch, *dims). Computed in float64; β ≥ 1e-4.
    """
    xb = x.reshape(x.shape[0], -1).double()
    ref = x1_ref.reshape(x1_ref.shape[0], -1).double()
    td = t.double()
    a, b = path.alpha(td)[:, None], path.beta(td).clamp_min(1e-4)[:, None]
    da, db = path.d_alpha(td)[:, None], path.d_beta(td)[:, None]
    diff = xb[:, None, :] - a[:, :, None] * ref[None]                           # (B, m, d) x − α x1_j
    logw = -0.5 * diff.pow(2).sum(-1) / b**2                                    # (B, m)
    w = torch.softmax(logw, dim=1)
    cond = da[:, :, None] * ref[None] + (db / b)[:, :, None] * diff             # (B, m, d)
    return (w[..., None] * cond).sum(1).to(x.dtype).reshape(x.shape)


def target_errors(model: FlowModel, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                  x1_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Squared errors ‖v_θ(x_t, t) − target‖² (batch,) of the target term.

    x0, x1: paired (batch, *dims); t: (batch,). Conditional: target α̇x1 + β̇x0. Marginal
    (x1_ref given): target = empirical_velocity(x_t, t; x1_ref).
    """
    xt, u = model.path.interpolate(x0, x1, t)
    if x1_ref is not None:
        u = empirical_velocity(model.path, xt, t, x1_ref)
    err = model.velocity(xt, t) - u
    return err.pow(2).reshape(err.shape[0], -1).sum(1)


def pretrained_errors(model: FlowModel, pretrained: FlowModel, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared errors ‖v_θ(x_t, t) − v_pre(x_t, t)‖² (batch,) at points x_t of the pretrained path."""
    with torch.no_grad():
        target = pretrained.velocity(xt, t)
    err = model.velocity(xt, t) - target
    return err.pow(2).reshape(err.shape[0], -1).sum(1)


def gft_loss(model: FlowModel, pretrained: FlowModel, batch: dict, tau: float):
    """L_τ = (mean target errors + τ · mean pretrained errors) / (1 + τ): J_τ up to constants.

    batch: x0, x1, t (target pairs), xp, tp (pretrained-path points) and optionally x1_ref
    (marginal variant). The 1/(1 + τ) keeps the gradient scale across stages; it does not move
    the minimiser. Returns (loss, mean target error, mean pretrained error).
    """
    e_tgt = target_errors(model, batch["x0"], batch["x1"], batch["t"], batch.get("x1_ref")).mean()
    e_pre = pretrained_errors(model, pretrained, batch["xp"], batch["tp"]).mean() if tau > 0 else e_tgt.new_zeros(())
    return (e_tgt + tau * e_pre) / (1.0 + tau), e_tgt, e_pre


# --- time law --------------------------------------------------------------------------------

class TimeSampler:
    """t ~ U(0, 1) (deterministic flows) or t with density ∝ 4/g(t)² on [0, 1 − gap] (stochastic).

    The second draws the Girsanov weight of J_τ instead of multiplying by it (same expectation,
    far lower variance); inverse CDF on a 2001-point grid.
    """

    def __init__(self, path: AffinePath, flow: str):
        self.flow = flow
        if flow == "stochastic":
            grid = torch.linspace(0.0, 1.0 - STOCHASTIC_T_MAX_GAP, 2001, dtype=torch.float64)
            w = 4.0 / path.sigma(grid).double() ** 2
            cdf = torch.cat([w.new_zeros(1), torch.cumsum(0.5 * (w[1:] + w[:-1]) * grid.diff(), 0)])
            self.grid, self.cdf = grid, cdf / cdf[-1]

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, generator=generator)
        if self.flow == "deterministic":
            return u
        i = torch.searchsorted(self.cdf, u.double()).clamp(1, len(self.grid) - 1)
        c0, c1 = self.cdf[i - 1], self.cdf[i]
        frac = (u.double() - c0) / (c1 - c0).clamp_min(1e-300)
        return (self.grid[i - 1] + frac * (self.grid[i] - self.grid[i - 1])).float()


def draw_batch(target: torch.Tensor, pool: torch.Tensor, cfg: GFTConfig, times: TimeSampler,
               gen: torch.Generator, path: AffinePath, device, n: int | None = None) -> dict:
    """One (micro-)batch of n (default cfg.batch_size) pairs, drawn in a fixed order from `gen`
    (so resumed runs repeat it exactly)."""
    n = cfg.batch_size if n is None else n
    x1 = target[torch.randint(target.shape[0], (n,), generator=gen)]
    x0 = torch.randn(x1.shape, generator=gen)
    x0, x1 = pair(x0, x1, cfg.coupling, gen, cfg.sinkhorn_reg)
    t = times(n, gen)
    xp1 = pool[torch.randint(pool.shape[0], (n,), generator=gen)]
    tp = times(n, gen)
    xp, _ = path.interpolate(torch.randn(xp1.shape, generator=gen), xp1, tp)
    batch = {"x0": x0, "x1": x1, "t": t, "xp": xp, "tp": tp}
    if cfg.variant == "marginal":
        extra = target[torch.randint(target.shape[0], (max(cfg.n_ref - n, 0),), generator=gen)]
        batch["x1_ref"] = torch.cat([x1, extra])
    return {k: v.to(device) for k, v in batch.items()}


# --- diagnostics -----------------------------------------------------------------------------

@torch.no_grad()
def straightness(model: FlowModel, n: int = 1000, steps: int = 100, seed: int = 0) -> dict:
    """How far the ODE paths are from straight lines, on n paths with `steps` Heun steps.

    straightness = E ∫_0^1 ‖v(x_t, t)‖² dt − E ‖x_1 − x_0‖² ≥ 0 (Liu et al. 2023; 0 iff straight),
    length_ratio = E[path length] / E‖x_1 − x_0‖ ≥ 1.
    """
    traj, grid = model.sample(n, steps=steps, seed=seed, return_trajectory=True)
    flat = traj.reshape(traj.shape[0], n, -1)
    disp = flat[-1] - flat[0]
    dt = grid.diff().to(flat.dtype)
    seg = flat.diff(dim=0)                                   # (steps, n, d)
    kinetic = (seg.pow(2).sum(-1) / dt[:, None]).sum(0)      # Σ ‖Δx‖²/Δt ≈ ∫‖v‖² dt
    length = seg.norm(dim=-1).sum(0)
    chord = disp.norm(dim=-1)
    return {"straightness": float((kinetic - disp.pow(2).sum(-1)).mean()),
            "length_ratio": float(length.mean() / chord.mean().clamp_min(1e-12))}


# --- the loop --------------------------------------------------------------------------------

def _coupling(coupling: str, variant: str) -> str:
    """"auto": exact minibatch OT when POT is installed (the paper's choice), else the independent
    coupling with a warning naming the extra; the marginal variant is always independent."""
    if coupling != "auto":
        return coupling
    if variant == "marginal":
        return "independent"
    if importlib.util.find_spec("ot") is not None:
        return "ot"
    get_logger("gft").warning("gradual_finetune: POT is not installed, so the coupling is 'independent' "
                              "(straighter paths with pip install 'tiltflow[ot]' and coupling='ot')")
    return "independent"


def gradual_finetune(model: FlowModel, target_samples, schedule: str | Sequence[float] | None = None,
                     coupling: str | None = None, variant: str | None = None, *, config: GFTConfig | None = None,
                     out=None, resume: bool = False, progress: bool = True, callback: Callable | None = None,
                     report_to="none", **kwargs) -> FlowModel:
    """Fine-tune `model` toward the distribution of `target_samples` by Gradual Fine-Tuning.

    model: a pretrained FlowModel (left untouched). target_samples: tensor or array (n, *model.shape).
    schedule: "geometric" (default), "linear", "cosine" (τ_start → τ_end over `stages`
      temperatures) or an explicit non-increasing sequence of temperatures ending at <= 0.01;
      [0.0] is standard fine-tuning (flow matching on the target samples only).
    coupling: "auto" (default: exact minibatch OT when POT is installed, else independent with a
      warning), "independent", "ot" (exact minibatch OT) or "sinkhorn" (entropic OT); "ot" and
      "sinkhorn" need POT (pip install 'tiltflow[ot]'). variant: "conditional" (default) or "marginal".
    schedule, coupling, variant and kwargs (any other GFTConfig field: tau_start, tau_end, stages,
      iters_per_stage, flow, lr, ...) set on `config` (a GFTConfig; default: GFTConfig()).
    out: run folder (config.json, log.jsonl, metrics.json, model.safetensors, checkpoints/);
      resume=True continues from its newest valid checkpoint. report_to: "none", "tensorboard" or
      "wandb" (the log.jsonl records, rank 0), or an open tracking.Tracker, left open.
    callback(iter, record) is called after each logged record.
    batch_size is the global batch; grad_accum splits each process's share into micro-batches.
    Under torchrun every process trains the same model on its shard; only rank 0 writes `out`.
    Returns a new FlowModel (the weight average if ema > 0) in eval mode without gradients.
    """
    if not isinstance(model, FlowModel):
        raise ValueError(f"model must be a tiltflow FlowModel, got {type(model).__name__}")
    if config is not None and not isinstance(config, GFTConfig):
        raise ValueError(f"config must be a GFTConfig, got {type(config).__name__}")
    unknown = set(kwargs) - set(GFTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown gradual_finetune options {sorted(unknown)}; valid: "
                         f"{sorted(k for k in GFTConfig.__dataclass_fields__ if k != 'steps_per_stage')}")
    given = {k: v for k, v in (("schedule", schedule), ("coupling", coupling), ("variant", variant)) if v is not None}
    cfg = replace(config, **given, **kwargs) if config is not None else GFTConfig(**given, **kwargs)
    cfg = replace(cfg, coupling=_coupling(cfg.coupling, cfg.variant))
    taus = cfg.temperatures
    # batches are drawn on the host and moved (draw_batch), like the pretrained pool: keep the target there too
    target = check_target_samples(target_samples, model.shape).cpu()
    if cfg.coupling != "independent":
        require_ot(f"coupling={cfg.coupling!r}")
    world, rank, shards, micro = dist.setup_batches(cfg.batch_size, cfg.grad_accum)
    dev = dist.device(cfg.device, model)
    cfg = replace(cfg, device=dist.device_name(dev))   # the run folder records the device it ran on
    total = len(taus) * cfg.iters_per_stage

    pretrained = model.copy().to(dev).eval()
    pretrained.requires_grad_(False)
    # "auto": continue training the pretrained weights (as standard fine-tuning does); a frozen
    # base plus a zero-initialised residual MLP only when the base has no weights (closed forms)
    has_weights = any(True for _ in pretrained.net.parameters())
    init = cfg.init if cfg.init != "auto" else ("copy" if has_weights else "residual")
    ft = make_finetune_model(pretrained, init, cfg.residual_hidden, cfg.seed)
    dist.broadcast_module(ft)
    avg = ft.copy() if cfg.ema > 0 else None
    if avg is not None:
        avg.requires_grad_(False)
    params = [p for p in ft.parameters() if p.requires_grad]
    mine = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)   # this process's shards
    gens = {i: torch.Generator().manual_seed(dist.shard_seed(cfg.seed, i)) for i in mine}
    times = TimeSampler(pretrained.path, cfg.flow)
    # The pretrained pool depends on the seed and the number of shards only (a resumed run draws
    # the same one): shard i draws its part from seed + 1 + i·2³², and the parts are gathered.
    sizes = dist.shard_sizes(cfg.n_pretrained, shards)
    parts = [pretrained.sample(sizes[i], steps=cfg.pretrained_steps, seed=dist.shard_seed(cfg.seed + 1, i)).cpu()
             for i in mine if sizes[i] > 0]
    pool = dist.all_gather(torch.cat(parts) if parts else torch.empty(0, *pretrained.shape))

    record = {**val.current_fields(cfg), "temperatures": taus, "total_iters": total,
              "target_samples": list(target.shape), "base": pretrained.config(), "shards": shards}
    trainer = Trainer(
        "gft", params=params, opt=torch.optim.Adam(params, lr=cfg.lr),
        modules={"model": ft, **({"ema": avg} if avg is not None else {})}, gens=gens,
        iters=total, config=record,
        resumable=("grad_accum",), lr_at=constant(cfg.lr), grad_clip=cfg.grad_clip, max_nonfinite=cfg.max_nonfinite,
        checkpoint_every=cfg.checkpoint_every, out=out, resume=resume, progress=progress, report_to=report_to,
        log_when=lambda done: done % LOG_EVERY == 0 or done % cfg.iters_per_stage == 0,
        after_step=None if avg is None else (lambda it: _update_ema(avg, ft, cfg.ema, it)),
        postfix=("loss", "tau"), hint="Lower lr or standardise the target samples",
        banner=" ".join(f"{k}={v}" for k, v in record.items() if k != "base")
        + (f"  processes={world} (micro-batch {micro})" if world > 1 else ""))

    def step(it):
        stage = it // cfg.iters_per_stage
        sums = {"loss": 0.0, "target_error": 0.0, "pretrained_error": 0.0}
        for i in mine:
            batch = draw_batch(target, pool, cfg, times, gens[i], ft.path, dev, micro)
            loss, e_tgt, e_pre = gft_loss(ft, pretrained, batch, taus[stage])
            (loss / cfg.grad_accum).backward()   # mean over micro-batches; over processes in the loop
            for k, v in (("loss", loss), ("target_error", e_tgt), ("pretrained_error", e_pre)):
                sums[k] += float(v.detach()) / cfg.grad_accum
        return sums, {"stage": stage, "tau": taus[stage]}

    t_start = time.perf_counter()
    ft.train()
    last = trainer.run(step, callback=callback)
    result = avg if avg is not None else ft
    result.eval()
    result.requires_grad_(False)
    if out is not None and dist.is_main():
        result.save(Path(out) / "model.safetensors")
        metrics = {"total_iters": total, "temperatures": taus, "final": last,
                   "train_time_s": time.perf_counter() - t_start, **evaluate(result, pretrained, target, cfg)}
        ckpt.write_json(Path(out) / "metrics.json", metrics)
        if trainer.progress:
            get_logger("gft").info("tiltflow gft: " + json.dumps(metrics))
    dist.barrier()   # the run folder is complete before any process returns
    return result


@torch.no_grad()
def evaluate(model: FlowModel, pretrained: FlowModel, target: torch.Tensor, cfg: GFTConfig) -> dict:
    """Energy distances of fine-tuned and pretrained samples to the target samples, and straightness.

    Samples use the flow the model was trained for (ODE, or the memoryless SDE if stochastic).
    """
    n = min(N_EVAL, target.shape[0])
    ref = target[torch.randperm(target.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 3))[:n]]
    sde = cfg.flow == "stochastic"
    x = model.sample(n, steps=EVAL_ODE_STEPS, sde=sde, seed=cfg.seed + 2).cpu()
    xb = pretrained.sample(n, steps=EVAL_ODE_STEPS, sde=sde, seed=cfg.seed + 2).cpu()
    if not torch.isfinite(x).all():
        return {"energy_distance": float("nan"), "note": "model samples not finite"}
    return {"energy_distance": energy_distance(x, ref), "energy_distance_pretrained": energy_distance(xb, ref),
            "energy_distance_n": n, "energy_distance_reference": "target_samples rows",
            "sampler": "memoryless SDE" if sde else "ODE (Heun)", "sampler_steps": EVAL_ODE_STEPS,
            **straightness(model, n=min(n, 1000), seed=cfg.seed + 4)}
