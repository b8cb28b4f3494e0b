"""pretrain: fit a FlowModel to data by conditional flow matching.

For x1 ~ data, x0 ~ N(0, I), t ~ U(0, 1) and the path x_t = α_t x1 + β_t x0,

    L(θ) = E ‖v_θ(x_t, t) − (α̇_t x1 + β̇_t x0)‖²        (Lipman et al. 2023, CFM loss, eq. (9))

whose minimiser is the marginal velocity v(x, t) = E[α̇_t x1 + β̇_t x0 | x_t = x]. The norm is
summed over data dimensions and averaged over the minibatch.

coupling="ot" pairs the x0 and x1 of each minibatch by exact optimal transport on the squared
Euclidean cost (OT-CFM, Tong et al. 2024). For equal uniform weights the optimal plan is a
permutation, so the pairs still have the marginals N(0, I) and data: the learned distribution is
unchanged, only the paths are straighter.

All randomness (data minibatches, x0, t) comes from one CPU torch.Generator seeded by `seed`,
which is checkpointed, so an interrupted and resumed run ends with the same weights as an
uninterrupted one. With data parallel (torchrun; distributed.py) or grad_accum > 1 the global
batch is cut into world_size × grad_accum equal micro-batches, micro-batch i drawn from its own
generator seeded by distributed.shard_seed(seed, i) (shard 0 is the one-process stream), and
the gradients are averaged over processes; OT coupling pairs within each micro-batch.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import BuiltinFunctionType, FunctionType, MethodType

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..metrics import energy_distance
from ..models.flow_model import FlowModel
from ..models.mlp import MLPVelocity
from ..models.egnn import EGNNVelocity
from ..paths import AffinePath, get_path

LOG_EVERY = 50          # steps averaged into one log.jsonl record
N_EVAL = 2000           # model and data samples for the final energy distance
EVAL_ODE_STEPS = 50     # Heun steps of the evaluation samples
MODELS = ("mlp", "egnn")                                              # networks pretrain builds
DEFAULT_HIDDEN = {"mlp": (256, 256, 256), "egnn": (64, 64, 64, 64)}   # hidden=None means these


@dataclass
class PretrainConfig:
    """Settings of one flow-matching pretraining run (printed and saved in the run folder)."""
    steps: int = 2000                  # optimiser steps (one minibatch each)
    batch_size: int = 256              # minibatch per step, over all processes (the global batch)
    grad_accum: int = 1                # micro-batches per process and step (gradient accumulation)
    lr: float = 1e-3                   # Adam learning rate (after warm-up)
    hidden: tuple = (256, 256, 256)    # widths of the MLP velocity network (EGNN: (width,) * layers)
    path: str | dict = "rectified"     # probability path: a name or AffinePath.config()
    coupling: str = "independent"      # "independent" or "ot" (minibatch exact OT)
    ema: float = 0.999                 # decay of the weight average the returned model uses
    grad_clip: float = 1.0             # max global gradient norm; 0 disables clipping
    seed: int = 0
    device: str = "auto"             # "auto": a ready network's accelerator, else the GPU if any, else the CPU
    checkpoint_every: int = 500
    lr_warmup: int = 0                 # steps of linear learning-rate warm-up from 0
    max_nonfinite: int = 5             # stop after this many steps in a row skipped for a NaN/inf loss or gradient


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _validate(cfg: PretrainConfig):
    for name in ("steps", "batch_size", "checkpoint_every", "grad_accum", "max_nonfinite"):
        _positive_int(name, getattr(cfg, name))
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not 0 < cfg.lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {cfg.lr!r}")
    if isinstance(cfg.ema, bool) or not isinstance(cfg.ema, (int, float)) or not 0 <= cfg.ema < 1:
        raise ValueError(f"ema must be in [0, 1) (0 disables averaging), got {cfg.ema!r}")
    if isinstance(cfg.grad_clip, bool) or not isinstance(cfg.grad_clip, (int, float)) \
            or not 0 <= cfg.grad_clip < math.inf:
        raise ValueError(f"grad_clip must be a non-negative finite number (0 disables), got {cfg.grad_clip!r}")
    if isinstance(cfg.lr_warmup, bool) or not isinstance(cfg.lr_warmup, int) or cfg.lr_warmup < 0:
        raise ValueError(f"lr_warmup must be a non-negative integer, got {cfg.lr_warmup!r}")
    if cfg.hidden is None:    # a ready network (model=nn.Module): nothing to build
        pass
    elif not cfg.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in cfg.hidden):
        raise ValueError(f"hidden must be a non-empty sequence of positive integers, got {cfg.hidden!r}")
    if cfg.coupling not in ("independent", "ot"):
        raise ValueError(f"coupling must be 'independent' or 'ot', got {cfg.coupling!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")


# --- data ------------------------------------------------------------------------------------

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_batch(x, dims: tuple | None, what: str, images: bool = False) -> torch.Tensor:
    """Validate a data tensor (n, d) (or (n, *dims) with `images`, for a ready network);
    `dims` is the expected (d,) or None to accept any."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"data must give a torch.Tensor (n, d), {what} gave {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"data must have shape (n, d), {what} has shape {tuple(x.shape)}; "
                         "use data[:, None] for 1-D data")
    if x.shape[0] == 0:
        raise ValueError(f"data is empty: {what} has shape {tuple(x.shape)}")
    if x.ndim > 2 and not images and all(s == 1 for s in x.shape[2:]):
        raise ValueError(f"data must have shape (n, d), {what} has shape {tuple(x.shape)}; "
                         f"drop the trailing axes of size 1 (data.reshape(len(data), -1))")
    if x.ndim > 2 and not images:
        raise ValueError(
            f"data must have shape (n, d), {what} has shape {tuple(x.shape)}: image-shaped data needs a "
            "convolutional velocity network passed as model= (e.g. tiltflow.models.unet.SmallUNetVelocity); "
            "flatten to (n, d) to use the MLP")
    if x.is_complex() or not (x.is_floating_point() or x.dtype in _INT_DTYPES):
        raise ValueError(f"data must be a real floating-point tensor, {what} has dtype {x.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"data must be a floating-point tensor, {what} has dtype {x.dtype}; convert with "
                         ".float() (and standardise: integer codes are rarely the scale a flow should learn)")
    if x[0].numel() == 0:
        raise ValueError(f"data must have at least one feature, {what} has shape {tuple(x.shape)}")
    if dims is not None and tuple(x.shape[1:]) != dims:
        raise ValueError(f"data gave shape {tuple(x.shape)} ({what}), expected (n, {', '.join(map(str, dims))})")
    bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(dim=1).sum())
    if bad:
        raise ValueError(f"data has {bad} of {x.shape[0]} rows with NaN or inf ({what})")
    return x


