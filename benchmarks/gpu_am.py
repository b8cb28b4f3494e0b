"""How close does one Adjoint Matching iteration on an SD3-medium-sized transformer come to the
hardware floor: its time against the no-grad rollout, per phase, and in TFLOP/s?

Model: SD3Transformer2DModel built from SD3-medium's published transformer config (24 joint
layers, 24 heads × 64, 2.03 B parameters) with random weights (nothing is downloaded), in bf16,
wrapped by models.diffusers_adapter (SD3Velocity, scheduler shift 3) with finetune's float32 LoRA
of rank 16 (methods.finetune.make_lora_model: one copy of the network), random text embeddings
of SD3's shapes (77 CLIP + 256 T5 = 333 tokens × 4096, pooled 2048), bf16 autocast as
finetune(mixed_precision="bf16"), reward r(x) = −mean x² on the latents (no VAE: the iteration
alone). Settings: 512 px (64×64 latents) batch 4, 20 steps, 10 loss times; 1024 px (128×128)
batch 2, 28 steps, 10 loss times; the grid finetune uses (FlowModel.time_grid: the scheduler's).

One iteration = the calls of finetune's loop (solvers/adjoint_matching.py), timed phase by phase
with torch.cuda.synchronize: rollout (am.rollout of the LoRA model, no graph) | adjoint
(terminal ∇r, loss times, am.lean_adjoint: one VJP of the base per step, which also hands over
v_base at the loss times) | loss (am.backward_loss: LoRA-model forward and backward on
loss times × batch rows) | step (clipping, Adam). Reference: the no-grad memoryless-SDE rollout of
the base alone (a sampler's cost). Medians over `--repeats` iterations after one warm-up.

FLOPs: torch.utils.flop_counter's formulas (FlopCount below) count the matrix products and
attention (forward and backward) of one forward of the base, of each phase once, and of the reference
rollout; the timed runs go without the counter. Reported: TFLOP/s per phase and for the
iteration; "x_floor" = time / (FLOPs / the reference rollout's measured TFLOP/s), i.e. how far a
phase is from running at the rollout's throughput; "fraction_of_peak" = TFLOP/s / `--peak-tflops`
(default 790: the bf16 dense matrix rate measured on this H200, see the JSON). Peak memory:
torch.cuda.max_memory_allocated over the timed iterations (CUDA only).

Writes results/gpu_am.json. --loss-chunk k backpropagates the loss k loss times at a time
(finetune's loss_chunk: same gradient, less activation memory).

    python benchmarks/gpu_am.py                  # on a GPU (~2-4 min on one H200)
    python benchmarks/gpu_am.py --tiny           # tiny config, float32, CPU, a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from tiltflow.methods.finetune import make_lora_model  # noqa: E402
from tiltflow.models import diffusers_adapter as da  # noqa: E402
from tiltflow.solvers import adjoint_matching as am  # noqa: E402

NAME = "gpu_am"
PHASES = ("rollout", "adjoint", "loss", "step")
# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TEXT = {"tokens": 333, "pooled": 2048}
SETTINGS = [dict(name="512px", latent=64, batch=4, steps=20, loss_times=10),
            dict(name="1024px", latent=128, batch=2, steps=28, loss_times=10)]
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=16)
TINY_TEXT = {"tokens": 5, "pooled": 16}
TINY_SETTINGS = [dict(name="tiny", latent=8, batch=2, steps=4, loss_times=2)]


class _Pipe:
    """What from_diffusers reads of a pipeline: the network and SD3's scheduler (shift 3)."""

    def __init__(self, transformer):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.transformer, self.scheduler, self.components = transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), {}


def reward(x, cond=None):
    return -x.float().pow(2).mean(dim=(1, 2, 3))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the operators run inside, by torch.utils.flop_counter's formulas (matrix
    products, convolutions, attention; forward and backward). FlopCounterMode itself would do, but
    its module tracker's backward hooks refuse torch.autograd.grad with respect to a leaf, which
    is what each VJP of the lean adjoint is."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def _flops(into: dict | None, key: str):
    """Count the FLOPs of the block into into[key] (no counter when into is None)."""
    if into is None:
        yield
        return
    with FlopCount() as fc:
        yield
    into[key] = into.get(key, 0) + fc.total


