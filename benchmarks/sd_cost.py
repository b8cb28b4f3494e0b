"""What does one Adjoint Matching iteration on an SD3-style transformer cost, phase by phase, and
how much memory do micro-batching, loss chunks and gradient checkpointing save?

A small random SD3Transformer2DModel (latents 4×32×32, patch 2 → 256 image tokens, 4 joint
layers, width 64; 8 text tokens) wrapped by models.diffusers_adapter, with a rank-8 LoRA as the
trainable part (what finetune(..., lora_rank=8) trains), reward r(x) = 100 · mean latent value.
One iteration = for each of grad_accum micro-batches of the global batch B = 8:
rollout (8 memoryless-SDE steps, no graph) | lean adjoint (terminal ∇r, then 8 VJPs of the base, which
hand over the base velocity at the loss times) | loss (7 interior loss times: the fine-tuned forward on
7·micro rows, backward), then one
Adam step on the LoRA. The phases are the functions finetune runs (solvers/adjoint_matching.py:
rollout, terminal_adjoint, lean_adjoint, loss_times, backward_loss), called here directly so each
can be timed and measured.

Configurations (same global batch, same seed): grad_accum 1 vs 4; gradient checkpointing of the
fine-tuned transformer off vs on; loss_chunk None vs 1 (one loss time per backward).

Time: wall clock of each phase, median over `repeats` (3) iterations after one warm-up, one
thread. On a shared machine, a phase doing the same work in two configurations (the rollout
builds no graph, so checkpointing cannot change it) shows the timing noise, about ±30 %.

Peak memory: the peak over the iteration of live tensor storage created by ATen operators (a
TorchDispatchMode sees every operator's output tensors — forward, backward and checkpoint
recomputation — adds the bytes of each new storage and subtracts them when the storage is freed,
via a weakref finalizer). Weights that exist before the iteration are not counted, so the number
is what the iteration adds: activations, saved tensors for backward, trajectories, adjoints,
gradients and Adam's state. Scratch buffers an operator allocates and frees internally are not
seen, so it is a lower bound on what a caching allocator would hold; on CUDA,
torch.cuda.max_memory_allocated measures the same quantity including those. The peak is also
reported per phase (the highest live total reached during that phase).

Writes results/sd_cost.json and results/sd_cost.png (left: time per phase, stacked, per
configuration; right: peak memory per configuration, split by the phase where it is reached).

    python benchmarks/sd_cost.py            # ~2-5 min on one thread (longer on a busy machine)
    python benchmarks/sd_cost.py --quick    # smaller transformer, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from tiltflow import integrators  # noqa: E402
from tiltflow.methods.finetune import make_finetune_model  # noqa: E402
from tiltflow.models import diffusers_adapter as da  # noqa: E402
from tiltflow.solvers import adjoint_matching as am  # noqa: E402

NAME = "sd_cost"
PHASES = ("rollout", "adjoint", "loss", "step")


class LiveBytes(TorchDispatchMode):
    """Live bytes of storages created by operators while active, with the overall and per-phase peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.phase, self.phase_peak = None, {}
        self._seen = {}

    def set_phase(self, name: str) -> None:
        self.phase = name
        self.phase_peak[name] = max(self.phase_peak.get(name, 0), self.live)

    def _free(self, key, n):
        self.live -= n
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                s = t.untyped_storage()
                key, n = s.data_ptr(), s.nbytes()
                if n == 0 or key in self._seen:      # a view of a storage already counted
                    continue
                self._seen[key] = n
                self.live += n
                weakref.finalize(s, self._free, key, n)
                if self.live > self.peak:
                    self.peak = self.live
                if self.phase is not None and self.live > self.phase_peak.get(self.phase, 0):
                    self.phase_peak[self.phase] = self.live
        return out


class _Pipe:
    def __init__(self, transformer):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.transformer, self.scheduler, self.components = transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), {}


def build(quick: bool):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    size, layers, heads, head_dim = (16, 2, 2, 16) if quick else (32, 4, 4, 16)
    tr = SD3Transformer2DModel(sample_size=size, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                               attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
                               caption_projection_dim=heads * head_dim, pooled_projection_dim=32,
                               pos_embed_max_size=size)
    base = da.from_diffusers(_Pipe(tr))
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, 8, 64, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g)}
    arch = {"latent": [4, size, size], "layers": layers, "heads": heads, "head_dim": head_dim,
            "parameters": sum(p.numel() for p in tr.parameters())}
    return base, cond, arch


def reward(x, cond=None):
    return 100.0 * x.mean(dim=(1, 2, 3))


def iteration(ft, base, opt, cond, batch, accum, steps, chunk, mem: LiveBytes | None, seed=0):
    """One AM iteration as finetune runs it; returns seconds per phase."""
    micro = batch // accum
    grid = integrators.time_grid(steps)
    times = dict.fromkeys(PHASES, 0.0)
    opt.zero_grad(set_to_none=True)
    for i in range(accum):
        gen = torch.Generator().manual_seed(1000 * seed + i)
        mem and mem.set_phase("rollout")
        t0 = time.perf_counter()
        ft.eval()
        ro = am.rollout(ft, micro, grid, gen, cond)
        t1 = time.perf_counter()
        mem and mem.set_phase("adjoint")
        a1, _ = am.terminal_adjoint(reward, ro.xs[-1], 1.0, cond)
        idx, w = am.loss_times(steps, None, gen)
        adj, v_base = am.lean_adjoint(base, ro, a1, idx=idx)
        t2 = time.perf_counter()
        mem and mem.set_phase("loss")
        ft.train()
        am.backward_loss(ft, base, ro, adj, idx, w, chunk, 1.0 / accum, v_base=v_base)
        t3 = time.perf_counter()
        del ro, adj, a1, v_base
        times["rollout"] += t1 - t0
        times["adjoint"] += t2 - t1
        times["loss"] += t3 - t2
    mem and mem.set_phase("step")
    t4 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_([p for p in ft.parameters() if p.requires_grad], 1.0)
    opt.step()
    times["step"] = time.perf_counter() - t4
    return times