class _Data:
    """Uniform access to a data tensor, a sampler with `.sample(n, generator=)`, or a callable."""

    def __init__(self, data, cond, seed: int, images: bool = False):
        if hasattr(data, "__array__") and not isinstance(data, torch.Tensor) and not callable(data):
            data = torch.as_tensor(data)
        self.tensor = self.sampler = None
        self.images = images
        if isinstance(data, torch.Tensor):
            self.tensor = _check_batch(data.detach(), None, "the tensor", images)
            self.dims = tuple(self.tensor.shape[1:])
            self.description = f"tensor of shape {tuple(self.tensor.shape)}"
        elif callable(getattr(data, "sample", None)) or callable(data):
            sample = data.sample if callable(getattr(data, "sample", None)) else data
            self.sampler = (lambda n, g: sample(n, generator=g)) if sample is not data else data
            # a private generator: probing the shape must not consume the training stream
            probe = self.sampler(2, torch.Generator().manual_seed(seed))
            self.dims = tuple(_check_batch(probe, None, "a probe batch of 2", images).shape[1:])
            self.description = _describe(data)
        else:
            raise ValueError("data must be a tensor (n, d), an object with .sample(n, generator=...) "
                             f"or a callable (n, generator) -> tensor; got {type(data).__name__}")
        self.cond = None
        if cond is not None:
            if self.tensor is None:
                raise ValueError("cond must be paired row by row with tensor data; "
                                 "pass data as a tensor (n, d) with cond (n, cond_dim)")
            cond = torch.as_tensor(cond).detach()
            if cond.ndim != 2 or cond.shape[0] != self.tensor.shape[0]:
                raise ValueError(f"cond must have shape ({self.tensor.shape[0]}, cond_dim) to match data, "
                                 f"got {tuple(cond.shape)}; use cond[:, None] for one value per row")
            if cond.is_complex() or cond.dtype == torch.bool:
                raise ValueError(f"cond must be a real number tensor, got dtype {cond.dtype}")
            cond = cond.float() if not cond.is_floating_point() else cond
            bad = int((~torch.isfinite(cond)).any(dim=1).sum())
            if bad:
                raise ValueError(f"cond has {bad} of {cond.shape[0]} rows with NaN or inf")
            self.cond = cond

    @property
    def cond_dim(self) -> int:
        return 0 if self.cond is None else self.cond.shape[1]

    def draw(self, n: int, generator: torch.Generator):
        """n rows (with replacement for a tensor): returns (x (n, d), cond (n, cond_dim) or None)."""
        if self.tensor is not None:
            idx = torch.randint(self.tensor.shape[0], (n,), generator=generator)
            c = None if self.cond is None else self.cond[idx.to(self.cond.device)]
            return self.tensor[idx.to(self.tensor.device)], c
        return _check_batch(self.sampler(n, generator), self.dims, "the sampler", self.images), None

    def reference(self, n: int, generator: torch.Generator):
        """Rows to compare samples with: fresh draws, or distinct rows of a tensor."""
        if self.tensor is None:
            return self.draw(n, generator)
        idx = torch.randperm(self.tensor.shape[0], generator=generator)[:n]
        c = None if self.cond is None else self.cond[idx.to(self.cond.device)]
        return self.tensor[idx.to(self.tensor.device)], c