def iteration(ft, base, opt, params, cond, s, grid, gen, amp, device, flops=None) -> dict:
    """One AM iteration as finetune runs it (mixed precision, one micro-batch); seconds per phase."""
    times = {}
    opt.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    with _flops(flops, "rollout"):
        ft.eval()
        with amp():
            ro = am.rollout(ft, s["batch"], grid, gen, cond)
        _sync(device)
    t1 = time.perf_counter()
    with _flops(flops, "adjoint"):
        a1, _ = am.terminal_adjoint(reward, ro.xs[-1], 1.0, cond)
        idx, w = am.loss_times(s["steps"], s["loss_times"], gen)
        with amp():
            adj, v_base = am.lean_adjoint(base, ro, a1, idx=idx)
        _sync(device)
    t2 = time.perf_counter()
    with _flops(flops, "loss"):
        ft.train()
        am.backward_loss(ft, base, ro, adj, idx, w, s.get("loss_chunk"), autocast=amp, v_base=v_base)
        _sync(device)
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    _sync(device)
    t4 = time.perf_counter()
    return {"rollout": t1 - t0, "adjoint": t2 - t1, "loss": t3 - t2, "step": t4 - t3}


def reference_rollout(base, s, grid, cond, gen, amp, device) -> float:
    """Seconds of the no-grad memoryless-SDE rollout of the base (a sampler's cost)."""
    _sync(device)
    t0 = time.perf_counter()
    with amp():
        am.rollout(base, s["batch"], grid, gen, cond)
    _sync(device)
    return time.perf_counter() - t0


