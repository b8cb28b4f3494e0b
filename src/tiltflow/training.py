"""training: the one optimisation loop of pretrain, finetune, gradual_finetune and sample_energy.

A method supplies its loss as `step(it) -> (stats, info)`: it draws its micro-batches from its own
generators, backpropagates each micro-batch's loss divided by the number of micro-batches (so the
gradients add up to the mean), and returns the micro-batch means as floats (`stats`, must hold
"loss"; averaged over processes) and anything else for the log (`info`, e.g. a threshold).
The loop owns everything around it, once:

- the run folder: config.json, log.jsonl (one record per logged iteration, key "iter"), atomic
  safetensors checkpoints every `checkpoint_every` iterations and at the end, resume from the
  newest valid checkpoint (weights, optimiser, every random stream, counters, GradScaler);
- the learning rate of each iteration, a pure function of the iteration (resume-safe);
- gradients averaged over processes (data parallel), unscaled (fp16) and clipped to `grad_clip`
  (0 = no clipping);
- the non-finite guard: an iteration whose loss or gradient is NaN/inf on any process is skipped
  on all of them (no weights change) and counted; `max_nonfinite` in a row stop the run with
  FloatingPointError. An fp16 loss-scale overflow (finite loss, inf gradient) is the GradScaler's
  routine skip, not a failure;
- the progress bar, the configuration line (logging), the tracker (TensorBoard / W&B) and the
  callback, on rank 0 only for what writes.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed as dist


# --- learning-rate schedules: iteration -> learning rate ----------------------------------------

def constant(lr: float) -> Callable[[int], float]:
    return lambda it: lr


def cosine(lr: float, lr_final: float | None, iters: int) -> Callable[[int], float]:
    """lr_t = lr_final + ½ (lr − lr_final)(1 + cos(π t / iters)); constant lr when lr_final is None."""
    if lr_final is None:
        return constant(lr)
    return lambda it: lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * it / iters))


def warmup(lr: float, iters: int) -> Callable[[int], float]:
    """Linear warm-up from lr/iters to lr over the first `iters` iterations (0: none)."""
    return (lambda it: lr * min(1.0, (it + 1) / iters)) if iters else constant(lr)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, it: int) -> None:
    """ema ← d·ema + (1 − d)·model with d = min(decay, (1 + it)/(10 + it)).

    The decay warm-up is TensorFlow's ExponentialMovingAverage with num_updates: without it
    0.999^k of the random initialisation stays in a short run's average.
    """
    d = min(decay, (1.0 + it) / (10.0 + it))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - d)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl, stopping at a line cut short by a kill."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _stream(shard: int) -> str:
    """The checkpoint name of shard i's generator (shard 0 is the one-process stream)."""
    return "train" if shard == 0 else f"train_{shard}"


def _wants_model(callback) -> bool:
    """A callback with a third required parameter asks for the model: callback(iter, record, model)."""
    try:
        inspect.signature(callback).bind(0, {})
        return False
    except TypeError:
        return True


def _logger():
    from .tracking import get_logger
    return get_logger("training")