def _describe(data) -> str:
    """A description that is the same in every process (config.json must match on resume)."""
    if isinstance(data, (FunctionType, MethodType, BuiltinFunctionType, partial)):
        fn = data.func if isinstance(data, partial) else data     # their reprs hold addresses
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    if type(data).__repr__ is not object.__repr__:
        return repr(data)
    return type(data).__qualname__


# --- coupling --------------------------------------------------------------------------------

def _import_ot():
    try:
        import ot
    except ImportError as e:
        raise ImportError("coupling='ot' needs POT: pip install 'tiltflow[ot]'") from e
    return ot


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Exact minibatch OT matching of x0 to x1 on the cost ‖x0_i − x1_j‖².

    x0, x1: (batch, *dims). Returns perm (batch,) long such that (x0[perm], x1) are the optimal
    pairs. With uniform weights 1/n on both sides the network simplex returns a vertex of the
    Birkhoff polytope, a permutation matrix, so the argmax of each row of the plan is a
    permutation and both marginals are preserved exactly.
    """
    ot = _import_ot()
    n = x0.shape[0]
    a = x0.detach().reshape(n, -1).double().cpu().numpy()
    b = x1.detach().reshape(n, -1).double().cpu().numpy()
    w = [1.0 / n] * n
    plan = ot.emd(w, w, ot.dist(a, b, metric="sqeuclidean"))
    col = torch.as_tensor(plan.argmax(axis=1))           # x0_i is sent to x1_col[i]
    perm = torch.empty(n, dtype=torch.long)
    if torch.unique(col).numel() != n:                   # emd stopped early: not a vertex
        warnings.warn("ot.emd did not return a permutation; using the independent pairing for this batch")
        return torch.arange(n, device=x0.device)
    perm[col] = torch.arange(n)
    return perm.to(x0.device)


# --- network ---------------------------------------------------------------------------------

def _is_graph(cond) -> bool:
    return all(hasattr(cond, a) for a in ("atomic_numbers", "bonds", "bond_orders"))


def _network(model, cond, hidden):
    """Returns (build(dims, cond_dim) -> velocity net, per-row cond for _Data, whether the net is
    not an MLP (config.json then records net.config()), the resolved hidden).

    model "mlp": MLPVelocity(d, hidden) with `cond` a per-row tensor; "egnn": EGNNVelocity over the
    molecular graph `cond` (task.graph), hidden = (width,) * layers; an nn.Module: a copy of it.
    """
    if isinstance(model, nn.Module):
        if hidden is not None:
            raise ValueError("hidden sets the width of a network pretrain builds; with a ready network "
                             "(model=nn.Module) leave it unset")
        if cond is not None and _is_graph(cond):
            raise ValueError("with a ready network the graph is already part of it; drop cond")
        if not callable(getattr(model, "config", None)):
            raise ValueError(f"model={type(model).__name__} needs a .config() method (saved with the "
                             "weights so FlowModel.load can rebuild it), like the networks in tiltflow.models")
        ready = copy.deepcopy(model).cpu().float()       # the caller's network is not trained in place
        return (lambda dims, cond_dim: copy.deepcopy(ready)), cond, True, None
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, MODELS))} or an nn.Module velocity "
                         f"network, got {model!r}")
    hidden = DEFAULT_HIDDEN[model] if hidden is None else (tuple(hidden) if isinstance(hidden, (list, tuple)) else hidden)
    if model == "mlp":
        if cond is not None and _is_graph(cond):
            raise ValueError("cond is a molecular graph: pretrain the E(3)-equivariant network with "
                             "model='egnn', cond=task.graph")
        return (lambda dims, cond_dim: MLPVelocity(dims[0], hidden, cond_dim=cond_dim)), cond, False, hidden
    if cond is None or not _is_graph(cond):
        raise ValueError("model='egnn' needs cond=the molecular graph (task.graph of "
                         "tiltflow.tasks.molecules.conformers), got "
                         + ("nothing" if cond is None else type(cond).__name__))
    if not isinstance(hidden, tuple) or len(set(hidden)) != 1:
        raise ValueError(f"model='egnn' takes hidden=(width,) * layers with one width, got {hidden!r}")
    graph = cond

    def build(dims, cond_dim):
        if dims != (3 * graph.num_atoms,):
            raise ValueError(f"data has shape (n, {', '.join(map(str, dims))}) but the graph has "
                             f"{graph.num_atoms} atoms: model='egnn' needs (n, {3 * graph.num_atoms}) coordinates")
        return EGNNVelocity.from_graph(graph, hidden=hidden[0], layers=len(hidden))
    return build, None, True, hidden


# --- loss ------------------------------------------------------------------------------------

def cfm_loss(model: FlowModel, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """Conditional flow matching loss mean_i ‖v(x_t, t) − u_t‖², ‖·‖² summed over dims.

    x0, x1: (batch, *dims) paired; t: (batch,). Returns a scalar tensor.
    """
    xt, u = model.path.interpolate(x0, x1, t)
    err = model.velocity(xt, t, cond) - u
    return err.pow(2).reshape(err.shape[0], -1).sum(1).mean()


def _minibatch(data: _Data, cfg: PretrainConfig, n: int, gen: torch.Generator, device):
    """Draw n (x0, x1, t, cond) in a fixed order from `gen`; x0 permuted by OT if asked."""
    x1, c = data.draw(n, gen)
    x0 = torch.randn(x1.shape, generator=gen)
    t = torch.rand(n, generator=gen)
    if cfg.coupling == "ot":
        x0 = x0[ot_pairing(x0, x1).cpu()]
    return x0.to(device), x1.to(device), t.to(device), (None if c is None else c.to(device))


@torch.no_grad()
def _update_ema(ema: FlowModel, model: FlowModel, decay: float, step: int):
    # Decay warm-up min(decay, (1 + k)/(10 + k)) as in TensorFlow's ExponentialMovingAverage with
    # num_updates: without it 0.999^k of the random initialisation stays in a short run's average.
    d = min(decay, (1.0 + step) / (10.0 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - d)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


# --- training loop ---------------------------------------------------------------------------

def pretrain(data, steps: int = 2000, *, batch_size: int = 256, lr: float = 1e-3,
             hidden=None, path="rectified", coupling: str = "independent",
             ema: float = 0.999, grad_clip: float = 1.0, seed: int = 0, device="auto", out=None,
             resume: bool = False, progress: bool = True, checkpoint_every: int = 500,
             lr_warmup: int = 0, grad_accum: int = 1, max_nonfinite: int = 5, cond=None,
             model="mlp") -> FlowModel:
    """Train a FlowModel on `data` by conditional flow matching.

    data: a tensor (n, d) (minibatches drawn with replacement), an object with
      `.sample(n, generator=...) -> (n, d)` (the toy2d distributions), or a callable
      `(n, generator) -> (n, d)`. Vector data for the built-in networks; with a ready network
      (model=nn.Module) data of any shape (n, *dims), e.g. images (n, 1, 8, 8) for the digits U-Net.
    model: the velocity network. "mlp" (default): MLPVelocity(d, hidden), hidden defaulting to
      (256, 256, 256). "egnn": the E(3)-equivariant EGNNVelocity over the atoms of one molecule,
      with cond=task.graph (tiltflow.tasks.molecules) and data (n, atoms * 3) coordinates;
      hidden=(width,) * layers, default (64,) * 4. Or a ready nn.Module velocity net(x, t, cond)
      with a .config() (any tiltflow.models network): a copy of it is trained, its weights as given.
    cond: for the MLP, an optional tensor (n, cond_dim) paired row by row with tensor data; the
      network then takes cond as input and `model.sample(..., cond=...)` samples conditionally.
      For model="egnn", the molecular graph (fixed, part of the network).
    path: "rectified", "vp", an AffinePath, or its config dict. coupling: "independent" or "ot".
    out: run folder (config.json, log.jsonl, metrics.json, model.safetensors, checkpoints/);
      resume=True continues from its newest valid checkpoint (steps may be raised to train longer).
    batch_size is the global batch; grad_accum splits each process's share into micro-batches.
    A step with a NaN or inf loss or gradient is skipped (no weight changes; counted as
    `nonfinite_skipped` in the log); after `max_nonfinite` such steps in a row the run stops
    with FloatingPointError.
    Under torchrun every process trains the same model on its shard; only rank 0 writes `out`.
    Returns the exponential moving average of the weights as a FlowModel in eval mode without
    gradients.
    """
    path = get_path(path) if not isinstance(path, AffinePath) else path
    build_net, cond, not_mlp, hidden = _network(model, cond, hidden)
    cfg = PretrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                         hidden=tuple(hidden) if isinstance(hidden, (list, tuple)) else hidden,
                         path=path.config(), coupling=coupling, ema=ema, grad_clip=grad_clip, seed=seed,
                         device=str(device), checkpoint_every=checkpoint_every, lr_warmup=lr_warmup,
                         grad_accum=grad_accum, max_nonfinite=max_nonfinite)
    _validate(cfg)
    if resume and out is None:
        raise ValueError("resume=True needs out, the run folder to resume from")
    if cfg.coupling == "ot":
        _import_ot()
    world, rank, shards, micro = dist.setup_batches(cfg.batch_size, cfg.grad_accum)
    main = rank == 0
    dev = dist.device(cfg.device, model if isinstance(model, nn.Module) else None)
    cfg.device = dist.device_name(dev)   # the run folder records the device it ran on
    # a ready network (e.g. the digits U-Net) may take data of any shape (n, *dims)
    source = _Data(data, cond, cfg.seed, images=isinstance(model, nn.Module))

    # Initialise from `seed` without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_net(source.dims, source.cond_dim)
    model = FlowModel(net, path, source.dims).to(dev)
    dist.broadcast_module(model)
    avg = model.copy()
    avg.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    mine = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)   # this process's shards
    gens = {i: torch.Generator().manual_seed(dist.shard_seed(cfg.seed, i)) for i in mine}
    names = {i: "train" if i == 0 else f"train_{i}" for i in range(shards)}

    run, start, nonfinite_total = None, 0, 0
    record_cfg = {**asdict(cfg), "data": source.description, "cond_dim": source.cond_dim, "shards": shards}
    if not_mlp:       # only for other networks: MLP runs keep their config hash
        record_cfg["network"] = net.config()
    resumable = ("steps", "grad_accum")
    chash = ckpt.config_hash(record_cfg, resumable)
    if out is not None:
        run = Path(out)
        if main:
            ckpt.prepare_run(out, record_cfg, resume, resumable_keys=resumable)
        log = run / "log.jsonl"
        if resume:
            meta = ckpt.load_latest(run, {"model": model, "ema": avg}, opt, {names[i]: gens[i] for i in mine},
                                    warn=print if main else (lambda msg: None), config_hash=chash)
            start = meta["step"] if meta is not None else 0
            nonfinite_total = meta.get("extra", {}).get("nonfinite_total", 0) if meta is not None else 0
            if start > cfg.steps:
                raise ValueError(f"cannot resume {run} with steps={cfg.steps}: its newest checkpoint is "
                                 f"at step {start}; pass steps >= {start}")
            if main:
                ckpt.truncate_jsonl(log, "step", start)   # records past the checkpoint are rewritten
        elif main and log.exists():
            log.unlink()
    progress = progress and main
    if progress:
        print("tiltflow pretrain: " + " ".join(f"{k}={v}" for k, v in record_cfg.items()))

    t_start = time.perf_counter()
    window_loss, window_gnorm, final_loss = [], [], None
    nonfinite_run = 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc="pretrain", dynamic_ncols=True)
    model.train()
    for step in bar:
        lr_now = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr_now
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in mine:
            x0, x1, t, c = _minibatch(source, cfg, micro, gens[i], dev)
            loss = cfm_loss(model, x0, x1, t, c)
            (loss / cfg.grad_accum).backward()   # mean over micro-batches; over processes below
            loss_sum += float(loss.detach())
        if not math.isfinite(loss_sum):
            # a NaN gradient makes the averaged gradient NaN on every process: all skip alike
            for p in model.parameters():
                p.grad = torch.full_like(p, float("nan"))
        dist.average_gradients(list(model.parameters()))
        gnorm = float(torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        if not math.isfinite(gnorm):     # skip before the step: no NaN weights are written
            nonfinite_run += 1
            nonfinite_total += 1
            if nonfinite_run >= cfg.max_nonfinite:
                raise FloatingPointError(
                    f"{nonfinite_run} steps in a row (up to {step + 1}) had a NaN or inf loss or gradient and "
                    "were skipped; no weights were changed by them. Lower lr or standardise the data")
        else:
            nonfinite_run = 0
            opt.step()
            _update_ema(avg, model, cfg.ema, step)
            window_loss.append(loss_sum / cfg.grad_accum)
            window_gnorm.append(gnorm)
        done = step + 1
        if done % LOG_EVERY == 0 or done == cfg.steps:
            nan = float("nan")                 # a window of skipped steps only
            final_loss = dist.mean({"loss": sum(window_loss) / len(window_loss) if window_loss else nan})["loss"]
            record = {"step": done, "loss": final_loss,   # loss: mean over processes
                      "grad_norm": sum(window_gnorm) / len(window_gnorm) if window_gnorm else nan,
                      "lr": lr_now, "nonfinite_skipped": nonfinite_total}
            window_loss, window_gnorm = [], []
            bar.set_postfix(loss=f"{final_loss:.4g}")
            if run is not None and main:
                ckpt.append_jsonl(log, record)
        if run is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            states = dist.gather_generator_states(gens)          # collective: every process
            if main:
                ckpt.save_checkpoint(run, done, {"model": model, "ema": avg}, opt,
                                     {names[i]: s for i, s in states.items()},
                                     extra={"shards": shards, "nonfinite_total": nonfinite_total},
                                     config_hash=chash)
    bar.close()

    avg.eval()
    if run is not None and main:
        avg.save(run / "model.safetensors")
        metrics = {"steps": cfg.steps, "final_loss": final_loss,
                   "train_time_s": time.perf_counter() - t_start, **_evaluate(avg, source, cfg)}
        ckpt.write_json(run / "metrics.json", metrics)
        if progress:
            print("tiltflow pretrain: " + json.dumps(metrics))
    return avg


@torch.no_grad()
def _evaluate(model: FlowModel, source: _Data, cfg: PretrainConfig) -> dict:
    """Energy distance of N_EVAL model samples (ODE, Heun) to N_EVAL data rows.

    For a sampler the reference is fresh data, and a second fresh batch gives the noise floor of
    the estimate; for a tensor it is distinct training rows (at most n).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)   # not the training stream
    ref, c = source.reference(N_EVAL, gen)
    n = ref.shape[0]
    if n < 2:
        return {}
    x = model.sample(n, steps=EVAL_ODE_STEPS, seed=cfg.seed + 2,
                     cond=None if c is None else c.to(model.device))
    if not torch.isfinite(x).all():
        return {"energy_distance": float("nan"), "energy_distance_reference": "model samples not finite"}
    out = {"energy_distance": energy_distance(x.cpu(), ref.cpu()), "energy_distance_n": n}
    if source.tensor is None:
        out["energy_distance_reference"] = "fresh data samples"
        out["energy_distance_noise_floor"] = energy_distance(source.reference(N_EVAL, gen)[0], ref)
    else:
        out["energy_distance_reference"] = "training rows"
    return out