def measure(tr, cond, s, args, device, amp) -> dict:
    base = da.from_diffusers(_Pipe(tr), shape=(tr.config.in_channels, s["latent"], s["latent"]))
    base.requires_grad_(False)
    ft = make_lora_model(base, args.lora_rank, seed=0)
    params = [p for p in ft.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5)
    grid = base.time_grid(s["steps"], device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    # FLOPs, counted once (the counter slows the run: nothing below is timed with it)
    flops = {}
    x = torch.randn(s["batch"], *base.shape, device=device)
    with _flops(flops, "forward"), torch.no_grad(), amp():
        base.velocity(x, grid[1].expand(s["batch"]), cond)
    with _flops(flops, "reference_rollout"):
        reference_rollout(base, s, grid, cond, gen, amp, device)
    iteration(ft, base, opt, params, cond, s, grid, gen, amp, device, flops=flops)   # also the warm-up
    reference_rollout(base, s, grid, cond, gen, amp, device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs, refs = [], []
    for _ in range(args.repeats):
        runs.append(iteration(ft, base, opt, params, cond, s, grid, gen, amp, device))
        refs.append(reference_rollout(base, s, grid, cond, gen, amp, device))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    t = {k: statistics.median(r[k] for r in runs) for k in PHASES}
    t["iteration"] = statistics.median(sum(r.values()) for r in runs)
    t_ref = statistics.median(refs)
    flops["iteration"] = sum(flops[k] for k in ("rollout", "adjoint", "loss"))
    rate = flops["reference_rollout"] / t_ref if flops["reference_rollout"] else float("nan")
    tflops = {k: flops[k] / t[k] / 1e12 for k in ("rollout", "adjoint", "loss", "iteration")}
    tflops["reference_rollout"] = rate / 1e12
    return {**s, "time_s": t, "reference_rollout_s": t_ref, "time_samples_s": runs,
            "reference_rollout_samples_s": refs,
            "iteration_over_reference_rollout": t["iteration"] / t_ref,
            "flops": flops, "forward_tflop_per_sample": flops["forward"] / s["batch"] / 1e12,
            "iteration_in_reference_rollouts_of_flops": flops["iteration"] / flops["reference_rollout"]
            if flops["reference_rollout"] else None,
            "tflops": tflops,
            "x_floor": {k: t[k] / (flops[k] / rate) if flops[k] else None
                        for k in ("rollout", "adjoint", "loss", "iteration")},
            "fraction_of_peak": {k: v / args.peak_tflops for k, v in tflops.items()},
            "peak_memory_gib": peak}


def run(tiny: bool = False, device: str | None = None, repeats: int = 3, peak_tflops: float = 790.0,
        lora_rank: int = 16, settings: list[str] | None = None, loss_chunk: int | None = None) -> dict:
    """Build the model, measure each setting; returns the JSON payload (main writes it)."""
    from diffusers import SD3Transformer2DModel
    import diffusers
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = argparse.Namespace(repeats=repeats, peak_tflops=peak_tflops, lora_rank=lora_rank)
    cfg, text, chosen = (TINY, TINY_TEXT, TINY_SETTINGS) if tiny else (SD3_MEDIUM, TEXT, SETTINGS)
    chosen = [{**s, "loss_chunk": loss_chunk} for s in chosen if settings is None or s["name"] in settings]
    dtype = torch.float32 if tiny else torch.bfloat16
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else contextlib.nullcontext
    torch.manual_seed(0)
    with torch.device(device):                  # random init on the device: no 8 GB float32 copy on the host
        tr = SD3Transformer2DModel(**cfg)
    tr.to(device).requires_grad_(False)         # buffers made off the default device too
    if dtype != torch.float32:
        tr.to(dtype)
    g = torch.Generator(device=device).manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, text["tokens"], cfg["joint_attention_dim"], generator=g,
                                                 device=device, dtype=dtype),
            "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g, device=device, dtype=dtype)}
    results = []
    for s in chosen:
        try:
            res = measure(tr, cond, s, args, device, amp)
        except torch.OutOfMemoryError as e:     # the other setting still runs; the JSON says which failed
            results.append({**s, "error": f"out of memory: {e}"[:300]})
            print(f"{s['name']}: out of memory (try --loss-chunk)", flush=True)
            torch.cuda.empty_cache()
            continue
        results.append(res)
        print(f"{s['name']}: iteration {res['time_s']['iteration']:.3f} s = "
              + " + ".join(f"{k} {res['time_s'][k]:.3f}" for k in PHASES)
              + f"; no-grad rollout {res['reference_rollout_s']:.3f} s -> {res['iteration_over_reference_rollout']:.2f}x; "
              f"adjoint {res['x_floor']['adjoint'] or float('nan'):.2f}x its floor; "
              f"{res['tflops']['iteration']:.1f} TFLOP/s ({100 * res['fraction_of_peak']['iteration']:.1f} % of peak); "
              f"peak memory {res['peak_memory_gib'] or float('nan'):.1f} GiB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    machine = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__}
    return {"question": __doc__.split("\n\n")[0], "tiny": tiny, "machine": machine,
            "model": {"config": cfg, "parameters": sum(p.numel() for p in tr.parameters()), "dtype": str(dtype),
                      "text_tokens": text["tokens"], "lora_rank": lora_rank,
                      "autocast": "bf16" if dtype == torch.bfloat16 else "no"},
            "peak_tflops": peak_tflops,
            "peak_tflops_source": "bf16 dense matrix product rate of one H200 (about 790 TFLOP/s measured "
                                  "on 8192^3 products on the device machine)",
            "floor_definition": "x_floor = time / (FLOPs / measured TFLOP/s of the no-grad reference rollout)",
            "repeats": repeats, "results": results}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config, float32 (CPU smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--settings", nargs="*", default=None, help="names among 512px 1024px (default: both)")
    ap.add_argument("--loss-chunk", type=int, default=None, help="loss times per backward (default: all at once)")
    ap.add_argument("--out", default=None, help="JSON path (default results/gpu_am.json, gpu_am_tiny.json with --tiny)")
    a = ap.parse_args(argv)
    if a.tiny:
        _common.setup_torch(1)
    payload = run(a.tiny, a.device, a.repeats, a.peak_tflops, settings=a.settings, loss_chunk=a.loss_chunk)
    if a.out is None:
        path = _common.write_json(NAME + ("_tiny" if a.tiny else ""), payload)
    else:
        import json
        path = Path(a.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_common._jsonable({"benchmark": NAME, "environment": _common.environment(),
                                                      **payload}), indent=2) + "\n")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