def measure(base, cond, accum, checkpointing, chunk, args):
    ft = make_finetune_model(base, "copy")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        da.add_lora(ft, 8)
    if checkpointing:
        ft.net.model.enable_gradient_checkpointing()
    params = [p for p in ft.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    kw = dict(batch=args.batch, accum=accum, steps=args.steps, chunk=chunk)
    iteration(ft, base, opt, cond, mem=None, seed=99, **kw)           # warm-up (allocates Adam state)
    runs = [iteration(ft, base, opt, cond, mem=None, seed=s, **kw) for s in range(args.repeats)]
    times = {k: statistics.median(r[k] for r in runs) for k in PHASES}
    times["total"] = sum(times[k] for k in PHASES)
    with LiveBytes() as mem:
        iteration(ft, base, opt, cond, mem=mem, seed=0, **kw)
    return {"grad_accum": accum, "micro_batch": args.batch // accum, "gradient_checkpointing": checkpointing,
            "loss_chunk": chunk, "time_s": times, "time_samples_s": runs,
            "peak_mb": mem.peak / 2**20, "phase_peak_mb": {k: v / 2**20 for k, v in mem.phase_peak.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    _common.setup_torch()
    args.batch, args.steps = 8, 8
    args.repeats = args.repeats or (1 if args.quick else 3)
    base, cond, arch = build(args.quick)
    configs = [(1, False, None), (4, False, None), (1, True, None), (4, True, None), (1, False, 1), (4, True, 1)]
    rows = []
    t_start = time.perf_counter()
    for accum, ckpt_on, chunk in configs:
        res = measure(base, cond, accum, ckpt_on, chunk, args)
        rows.append(res)
        print(f"grad_accum={accum} checkpointing={ckpt_on!s:5} loss_chunk={chunk!s:4}  "
              + "  ".join(f"{k} {res['time_s'][k]:.2f}s" for k in (*PHASES, "total"))
              + f"  peak {res['peak_mb']:.1f} MB", flush=True)
    ref = rows[0]
    for r in rows:
        r["peak_ratio_vs_default"] = r["peak_mb"] / ref["peak_mb"]
        r["time_ratio_vs_default"] = r["time_s"]["total"] / ref["time_s"]["total"]
    _common.print_table([[r["grad_accum"], str(r["gradient_checkpointing"]), str(r["loss_chunk"]),
                          r["time_s"]["rollout"], r["time_s"]["adjoint"], r["time_s"]["loss"], r["time_s"]["total"],
                          r["peak_mb"], r["peak_ratio_vs_default"], r["time_ratio_vs_default"]] for r in rows],
                        ["accum", "ckpt", "chunk", "rollout s", "adjoint s", "loss s", "total s", "peak MB",
                         "peak ×", "time ×"])
    payload = {"question": __doc__.split("\n\n")[0], "model": arch, "global_batch": args.batch, "steps": args.steps,
               "loss_times": args.steps - 1, "lora_rank": 8, "repeats": args.repeats, "quick": args.quick,
               "memory_method": "peak live bytes of operator output storages (TorchDispatchMode + weakref "
                                "finalizers), excluding weights that exist before the iteration",
               "results": rows, "wall_s": time.perf_counter() - t_start}
    path = _common.write_json(NAME if not args.quick else NAME + "_quick", payload)
    plot(rows, arch, NAME if not args.quick else NAME + "_quick")
    print(f"wrote {path}")


def plot(rows, arch, name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"accum {r['grad_accum']}\n{'ckpt' if r['gradient_checkpointing'] else 'no ckpt'}"
              f"\nchunk {r['loss_chunk'] or 'all'}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for k, c in zip(PHASES, ("tab:blue", "tab:orange", "tab:green", "tab:gray")):
        v = [r["time_s"][k] for r in rows]
        a.bar(x, v, bottom=bottom, label=k, color=c)
        bottom = [u + w for u, w in zip(bottom, v)]
    a.set_xticks(list(x), labels, fontsize=8)
    a.set_ylabel("seconds per iteration (median)")
    a.set_title("time of one AM iteration by phase")
    a.legend()
    for k, c in zip(PHASES, ("tab:blue", "tab:orange", "tab:green", "tab:gray")):
        b.scatter(x, [r["phase_peak_mb"].get(k, 0) for r in rows], color=c, label=f"peak during {k}", zorder=3)
    b.bar(x, [r["peak_mb"] for r in rows], color="lightgray", label="peak of the iteration")
    b.set_xticks(list(x), labels, fontsize=8)
    b.set_ylabel("MB of live tensors added by the iteration")
    b.set_title("peak memory (global batch 8)")
    b.legend(fontsize=8)
    fig.suptitle(f"SD3 transformer {arch['layers']} layers, latent {'×'.join(map(str, arch['latent']))}, "
                 f"{arch['parameters'] / 1e6:.2f} M parameters, LoRA rank 8")
    _common.save_figure(fig, name)


if __name__ == "__main__":
    main()
