"""pretrain: fit a FlowModel to data by conditional flow matching.

For x1 ~ data, x0 ~ N(0, I), t ~ U(0, 1) and the path x_t = α_t x1 + β_t x0,

    L(θ) = E ‖v_θ(x_t, t) − (α̇_t x1 + β̇_t x0)‖²        (Lipman et al. 2023, CFM loss, eq. (9))

whose minimiser is the marginal velocity v(x, t) = E[α̇_t x1 + β̇_t x0 | x_t = x]. The norm is
summed over data dimensions and averaged over the minibatch.

coupling="ot" pairs the x0 and x1 of each minibatch by exact optimal transport on the squared
Euclidean cost (OT-CFM, Tong et al. 2024). For equal uniform weights the optimal plan is a
permutation, so the pairs still have the marginals N(0, I) and data: the learned distribution is
unchanged, only the paths are straighter.

coupling="equivariant" aligns each x0 to its own x1 by the network's symmetry group, node
permutations and proper rotations (x0 ← g*·x0, g* = argmin_g ‖g·x0 − x1‖²; equivariant flow
matching, Klein et al. 2023; couplings.equivariant_pairing). N(0, I) is invariant and the network
equivariant, so the law of generated samples up to the group is unchanged and the paths shorter.
The network says which symmetries it has in its `symmetry` attribute (nodes, coords, permute).

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
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import BuiltinFunctionType, FunctionType, MethodType
from typing import Callable

import torch
from torch import nn

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..couplings import equivariant_pairing, ot_pairing, require_ot
from ..metrics import energy_distance
from ..models.flow_model import FlowModel
from ..models.mlp import MLPVelocity
from ..models.egnn import EGNNVelocity
from ..paths import AffinePath, get_path
from ..tracking import get_logger
from ..training import Trainer, update_ema, warmup
from .. import validation as val

LOG_EVERY = 50          # iterations averaged into one log.jsonl record
N_EVAL = 2000           # model and data samples for the final energy distance
EVAL_ODE_STEPS = 50     # Heun steps of the evaluation samples
MODELS = ("mlp", "egnn")                                              # networks pretrain builds
DEFAULT_HIDDEN = {"mlp": (256, 256, 256), "egnn": (64, 64, 64, 64)}   # hidden=None means these


@dataclass
class PretrainConfig:
    """Settings of one flow-matching pretraining run (printed and saved in the run folder)."""
    iters: int = 2000                  # optimiser steps (one minibatch each)
    batch_size: int = 256              # minibatch per step, over all processes (the global batch)
    grad_accum: int = 1                # micro-batches per process and step (gradient accumulation)
    lr: float = 1e-3                   # Adam learning rate (after warm-up)
    hidden: tuple = (256, 256, 256)    # widths of the MLP velocity network (EGNN: (width,) * layers)
    path: str | dict = "rectified"     # probability path: a name or AffinePath.config()
    coupling: str = "independent"      # "independent", "ot" (minibatch exact OT) or "equivariant" (node networks)
    ema: float = 0.999                 # decay of the weight average the returned model uses
    grad_clip: float = 1.0             # max global gradient norm; 0 disables clipping
    seed: int = 0
    device: str = "auto"             # "auto": a ready network's accelerator, else the GPU if any, else the CPU
    checkpoint_every: int = 500
    lr_warmup: int = 0                 # iterations of linear learning-rate warm-up from 0
    max_nonfinite: int = 5             # stop after this many iterations in a row skipped for a NaN/inf loss or gradient
    steps: int | None = field(default=None, metadata={"deprecated": "iters"})

    def __post_init__(self):
        val.resolve_renamed(self, "PretrainConfig")
        for name in ("iters", "batch_size", "checkpoint_every", "grad_accum", "max_nonfinite"):
            val.positive_int(getattr(self, name), name)
        val.positive(self.lr, "lr")
        val.in_interval(self.ema, "ema", 0.0, 1.0, lo_open=False, hi_open=True)
        val.non_negative(self.grad_clip, "grad_clip")
        val.positive_int(self.lr_warmup, "lr_warmup", minimum=0)
        self.hidden = val.optional(val.int_tuple, self.hidden, "hidden")   # None: a ready network's
        val.one_of(self.coupling, "coupling", ("independent", "ot", "equivariant"))
        val.integer(self.seed, "seed")


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
                             "(network=nn.Module) leave it unset")
        if cond is not None and _is_graph(cond):
            raise ValueError("with a ready network the graph is already part of it; drop cond")
        if not callable(getattr(model, "config", None)):
            raise ValueError(f"model={type(model).__name__} needs a .config() method (saved with the "
                             "weights so FlowModel.load can rebuild it), like the networks in tiltflow.models")
        ready = copy.deepcopy(model).cpu().float()       # the caller's network is not trained in place
        return (lambda dims, cond_dim: copy.deepcopy(ready)), cond, True, None
    if model not in MODELS:
        raise ValueError(f"network must be one of {', '.join(map(repr, MODELS))} or an nn.Module velocity "
                         f"network, got {model!r}")
    hidden = DEFAULT_HIDDEN[model] if hidden is None else (tuple(hidden) if isinstance(hidden, (list, tuple)) else hidden)
    if model == "mlp":
        if cond is not None and _is_graph(cond):
            raise ValueError("cond is a molecular graph: pretrain the E(3)-equivariant network with "
                             "network='egnn', cond=task.graph")
        return (lambda dims, cond_dim: MLPVelocity(dims[0], hidden, cond_dim=cond_dim)), cond, False, hidden
    if cond is None or not _is_graph(cond):
        raise ValueError("network='egnn' needs cond=the molecular graph (task.graph of "
                         "tiltflow.tasks.molecules.conformers), got "
                         + ("nothing" if cond is None else type(cond).__name__))
    if not isinstance(hidden, tuple) or len(set(hidden)) != 1:
        raise ValueError(f"network='egnn' takes hidden=(width,) * layers with one width, got {hidden!r}")
    graph = cond

    def build(dims, cond_dim):
        if dims != (3 * graph.num_atoms,):
            raise ValueError(f"data has shape (n, {', '.join(map(str, dims))}) but the graph has "
                             f"{graph.num_atoms} atoms: network='egnn' needs (n, {3 * graph.num_atoms}) coordinates")
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


def _minibatch(data: _Data, cfg: PretrainConfig, n: int, gen: torch.Generator, device, symmetry=None):
    """Draw n (x0, x1, t, cond) in a fixed order from `gen`; x0 permuted by OT, or aligned to its
    x1 by the network's `symmetry` (couplings.equivariant_pairing), if asked."""
    x1, c = data.draw(n, gen)
    x0 = torch.randn(x1.shape, generator=gen)
    t = torch.rand(n, generator=gen)
    if cfg.coupling == "ot":
        x0 = x0[ot_pairing(x0, x1).cpu()]
    elif cfg.coupling == "equivariant":
        x0 = equivariant_pairing(x0, x1, **symmetry)
    return x0.to(device), x1.to(device), t.to(device), (None if c is None else c.to(device))


