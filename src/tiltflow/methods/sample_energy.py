"""sample_energy: train a sampler for exp(−E(x)) by Adjoint Sampling with a replay buffer.

Sampling is a tilt of a simple prior process: the base is the memoryless process of Gaussian data
N(0, s² I) (s = `prior_scale`) and the reward is g(x) = −E(x) − log N(x; 0, s² I), λ = 1, so
p_base · e^g ∝ e^{−E}. The base is Gaussian, hence its lean adjoint is deterministic and the
Adjoint Sampling loss (solvers/adjoint_sampling.py) regresses on bridge points X_t ~ N(t X_1,
(1 − t)² I) of end points X_1 kept in a FIFO replay buffer with their ∇E(X_1): one rollout of
`samples_per_rollout` paths serves `iters_per_rollout` optimiser steps (Havens et al. 2025, Alg. 1).

Particle systems (energies with `project`): the prior, every velocity and every noise are
projected onto the mean-free subspace, so samples have zero centre of mass. The control added to
the prior's velocity is `network="mlp"` (flattened coordinates: particles treated as labelled,
the symmetry learned only from data) or `network="egnn"` (the paper's choice: the E(n)- and
permutation-equivariant EGNNVelocity over n identical particles, for energies with `n_particles`
and `spatial_dim`; its coordinate outputs start at zero so the sampler starts at the prior). The
isotropic prior's velocity is a multiple of x, hence equivariant too: so is the whole sampler,
and the law of its samples is invariant under rotations, reflections and relabelling of particles.

Run folders (`out=`): config.json, log.jsonl (one record per rollout: "iter", "epoch" = rollouts
so far, the loss averaged over the rollout's iterations, its energies), checkpoints/ every
`checkpoint_every` iterations rounded to whole rollouts (weights, optimiser, replay buffer and
random streams, written atomically by checkpoint.py; the loop is training.Trainer) and the final
sampler in model.safetensors (`EnergySampler.load`). `resume=True` continues from the newest valid
checkpoint; only `iters` may change on resume.

Data parallel (torchrun / accelerate launch, distributed.py), as finetune: the rollout of
`samples_per_rollout` paths and each gradient step's `batch_size` are cut into processes ×
grad_accum shards, shard i drawing from a generator seeded by distributed.shard_seed(seed, i).
Each process rolls out its shards and evaluates ∇E on them; the end points are gathered so the
replay buffer is the same in every process (rank 0 checkpoints it); each micro-batch is drawn
from that buffer with its shard's generator; gradients are averaged before clipping; rank 0
alone writes the run folder.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch

from .. import distributed as dist
from .. import estimators
from ..models.analytic import GaussianMixtureVelocity
from ..models.egnn import EGNNVelocity
from ..models.flow_model import FlowModel, ResidualVelocity
from ..solvers.adjoint_sampling import AdjointSampling
from ..solvers.reciprocal import control_regression
from .finetune import make_finetune_model
from ..training import Trainer, cosine, read_log
from .. import validation as val


@dataclass
class EnergyConfig:
    """Settings of one energy-sampler run."""
    prior_scale: float = 1.0        # s: base data N(0, s² I); should cover the target's spread
    iters: int = 4000               # optimiser steps in all
    iters_per_rollout: int = 20     # optimiser steps per rollout (each rollout adds samples_per_rollout end points)
    samples_per_rollout: int = 256  # rollout paths per rollout, over all processes
    batch_size: int = 256           # replay samples per optimiser step, over all processes (the global batch)
    grad_accum: int = 1             # micro-batches per process and step (gradient accumulation)
    buffer_size: int = 8192         # FIFO capacity of (X_1, ∇E(X_1))
    steps: int = 50                 # memoryless-SDE steps per rollout (uniform grid)
    lr: float = 1e-3
    lr_final: float | None = None   # cosine decay to this value (None: constant)
    network: str = "mlp"            # control network: "mlp" or "egnn" (particles: equivariant, hidden = (width,) * layers)
    hidden: tuple = (128, 128)
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    energy_grad_clip: float | None = 100.0   # max norm of ∇E per sample (Adjoint Sampling's max_grad_E_norm);
    #                                          None or 0: no clipping
    checkpoint_every: int = 400     # optimiser steps between checkpoints of a run folder (out=), rounded to whole rollouts
    max_nonfinite: int = 5          # stop after this many optimiser steps in a row skipped for a NaN/inf loss or gradient
    seed: int = 0
    device: str = "auto"            # "auto": the GPU when there is one, else the CPU
    epochs: int | None = field(default=None, metadata={"deprecated": "iters"})   # iters = epochs × iters_per_rollout
    batches_per_epoch: int | None = field(default=None, metadata={"deprecated": "iters_per_rollout"})
    samples_per_epoch: int | None = field(default=None, metadata={"deprecated": "samples_per_rollout"})

    def __post_init__(self):
        if self.batches_per_epoch is not None:
            self.iters_per_rollout = val.renamed("batches_per_epoch", "iters_per_rollout", self.batches_per_epoch,
                                                 self.iters_per_rollout, 20, "EnergyConfig")
            self.batches_per_epoch = None
        if self.epochs is not None:       # epochs counted rollouts
            val.positive_int(self.epochs, "epochs")
            warnings.warn("EnergyConfig: `epochs` is deprecated, use `iters` (= epochs × iters_per_rollout)",
                          DeprecationWarning, stacklevel=3)
            self.iters = self.epochs * val.positive_int(self.iters_per_rollout, "iters_per_rollout")
            self.epochs = None
        val.resolve_renamed(self, "EnergyConfig")

        val.positive(self.prior_scale, "prior_scale")
        for name in ("iters", "iters_per_rollout", "samples_per_rollout", "batch_size", "buffer_size", "steps",
                     "checkpoint_every", "grad_accum", "max_nonfinite"):
            val.positive_int(getattr(self, name), name)
        val.non_negative(self.lr, "lr")
        if self.lr_final is not None:
            val.in_interval(self.lr_final, "lr_final", 0.0, self.lr, lo_open=False)
        val.non_negative(self.grad_clip, "grad_clip")
        val.optional(val.non_negative, self.energy_grad_clip, "energy_grad_clip")
        val.one_of(self.network, "network", ("mlp", "egnn"))
        self.hidden = val.int_tuple(self.hidden, "hidden")
        if self.network == "egnn" and len(set(self.hidden)) != 1:
            raise ValueError(f"network='egnn' takes hidden=(width,) * layers with one width, got {self.hidden!r}")


class EnergySampler:
    """A trained sampler for exp(−E): `sample(n)`, `log_Z(n)` (Crooks estimate), `model`, `history`."""

    def __init__(self, model: FlowModel, energy: Callable, project: Callable | None, config: EnergyConfig,
                 history: list):
        self.model, self.energy, self.project, self.config, self.history = model, energy, project, config, history

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        """n samples (n, dim) from the trained memoryless SDE (exponential steps to t = 1)."""
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        grid = torch.linspace(0.0, 1.0, (steps or self.config.steps) + 1, dtype=torch.float64)
        xs, _ = estimators.path_rollout(self.model, n, grid, gen, project=self.project)
        return xs[-1].to(torch.get_default_dtype())

    def log_Z(self, n: int = 4096, steps: int | None = None, seed: int = 0, target_samples=None
              ) -> estimators.PathWeights | estimators.TwoSidedWeights:
        """Crooks weights: log ∫ exp(−E) (over the mean-free subspace for particles), ESS, reweighting.
        With target_samples (n_R, dim) of exp(−E) (e.g. long MCMC): the two-sided BAR estimate."""
        if target_samples is not None:
            return estimators.crooks_two_sided(self.model, lambda x: -self.energy(x), target_samples, n,
                                               steps or self.config.steps, seed, project=self.project)
        return estimators.crooks(self.model, lambda x: -self.energy(x), n, steps or self.config.steps, seed,
                                 project=self.project)

    def save(self, path) -> Path:
        """Write the trained model (weights and architecture) to one safetensors file."""
        return self.model.save(path)

    @classmethod
    def load(cls, path, energy: Callable, project: Callable | None = None, device=None) -> "EnergySampler":
        """The sampler saved at `path` (model.safetensors of a run folder, or any `save` file) for
        `energy`. Its EnergyConfig comes from the config.json beside it when there is one."""
        model = FlowModel.load(path, device=device)
        model.requires_grad_(False)
        cfg_file = Path(path).with_name("config.json")
        known = {f.name for f in fields(EnergyConfig)}
        saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        saved = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in known}
        res = getattr(model.net, "residual", None)     # the architecture in the file wins over config.json
        if isinstance(res, EGNNVelocity):
            saved.update(network="egnn", hidden=(res.hidden,) * res.n_layers)
        elif res is not None:
            saved.update(network="mlp")
        history = read_log(Path(path).with_name("log.jsonl"))
        return cls(model.eval(), energy, project if project is not None else getattr(energy, "project", None),
                   EnergyConfig(**saved), history)


class ReplayBuffer(torch.nn.Module):
    """FIFO of end points X_1 and ã(1) with fixed storage (so checkpoints have fixed shapes):
    the first `count` rows are filled, oldest first."""

    def __init__(self, size: int, dim: int, device=None):
        super().__init__()
        self.register_buffer("x", torch.zeros(size, dim, device=device))
        self.register_buffer("a", torch.zeros(size, dim, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))

    def add(self, x: torch.Tensor, a: torch.Tensor) -> None:
        m, size = int(self.count), len(self.x)
        x, a = torch.cat([self.x[:m], x])[-size:], torch.cat([self.a[:m], a])[-size:]
        self.x[:len(x)], self.a[:len(a)] = x, a
        self.count.fill_(len(x))

    def sample(self, n: int, generator: torch.Generator):
        idx = torch.randint(int(self.count), (n,), generator=generator, device=self.x.device)
        return self.x[idx], self.a[idx]


def gaussian_prior(dim: int, scale: float) -> FlowModel:
    """The base FlowModel: exact velocity of N(0, scale² I) data."""
    return FlowModel(GaussianMixtureVelocity([1.0], torch.zeros(1, dim), scale**2 * torch.eye(dim)[None]))


def make_control(prior: FlowModel, energy, cfg: EnergyConfig) -> FlowModel:
    """The model to train: the frozen prior plus a control network that starts at zero."""
    if cfg.network == "mlp":
        return make_finetune_model(prior, "residual", cfg.hidden, cfg.seed)
    n, d = getattr(energy, "n_particles", None), getattr(energy, "spatial_dim", None)
    if n is None or d is None or n * d != prior.shape[0]:
        raise ValueError("network='egnn' needs a particle energy with n_particles and spatial_dim "
                         f"(n_particles · spatial_dim = dim); got n_particles={n}, spatial_dim={d}, dim={prior.shape[0]}")
    with torch.random.fork_rng(devices=[]):      # the control's init depends on `seed` only
        torch.manual_seed(cfg.seed)
        egnn = EGNNVelocity.particles(n, d, hidden=cfg.hidden[0], layers=len(cfg.hidden))
    for layer in egnn.layers:        # zero coordinate updates: v_egnn = 0, the sampler starts at the prior
        torch.nn.init.zeros_(layer.coord[-1].weight)
        torch.nn.init.zeros_(layer.coord[-1].bias)
    return FlowModel(ResidualVelocity(prior.copy().net, egnn), prior.path, prior.shape).to(prior.device)


def _energy_grad(energy, x, clip):
    """∇E(x) (batch, dim), each row's norm clipped to `clip` (None or 0: not clipped), and E(x) (batch,).
    A non-finite force is an error: zeroing it would train the sampler on a wrong target."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy(x)
        if e.shape != (x.shape[0],):
            raise ValueError(f"energy must return shape ({x.shape[0]},), got {tuple(e.shape)}")
        (g,) = torch.autograd.grad(e.sum(), x)
    bad = ~torch.isfinite(g).all(1)
    if bad.any():
        name = getattr(energy, "name", type(energy).__name__)
        raise FloatingPointError(
            f"the force ∇E of energy {name!r} is NaN or inf at {int(bad.sum())} of {len(g)} sampler end points "
            f"(E there: {e.detach()[bad][:3].tolist()}); e.g. two particles nearly on top of each other. "
            "Lower lr or raise prior_scale so the sampler stays where E is finite, or evaluate E in float64")
    if clip:
        norm = torch.linalg.vector_norm(g.double(), dim=1, keepdim=True).clamp_min(1e-12)   # float64: no overflow
        g = g * (clip / norm).clamp(max=1.0).to(g.dtype)
    return g, e.detach()


