"""Data parallel training through torch.distributed: process group, rank, collectives, seeds.

The training loops (methods/finetune.py, pretrain.py, fdc.py, gft.py, sample_energy.py) use these
few helpers and nothing else of torch.distributed. Launched by `torchrun` (or `accelerate launch`, which sets the same
RANK / WORLD_SIZE / MASTER_ADDR variables), `setup()` opens the process group (NCCL with CUDA,
gloo otherwise) unless the user's script already did; run as a plain process every helper is
the identity and no collective is ever called.

Gradients are averaged with one `all_reduce` of the flattened gradients per optimiser step
(`average_gradients`) rather than by wrapping the network in DistributedDataParallel: an
Adjoint Matching step calls the network many times (rollout, lean adjoint, loss, several
micro-batches) and only some of its parameters train, which DDP's reducer (one forward per
backward through the wrapper, `find_unused_parameters`) handles badly. The arithmetic is the
same as DDP's: the mean over processes of each process's mean-loss gradient.

Random streams are per *shard*: the global batch is cut into world_size × grad_accum equal
micro-batches and micro-batch i always draws from a generator seeded by `shard_seed(seed, i)`.
Process r owns shards r·grad_accum … (r + 1)·grad_accum − 1, so two processes with grad_accum=1
draw exactly what one process with grad_accum=2 draws, and the results agree to rounding.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

SHARD_SEED_STRIDE = 2**32   # shard i seeds seed + i·2³²: no collision with seed + k used elsewhere


def launched() -> bool:
    """True when started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> tuple[int, int]:
    """Open the default process group if launched with several processes; returns (world_size, rank)."""
    if launched() and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return world_size(), rank()


def setup_batches(batch_size: int, grad_accum: int) -> tuple[int, int, int, int]:
    """setup(), then the split of the global `batch_size` into processes × grad_accum equal
    micro-batches: returns (world, rank, shards, micro-batch size); ValueError if it does not divide."""
    world, rank = setup()
    shards = world * grad_accum
    if batch_size % shards:
        raise ValueError(f"batch_size must be divisible by processes × grad_accum = {world} × {grad_accum}, "
                         f"got {batch_size}; it is the global batch, split into equal micro-batches")
    return world, rank, shards, batch_size // shards


def shutdown() -> None:
    """Close the default process group if one is open (the CLI calls this on exit).

    A barrier first: a rank that tears gloo down while another is still in a collective can
    abort the other process ("terminate called without an active exception", seen once in CI).
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End this launched process now with `code`: flush stdout, stderr and logging, then os._exit.

    The tiltflow command calls it under a launcher once its work is done and the group is closed
    (shutdown). A gloo process can otherwise abort in the interpreter's and the C++ runtime's
    teardown ("terminate called without an active exception", SIGABRT; faulthandler shows no
    Python frame left), and torchrun then reports a finished run as failed (seen now and then
    in tests/test_distributed.py's torchrun test, in CI and under load). os._exit
    skips that teardown. atexit handlers are skipped too: the command has closed its files and
    trackers by then. A script of your own that calls tiltflow decides its own exit.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):      # a closed or broken pipe: nothing left to flush to
            pass
    logging.shutdown()
    os._exit(code)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (from the launcher's RANK before the group is open), else 0."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes run folders, logs, checkpoints and progress bars."""
    return rank() == 0


def device(name="auto", model=None) -> torch.device:
    """The device a run uses, resolved in one place for every entry point.

    "auto" (the default everywhere): the model's own device when it already sits on an
    accelerator (so a GPU model is never moved to the CPU), else this process's GPU when
    torch.cuda.is_available(), else the CPU. Under a launcher this process's GPU is
    cuda:LOCAL_RANK, also for a bare "cuda" and for a model on another GPU. Any other name is
    taken as torch.device takes it. ValueError naming `device` if the name is not a device or the
    device is not available.
    """
    if isinstance(name, str) and name == "auto":
        own = _own_device(model)
        if own is not None and own.type != "cpu":
            if own.type != "cuda" or not launched():
                return own
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda', got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} is not available: torch.cuda.is_available() is False; "
                         "use device='auto' or 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA devices")
    if dev.type == "cuda" and dev.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def device_name(dev: torch.device) -> str:
    """How a run folder records the device it ran on: "cuda" under a launcher (the ranks differ only
    in the index, and all must compute the same config hash), else the full name ("cpu", "cuda:1")."""
    return dev.type if launched() else str(dev)


def _own_device(model) -> torch.device | None:
    """The device of a model's first parameter or buffer (a FlowModel's .device), None if it has none."""
    if model is None:
        return None
    if isinstance(model, torch.nn.Module):
        t = next(itertools.chain(model.parameters(), model.buffers()), None)
        return None if t is None else t.device
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else None


def shard_seed(seed: int, shard: int) -> int:
    """Seed of micro-batch stream `shard`; shard 0 keeps `seed` (a one-process run is unchanged)."""
    return seed + shard * SHARD_SEED_STRIDE


def shard_sizes(n: int, shards: int) -> list[int]:
    """n split into `shards` near-equal parts, the larger first."""
    return [n // shards + (i < n % shards) for i in range(shards)]


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on t runs: NCCL on this process's GPU (t's own if it is on one), gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return t.device if t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (n_r, *dims) of every process along dim 0 in rank order; sizes may differ."""
    if not active():
        return x
    dev = _comm_device(x)
    y = x.detach().to(dev).contiguous()
    n = torch.tensor([y.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes) - y.shape[0], *y.shape[1:]), dtype=y.dtype, device=dev)
    parts = [torch.empty((max(sizes), *y.shape[1:]), dtype=y.dtype, device=dev) for _ in sizes]
    dist.all_gather(parts, torch.cat([y, pad]))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over processes (one collective for the whole dict)."""
    if not active() or not values:
        return dict(values)
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    t = t.to(_comm_device(t))
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(values, t.cpu())}


def average_gradients(params: list[torch.Tensor]) -> None:
    """grad ← mean over processes of grad, for every parameter (missing grads count as zeros)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dev = flat.device
    flat = flat.to(_comm_device(flat))
    dist.all_reduce(flat)
    flat = (flat / world_size()).to(dev)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every process (as DDP does at construction)."""
    if not active():
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.bool):
                buf = t.to(_comm_device(t))
                dist.broadcast(buf, 0)
                t.copy_(buf.to(t.device))


def gather_generator_states(gens: dict[int, torch.Generator]) -> dict[int, torch.Tensor]:
    """{shard: generator state} of every process's shards (each process passes its own)."""
    if not active():
        return {i: g.get_state() for i, g in gens.items()}
    ids = torch.tensor(sorted(gens), dtype=torch.int64)
    states = torch.stack([gens[i].get_state() for i in sorted(gens)])
    all_ids, all_states = all_gather(ids), all_gather(states)
    return {int(i): s.cpu() for i, s in zip(all_ids, all_states)}


def barrier() -> None:
    if active():
        dist.barrier()