# --- training loop ---------------------------------------------------------------------------

def pretrain(data, iters: int | None = None, *, config: PretrainConfig | None = None, network="mlp",
             hidden=None, path=None, cond=None, out=None, resume: bool = False, progress: bool = True,
             callback: Callable | None = None, report_to="none", n_eval: int = N_EVAL,
             steps: int | None = None, model=None, **kwargs) -> FlowModel:
    """Train a FlowModel on `data` by conditional flow matching.

    data: a tensor (n, d) (minibatches drawn with replacement), an object with
      `.sample(n, generator=...) -> (n, d)` (the toy2d distributions), or a callable
      `(n, generator) -> (n, d)`. Vector data for the built-in networks; with a ready network
      (network=nn.Module) data of any shape (n, *dims), e.g. images (n, 1, 8, 8) for the digits U-Net.
    iters and kwargs (any PretrainConfig field: batch_size, lr, coupling, ema, grad_clip, seed,
      device, checkpoint_every, lr_warmup, grad_accum, max_nonfinite) set on `config` (a
      PretrainConfig; default: PretrainConfig()).
    network: the velocity network. "mlp" (default): MLPVelocity(d, hidden), hidden defaulting to
      (256, 256, 256). "egnn": the E(3)-equivariant EGNNVelocity over the atoms of one molecule,
      with cond=task.graph (tiltflow.tasks.molecules) and data (n, atoms * 3) coordinates;
      hidden=(width,) * layers, default (64,) * 4. Or a ready nn.Module velocity net(x, t, cond)
      with a .config() (any tiltflow.models network): a copy of it is trained, its weights as given.
    cond: for the MLP, an optional tensor (n, cond_dim) paired row by row with tensor data; the
      network then takes cond as input and `model.sample(..., cond=...)` samples conditionally.
      For network="egnn", the molecular graph (fixed, part of the network).
    path: "rectified", "vp", an AffinePath, or its config dict (default: the config's, "rectified").
    out: run folder (config.json, log.jsonl, metrics.json, model.safetensors, checkpoints/);
      resume=True continues from its newest valid checkpoint (iters may be raised to train longer).
    report_to: "none", "tensorboard" or "wandb" (the log.jsonl records, rank 0), or an open
      tracking.Tracker, left open.
    n_eval: model samples (and data rows) of the energy distance in metrics.json (0: none; it costs
      n_eval ODE samples of 50 steps, much for a large network).
    callback(iter, record) after each logged record (every 50 iterations and the last).
    batch_size is the global batch; grad_accum splits each process's share into micro-batches.
    An iteration with a NaN or inf loss or gradient is skipped (no weight changes; counted as
    `nonfinite_skipped` in the log); after `max_nonfinite` such iterations in a row the run stops
    with FloatingPointError.
    Under torchrun every process trains the same model on its shard; only rank 0 writes `out`.
    Deprecated: steps= (use iters=), model= (use network=).
    Returns the exponential moving average of the weights as a FlowModel in eval mode without
    gradients.
    """
    if model is not None:
        network = val.renamed("model", "network", model, network, "mlp", "pretrain")
    val.positive_int(n_eval, "n_eval", minimum=0)
    if config is not None and not isinstance(config, PretrainConfig):
        raise ValueError(f"config must be a PretrainConfig, got {type(config).__name__}")
    unknown = set(kwargs) - set(PretrainConfig.__dataclass_fields__) - {"hidden", "path", "iters", "steps"}
    if unknown:
        raise ValueError(f"unknown pretrain options {sorted(unknown)}; valid: "
                         f"{sorted(k for k in PretrainConfig.__dataclass_fields__ if k != 'steps')}")
    if path is None:
        path = config.path if config is not None else "rectified"
    path = get_path(path) if not isinstance(path, AffinePath) else path
    if hidden is None and config is not None and not isinstance(network, nn.Module):
        hidden = config.hidden
    build_net, cond, not_mlp, hidden = _network(network, cond, hidden)
    given = {**kwargs, "path": path.config(), "hidden": tuple(hidden) if isinstance(hidden, (list, tuple)) else hidden,
             **({"iters": iters} if iters is not None else {}), **({"steps": steps} if steps is not None else {})}
    cfg = replace(config, **given) if config is not None else PretrainConfig(**given)
    if cfg.coupling in ("ot", "equivariant"):
        require_ot(f"coupling={cfg.coupling!r}")   # exact OT (POT), or SciPy's assignment (comes with POT)
    world, rank, shards, micro = dist.setup_batches(cfg.batch_size, cfg.grad_accum)
    dev = dist.device(cfg.device, network if isinstance(network, nn.Module) else None)
    cfg = replace(cfg, device=dist.device_name(dev))   # the run folder records the device it ran on
    # a ready network (e.g. the digits U-Net) may take data of any shape (n, *dims)
    source = _Data(data, cond, cfg.seed, images=isinstance(network, nn.Module))

    # Initialise from `seed` without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_net(source.dims, source.cond_dim)
    symmetry = getattr(net, "symmetry", None)
    if cfg.coupling == "equivariant" and symmetry is None:
        raise ValueError(f"coupling='equivariant' needs a network with node symmetries (SE3Velocity, EGNNVelocity: "
                         f"a `symmetry` attribute), got {type(net).__name__}")
    model = FlowModel(net, path, source.dims).to(dev)
    dist.broadcast_module(model)
    avg = model.copy()
    avg.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    mine = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)   # this process's shards
    gens = {i: torch.Generator().manual_seed(dist.shard_seed(cfg.seed, i)) for i in mine}

    record = {**val.current_fields(cfg), "data": source.description, "cond_dim": source.cond_dim, "shards": shards}
    if not_mlp:       # only for other networks: MLP runs keep their config hash
        record["network"] = net.config()
    trainer = Trainer(
        "pretrain", params=model.parameters(), opt=opt, modules={"model": model, "ema": avg}, gens=gens,
        iters=cfg.iters, config=record,
        resumable=("iters", "grad_accum"), lr_at=warmup(cfg.lr, cfg.lr_warmup), grad_clip=cfg.grad_clip,
        max_nonfinite=cfg.max_nonfinite, checkpoint_every=cfg.checkpoint_every, out=out, resume=resume,
        progress=progress, report_to=report_to, log_when=lambda done: done % LOG_EVERY == 0,
        after_step=lambda it: update_ema(avg, model, cfg.ema, it), hint="Lower lr or standardise the data",
        banner=" ".join(f"{k}={v}" for k, v in record.items()))

    def step(it):
        loss_sum = 0.0
        for i in mine:
            x0, x1, t, c = _minibatch(source, cfg, micro, gens[i], dev, symmetry)
            loss = cfm_loss(model, x0, x1, t, c)
            (loss / cfg.grad_accum).backward()   # mean over micro-batches; over processes in the loop
            loss_sum += float(loss.detach())
        return {"loss": loss_sum / cfg.grad_accum}, {}

    t_start = time.perf_counter()
    model.train()
    last = trainer.run(step, callback=callback)
    avg.eval()
    if out is not None and dist.is_main():
        avg.save(Path(out) / "model.safetensors")
        metrics = {"iters": cfg.iters, "final_loss": last.get("loss"),
                   "train_time_s": time.perf_counter() - t_start,
                   **(_evaluate(avg, source, cfg, n_eval) if n_eval else {})}
        ckpt.write_json(Path(out) / "metrics.json", metrics)
        if trainer.progress:
            get_logger("pretrain").info("tiltflow pretrain: " + json.dumps(metrics))
    return avg


@torch.no_grad()
def _evaluate(model: FlowModel, source: _Data, cfg: PretrainConfig, n_eval: int = N_EVAL) -> dict:
    """Energy distance of n_eval model samples (ODE, Heun) to n_eval data rows.

    For a sampler the reference is fresh data, and a second fresh batch gives the noise floor of
    the estimate; for a tensor it is distinct training rows (at most n).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)   # not the training stream
    ref, c = source.reference(n_eval, gen)
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
        out["energy_distance_noise_floor"] = energy_distance(source.reference(n_eval, gen)[0], ref)
    else:
        out["energy_distance_reference"] = "training rows"
    return out