def sample_energy(energy: Callable, dim: int, *, config: EnergyConfig | None = None, project: Callable | None = None,
                  out=None, resume: bool = False, progress: bool = True, callback: Callable | None = None,
                  report_to="none", **kwargs) -> EnergySampler:
    """Train a sampler for exp(−energy(x)), x: (batch, dim); returns an EnergySampler.

    energy: callable (batch, dim) -> (batch,), differentiable. project: map onto the subspace the
    samples live in (defaults to `energy.project` if the energy has one, e.g. mean-free particles).
    kwargs: any EnergyConfig field (iters, iters_per_rollout, samples_per_rollout, lr, ...), set on
    `config` (an EnergyConfig; default: EnergyConfig()). Deprecated: epochs (iters = epochs ×
    iters_per_rollout), batches_per_epoch (iters_per_rollout), samples_per_epoch (samples_per_rollout).
    out: run folder (config.json, log.jsonl with one record per rollout, checkpoints/, model.safetensors);
    resume: continue from its newest valid checkpoint (the energy's `name` and every setting but
    `iters` must match). report_to: "none", "tensorboard" or "wandb" (the log.jsonl records, rank 0),
    or an open tracking.Tracker, left open.
    callback(iter, record) after every rollout's iterations.
    """
    if not callable(energy):
        raise ValueError(f"energy must be callable, got {type(energy).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if config is not None and not isinstance(config, EnergyConfig):
        raise ValueError(f"config must be an EnergyConfig, got {type(config).__name__}")
    unknown = set(kwargs) - set(EnergyConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown sample_energy options {sorted(unknown)}; valid: {sorted(EnergyConfig.__dataclass_fields__)}")
    cfg = replace(config, **kwargs) if config is not None else EnergyConfig(**kwargs)
    if project is None:
        project = getattr(energy, "project", None)
    world, rank, shards, micro = dist.setup_batches(cfg.batch_size, cfg.grad_accum)
    roll = dist.shard_sizes(cfg.samples_per_rollout, shards)     # rollout paths of each shard
    device = dist.device(cfg.device)
    cfg = replace(cfg, device=dist.device_name(device))   # the run folder records the device it ran on
    prior = gaussian_prior(dim, cfg.prior_scale).to(device).eval()
    prior.requires_grad_(False)
    ft = make_control(prior, energy, cfg)
    dist.broadcast_module(ft)
    params = [p for p in ft.parameters() if p.requires_grad]
    mine = range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum)   # this process's shards
    gens = {i: torch.Generator(device=device).manual_seed(dist.shard_seed(cfg.seed, i)) for i in mine}
    grid = torch.linspace(0.0, 1.0, cfg.steps + 1, dtype=torch.float64)
    solver = AdjointSampling()
    s2 = cfg.prior_scale**2
    buffer = ReplayBuffer(cfg.buffer_size, dim, device)     # the same in every process
    per = cfg.iters_per_rollout
    record = {**val.current_fields(cfg), "energy": getattr(energy, "name", type(energy).__name__), "dim": dim,
              "shards": shards}
    trainer = Trainer(
        "sample_energy", params=params, opt=torch.optim.Adam(params, lr=cfg.lr), modules={"model": ft, "buffer": buffer},
        gens=gens, iters=cfg.iters, config=record,
        resumable=("iters", "grad_accum"), lr_at=cosine(cfg.lr, cfg.lr_final, cfg.iters), grad_clip=cfg.grad_clip,
        max_nonfinite=cfg.max_nonfinite, checkpoint_every=max(1, round(cfg.checkpoint_every / per)) * per,
        out=out, resume=resume, progress=progress, report_to=report_to, log_when=lambda done: done % per == 0,
        postfix=("loss", "energy_median"), hint="Lower lr or clip ∇E (energy_grad_clip)",
        banner=" ".join(f"{k}={v}" for k, v in val.current_fields(cfg).items())
        + (f"  processes={world} (micro-batch {micro})" if world > 1 else ""))
    last = {}     # the newest rollout's energies, for the log

    def rollout(it):
        ft.eval()
        parts = []
        for i in mine:          # each shard's rollout and ∇E, then the end points of all shards
            if roll[i] == 0:
                continue
            xs, _ = estimators.path_rollout(ft, roll[i], grid, gens[i], project=project)
            x1 = xs[-1].to(torch.get_default_dtype())
            gE, e = _energy_grad(energy, x1, cfg.energy_grad_clip)
            parts.append(torch.cat([x1, gE - x1 / s2, e[:, None].to(x1.dtype)], 1))   # ã(1) = −∇g
        rows = dist.all_gather(torch.cat(parts) if parts else torch.empty(0, 2 * dim + 1, device=device))
        buffer.add(rows[:, :dim], rows[:, dim:2 * dim])
        e = rows[:, 2 * dim]
        last.update(epoch=it // per + 1, energy_mean=float(e.mean()), energy_median=float(e.median()),
                    t0=time.perf_counter())
        ft.train()

    def step(it):
        if it % per == 0:       # a rollout starts every block of iters_per_rollout optimiser steps
            rollout(it)
        loss_sum = 0.0
        for i in mine:
            gen = gens[i]
            xb, ab = buffer.sample(micro, gen)
            t = (1 + torch.randint(cfg.steps - 1, (micro,), generator=gen, device=device)).to(xb) / cfg.steps
            eps = torch.randn(xb.shape, generator=gen, device=device)
            if project is not None:
                eps = project(eps)
            x_t = t[:, None] * xb + (1 - t[:, None]) * eps      # bridge of the memoryless base
            T = solver.target(prior, xb, ab, x_t, eps, t)
            loss, _ = control_regression(ft, prior, x_t, t, T)
            (loss / cfg.grad_accum).backward()   # mean over micro-batches; over processes in the loop
            loss_sum += float(loss.detach()) / cfg.grad_accum
        info = {k: v for k, v in last.items() if k != "t0"}
        if "t0" in last:
            info["time"] = time.perf_counter() - last["t0"]
        return {"loss": loss_sum}, info

    trainer.run(step, callback=callback)
    ft.eval()
    ft.requires_grad_(False)
    sampler = EnergySampler(ft, energy, project, cfg, trainer.records)
    if out is not None and dist.is_main():
        sampler.save(Path(out) / "model.safetensors")
    dist.barrier()   # the run folder is complete before any process returns
    return sampler