class Trainer:
    """The loop around a method's loss (module docstring).

    name: the method ("pretrain", "finetune", ...), for the progress bar and messages.
    params: the trained parameters; opt: their optimiser; modules: name -> module saved in the
    checkpoints (the trained model, its weight average, a replay buffer, ...); gens: shard -> the
    generator of this process's micro-batch streams (checkpointed as "train", "train_1", ...).
    config: the run's record (config.json; its hash guards resume, except `resumable` keys).
    lr_at: iteration -> learning rate. grad_clip: max global norm, 0 = off.
    log_when: done -> whether iteration `done` (1-based) writes a record (always the last); the
    stats of the iterations in between are averaged into it. after_step(it): called after every
    optimiser step taken (e.g. the EMA update). scaler: an fp16 GradScaler or None.
    report_to: "none", "tensorboard" or "wandb" (tracking.Tracker; rank 0), or an open Tracker
    of the caller, which the loop logs to and leaves open (tracking.open_tracker).
    hint: what the FloatingPointError of max_nonfinite skipped iterations suggests.
    """

    def __init__(self, name: str, *, params, opt, modules: dict, gens: dict, iters: int,
                 config: dict, resumable=("iters",), lr_at: Callable[[int], float], grad_clip: float,
                 max_nonfinite: int, checkpoint_every: int, out=None, resume: bool = False,
                 progress: bool = True, report_to="none", log_when: Callable[[int], bool] | None = None,
                 after_step: Callable[[int], None] | None = None, scaler=None, postfix=("loss",),
                 hint: str = "Lower lr or check the data", banner: str = ""):
        if resume and out is None:
            raise ValueError("resume=True needs out, the run folder to resume from")
        self.name, self.params, self.opt, self.modules = name, list(params), opt, modules
        self.gens, self.iters = gens, iters
        self.lr_at, self.grad_clip, self.max_nonfinite = lr_at, grad_clip, max_nonfinite
        self.checkpoint_every, self.scaler, self.postfix, self.hint = checkpoint_every, scaler, postfix, hint
        self.log_when = log_when or (lambda done: True)
        self.after_step = after_step
        self.main = dist.is_main()
        self.run_dir = None if out is None else Path(out)
        self.start, self.nonfinite_total, self.extra = 0, 0, {}
        self.records: list[dict] = []       # the log's records so far (resumed ones included)
        self.config_hash = ckpt.config_hash(config, resumable)
        log = _logger()
        if self.run_dir is not None:
            if self.main:
                ckpt.prepare_run(out, config, resume, resumable_keys=resumable)
            path = self.run_dir / "log.jsonl"
            if resume:
                meta = ckpt.load_latest(self.run_dir, modules, opt, {_stream(i): g for i, g in gens.items()},
                                        warn=log.warning if self.main else (lambda msg: None),
                                        config_hash=self.config_hash)
                if meta is not None:
                    self.start = meta["step"]
                    self.extra = meta.get("extra", {})
                    self.nonfinite_total = self.extra.get("nonfinite_total", 0)
                    if scaler is not None and "grad_scaler" in self.extra:
                        scaler.load_state_dict(self.extra["grad_scaler"])
                if self.start > iters:
                    raise ValueError(f"cannot resume {out} with iters={iters}: its newest checkpoint is at "
                                     f"iteration {self.start}; pass iters >= {self.start}")
                self.records = [r for r in read_log(path) if r.get("iter", 0) <= self.start]
            dist.barrier()      # every process has read the log before rank 0 rewrites it
            if self.main:       # records past the checkpoint are rewritten by this run
                ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.progress = progress and self.main
        if self.progress and banner:
            log.info(f"tiltflow {name}: {banner}")
        from .tracking import open_tracker
        self.tracker, self._owns_tracker = open_tracker(report_to, self.run_dir, name, config, enabled=self.main)

    def _checkpoint(self, done: int, extra: dict) -> None:
        states = dist.gather_generator_states(self.gens)          # collective: every process
        if self.main:
            ckpt.save_checkpoint(self.run_dir, done, self.modules, self.opt,
                                 {_stream(i): s for i, s in states.items()},
                                 extra={"nonfinite_total": self.nonfinite_total, **extra,
                                        **({"grad_scaler": self.scaler.state_dict()} if self.scaler else {})},
                                 config_hash=self.config_hash)

    def run(self, step: Callable[[int], tuple[dict, dict]], *, callback: Callable | None = None,
            model=None, checkpoint_extra: dict | None = None) -> dict:
        """Iterations start..iters of `step`; returns the last record ({} if none was written).

        callback(iter, record) after each written record; callback(iter, record, model) if it
        takes three arguments (`model`: the model being trained, e.g. to draw validation samples).
        The tracker is closed when the run ends or fails, unless it is the caller's.
        """
        with_model = callback is not None and _wants_model(callback)
        bar = tqdm(range(self.start, self.iters), initial=self.start, total=self.iters,
                   disable=not self.progress, desc=self.name, dynamic_ncols=True)
        window: dict[str, list] = {}
        record, nonfinite_run = {}, 0
        try:
            for it in bar:
                lr = self.lr_at(it)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                self.opt.zero_grad(set_to_none=True)
                stats, info = step(it)
                if not math.isfinite(stats["loss"]):
                    # a NaN gradient makes the averaged gradient NaN on every process: all skip alike
                    for p in self.params:
                        p.grad = torch.full_like(p, float("nan"))
                dist.average_gradients(self.params)
                if self.scaler is not None:
                    self.scaler.unscale_(self.opt)
                gnorm = float(torch.nn.utils.clip_grad_norm_(
                    self.params, self.grad_clip if self.grad_clip > 0 else float("inf")))
                reduced = dist.mean(stats)
                overflow = self.scaler is not None and math.isfinite(reduced["loss"]) and not math.isfinite(gnorm)
                skipped = not overflow and not (math.isfinite(reduced["loss"]) and math.isfinite(gnorm))
                if skipped:
                    nonfinite_run += 1
                    self.nonfinite_total += 1
                    if nonfinite_run >= self.max_nonfinite:
                        raise FloatingPointError(
                            f"{nonfinite_run} iterations in a row (up to {it + 1}) of {self.name} had a NaN or "
                            f"inf loss or gradient and were skipped; no weights were changed by them. {self.hint}")
                elif overflow:      # the GradScaler skips the step and lowers the scale: routine
                    self.scaler.step(self.opt)
                else:
                    nonfinite_run = 0
                    self.opt.step() if self.scaler is None else self.scaler.step(self.opt)
                    if self.after_step is not None:
                        self.after_step(it)
                if not skipped:
                    for k, v in {**reduced, "grad_norm": gnorm}.items():
                        window.setdefault(k, []).append(v)
                if self.scaler is not None:
                    self.scaler.update()
                done = it + 1
                if self.log_when(done) or done == self.iters:
                    nan = float("nan")   # a window of skipped iterations only
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    if not window:
                        means = {k: nan for k in (*reduced, "grad_norm")}
                    record = {"iter": done, **means, "lr": lr, "nonfinite_skipped": self.nonfinite_total, **info,
                              **({"grad_scale": self.scaler.get_scale()} if self.scaler is not None else {})}
                    window = {}
                    self.records.append(record)
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in self.postfix
                                     if isinstance(record.get(k), float)})
                    if self.run_dir is not None and self.main:
                        ckpt.append_jsonl(self.run_dir / "log.jsonl", record)
                    self.tracker.log(record, done)
                if self.run_dir is not None and (done % self.checkpoint_every == 0 or done == self.iters):
                    self._checkpoint(done, checkpoint_extra or {})
                if callback is not None and record and record["iter"] == done:
                    callback(done, record, model) if with_model else callback(done, record)
        finally:
            bar.close()
            if self._owns_tracker:      # the run is over, or failed: flush and close its own tracker
                self.tracker.close()
        return record
