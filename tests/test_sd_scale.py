"""Memory and speed options of finetune, and per-prompt CVaR thresholds.

Each check names its known answer: chunked loss backward = one-pass gradient (linearity of the
mean over loss times); no network forward sees more rows than micro-batch × loss chunk; bf16
autocast changes the loss only at bf16 rounding; gradient checkpointing recomputes the same
gradient; per-prompt η* of two Gaussian reward laws shifted by Δ match each law's quadrature
η* (shift equivariance η*(μ + Δ) = η*(μ) + Δ), while the pooled η* is the mixture's.
"""

import math

import pytest
import torch
from torch import nn

import tiltflow as tilt
from tiltflow.models.flow_model import FlowModel
from tiltflow.models.mlp import MLPVelocity
from tiltflow.objectives import cvar_pseudo_reward

torch.set_num_threads(1)


class _Counting(nn.Module):
    """An MLP velocity that reports the rows of every forward pass (and whether grad is on)."""

    def __init__(self, log):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = MLPVelocity(2, (16, 16))
        self.log = log          # a plain function: deepcopy (FlowModel.copy) keeps it shared

    def config(self):
        return {"class": "Counting"}

    def forward(self, x, t, cond=None):
        self.log(x.shape[0], torch.is_grad_enabled())
        return self.mlp(x, t)


def _mlp_base(hidden=(32, 32)):
    torch.manual_seed(0)
    return FlowModel(MLPVelocity(2, hidden), "rectified", (2,))


def _reward(x, cond=None):
    return (x * torch.tensor([1.0, -0.5])).sum(1) + 0.3 * x[:, 0] ** 2


def _grads(ft):
    return {n: p.grad.clone() for n, p in ft.named_parameters() if p.grad is not None}


# --- 1a: micro-batches and loss chunks ------------------------------------------------------------

def test_loss_chunk_gives_the_one_pass_gradient():
    """L = Σ_c (k_c/k) L_c: gradients accumulated over uneven chunks (3 + 3 + 1 of 7 loss times)
    equal the one-pass gradient to float32 rounding; the logged loss and KL agree too."""
    base = _mlp_base()
    kw = dict(lam=0.5, iters=1, batch_size=6, steps=10, n_loss_times=7, init="copy", grad_clip=1e9,
              progress=False, seed=2)
    recs = {}
    one = tilt.finetune(base, _reward, loss_chunk=None, callback=lambda i, r: recs.update(one=r), **kw)
    chunked = tilt.finetune(base, _reward, loss_chunk=3, callback=lambda i, r: recs.update(chunk=r), **kw)
    g1, g2 = _grads(one), _grads(chunked)
    assert g1.keys() == g2.keys() and g1
    scale = max(float(g.abs().max()) for g in g1.values())
    for k in g1:   # float32 sums in another order: ~1e-7 relative
        assert (g1[k] - g2[k]).abs().max() <= 1e-6 * max(scale, 1.0), k
    assert math.isclose(recs["one"]["loss"], recs["chunk"]["loss"], rel_tol=1e-6)
    assert math.isclose(recs["one"]["kl"], recs["chunk"]["kl"], rel_tol=1e-6, abs_tol=1e-9)
    # a chunk without the k_c/k weight would scale the gradient: the check above would see it
    assert scale > 1e-3


def test_forward_rows_follow_the_micro_batch_not_the_global_batch():
    """batch 8 = 4 micro-batches of 2: every forward (rollout, adjoint VJP, loss) sees ≤ 2 rows per
    loss chunk, i.e. peak activation memory scales with micro-batch × loss_chunk."""
    log = []
    base = FlowModel(_Counting(lambda n, g: log.append((n, g))), "rectified", (2,))
    steps = 5                                   # 4 interior loss times
    for accum, chunk, want_grad_rows in ((1, None, 8 * 4), (4, None, 2 * 4), (4, 1, 2)):
        log.clear()
        tilt.finetune(base, _reward, lam=1.0, iters=1, batch_size=8, grad_accum=accum, steps=steps,
                      loss_chunk=chunk, init="copy", progress=False)
        micro = 8 // accum
        grad_rows = [n for n, g in log if g]
        assert min(n for n, g in log) == micro                      # rollout: one micro-batch at a time
        assert max(grad_rows) == want_grad_rows, (accum, chunk, sorted(set(grad_rows)))
        assert max(n for n, g in log) == want_grad_rows             # the base's loss targets too


def _live_bytes():
    """benchmarks/sd_cost.py's LiveBytes: peak live bytes of the storages operators create."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sd_cost.py"
    spec = importlib.util.spec_from_file_location("_sd_cost", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.LiveBytes


def test_stage1_memory_follows_the_micro_batch_not_n_offline():
    """CVaR stage 1 draws and rewards the offline batch micro-batch by micro-batch and keeps only
    the rewards: the reward never sees more than micro = 8 rows, and growing n_offline 8× (256 →
    2048) adds at most 64 bytes per extra sample to the peak live bytes of the whole run (its
    float64 reward; measured 8), while drawing the 2048 samples in one call, as stage 1 did
    before, holds ≥ 1 KB per sample (a 256-wide hidden layer in float32; measured 5 MB in all)."""
    LiveBytes = _live_bytes()
    base = _mlp_base((256, 256))
    rows = []

    def reward(x, cond=None):
        rows.append(x.shape[0])
        return x[:, 0] - 0.5 * x[:, 1]

    peak = {}
    for n in (256, 2048):
        rows.clear()
        with LiveBytes() as mem:
            tilt.finetune(base, tilt.CVaR(reward, level=0.1), lam=1.0, iters=1, batch_size=8, steps=4,
                          n_offline=n, progress=False)
        peak[n] = mem.peak
        assert len(rows) > n // 8 and max(rows) <= 8, (n, max(rows))
    assert peak[2048] - peak[256] <= 64 * (2048 - 256), peak
    with LiveBytes() as one_call:
        base.sample(2048, steps=4, sde=True)
    assert one_call.peak >= 1024 * 2048


def test_chunked_stage1_gives_the_threshold_of_the_same_samples_rewarded_at_once():
    """η* of finetune's chunked stage 1 equals, exactly, η* of the same offline samples (shard 0's
    stream drawn in chunks of micro = 16 rows, 100 = 6·16 + 4) rewarded in one call by
    CVaR.pseudo_reward(x) — and pseudo_reward(None, rewards=r) solves the same problem. With
    n_offline ≤ micro the one chunk is the one sample call of before (same stream, same η*)."""
    base = _mlp_base()
    kw = dict(lam=0.7, iters=1, steps=6, progress=False, seed=3)
    for n, batch in ((100, 16), (12, 16)):
        obj = tilt.CVaR(_reward, level=0.2, tail="left")
        tilt.finetune(base, obj, batch_size=batch, n_offline=n, **kw)
        g = torch.Generator().manual_seed(3)          # shard 0's stream: seed 3
        x = torch.cat([base.sample(min(batch, n - s), steps=6, sde=True, generator=g) for s in range(0, n, batch)])
        ref = tilt.CVaR(_reward, level=0.2, tail="left")
        ref.pseudo_reward(x, 0.7)
        assert obj.solution.n == n and obj.solution.eta == ref.solution.eta, (n, obj.solution, ref.solution)
        ref.pseudo_reward(None, 0.7, rewards=_reward(x))
        assert ref.solution.eta == obj.solution.eta
    with pytest.raises(ValueError, match="needs x_offline"):
        tilt.CVaR(_reward, level=0.2).pseudo_reward(None, 1.0)


# --- 1b, 1c: gradient checkpointing, mixed precision ----------------------------------------------

def test_bf16_autocast_on_cpu_runs_and_stays_close_to_fp32():
    """bf16 keeps 8 mantissa bits (relative rounding 2⁻⁸ ≈ 0.4 %) per matmul: the first loss
    (σ²‖ã‖² at the base) moves by well under 1 % (seen: 3e-6 relative, the small random net's
    velocity is a small part of each step), yet it does move (autocast took effect)."""
    base = _mlp_base((64, 64))
    losses = {}
    for mp in ("no", "bf16"):
        tilt.finetune(base, _reward, lam=0.5, iters=2, batch_size=16, steps=8, init="copy", seed=1,
                      mixed_precision=mp, progress=False,
                      callback=lambda i, r, mp=mp: losses.setdefault(mp, []).append(r["loss"]))
    (a, a2), (b, b2) = losses["no"], losses["bf16"]
    assert all(math.isfinite(v) for v in (a, a2, b, b2))
    assert 0 < abs(a - b) < 0.01 * abs(a), (a, b)
    assert abs(a2 - b2) < 0.01 * abs(a2), (a2, b2)
    # the trained weights stay float32 (autocast casts per op; Adam updates float32 parameters)
    ft = tilt.finetune(base, _reward, lam=0.5, iters=1, batch_size=4, steps=4, init="copy",
                       mixed_precision="bf16", progress=False)
    assert all(p.dtype == torch.float32 for p in ft.parameters())


def test_fp16_runs_with_a_grad_scaler_and_resumes(tmp_path):
    """fp16 adds loss scaling: finite losses, the scale logged, and resume restores the scale: the
    scale starts at 2¹⁶ and halves on each overflow (seen: 32768, 16384, 8192, 8192), so a resumed
    run that started a fresh scaler would log 32768 at iteration 3, not the uninterrupted run's value."""
    base = _mlp_base()
    kw = dict(lam=0.5, batch_size=8, steps=6, init="copy", mixed_precision="fp16", progress=False,
              checkpoint_every=1, out=tmp_path / "run")
    recs = []
    tilt.finetune(base, _reward, iters=2, callback=lambda i, r: recs.append(r), **kw)
    assert all(math.isfinite(r["loss"]) and r["grad_scale"] > 0 for r in recs)
    more = []
    tilt.finetune(base, _reward, iters=3, resume=True, callback=lambda i, r: more.append(r), **kw)
    assert [r["iter"] for r in more] == [3]
    full = []
    tilt.finetune(base, _reward, iters=3, callback=lambda i, r: full.append(r),
                  **{**kw, "out": tmp_path / "full"})
    assert len({r["grad_scale"] for r in full}) > 1          # the scale moved, so the check below can fail
    assert more[0]["grad_scale"] == full[2]["grad_scale"]
    with pytest.raises(ValueError, match="mixed_precision must be"):
        tilt.finetune(base, _reward, iters=1, mixed_precision="fp8", progress=False)
    with pytest.raises(ValueError, match="loss_chunk must be"):
        tilt.finetune(base, _reward, iters=1, loss_chunk=0, progress=False)
    with pytest.raises(ValueError, match="loss_chunk applies"):
        tilt.finetune(base, _reward, iters=1, loss_chunk=2, solver="adjoint_sampling", progress=False)
    with pytest.raises(ValueError, match="needs a diffusers adapter"):
        tilt.finetune(base, _reward, iters=1, gradient_checkpointing=True, init="copy", progress=False)


def _tiny_sd3_base():
    """A 2-layer random SD3 transformer as a FlowModel (seed 0), a generator and one prompt's cond."""
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from tiltflow.models import diffusers_adapter as da

    class Pipe:
        def __init__(self, tr):
            self.transformer, self.scheduler, self.components = tr, FlowMatchEulerDiscreteScheduler(), {}

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, 5, 32, generator=g), "pooled_projections": torch.randn(1, 16, generator=g)}
    return da.from_diffusers(Pipe(tr)), g, cond


def test_gradient_checkpointing_recomputes_the_same_gradient():
    """Checkpointing only recomputes activations in backward: the LoRA gradient of one iteration on
    a tiny SD3 transformer is the same as without it (to float32 rounding)."""
    pytest.importorskip("peft")
    base, g, cond = _tiny_sd3_base()
    grads = {}
    for gc in (False, True):
        ft = tilt.finetune(base, lambda x, cond=None: 100 * x.mean((1, 2, 3)), lam=1.0, iters=1, batch_size=2,
                           steps=3, lora_rank=2, cond=cond, gradient_checkpointing=gc, grad_clip=1e9,
                           progress=False)
        assert any(getattr(m, "gradient_checkpointing", False) for m in ft.net.model.modules()) == gc
        grads[gc] = _grads(ft)
    assert grads[False].keys() == grads[True].keys() and grads[False]
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-5, atol=1e-7)


def test_the_base_vjp_never_checkpoints():
    """A base network with gradient checkpointing on (a shared module, a caller's setting) is not
    checkpointed inside the lean adjoint's VJPs (each backward follows its forward at once, so a
    recomputation only costs time — and would rerun the blocks in whatever state they are in at
    backward time): the checkpoint function is never called during the sweep, although the same
    VJP outside it does call it, ã is the one of the un-checkpointed network, and the flags are
    back on afterwards."""
    from tiltflow import integrators
    from tiltflow.solvers import adjoint_matching as am

    base, g, cond = _tiny_sd3_base()
    tr = base.net.model
    base.requires_grad_(False)
    grid = integrators.time_grid(4)
    ro = am.rollout(base, 2, grid, g, cond)
    a1, _ = am.terminal_adjoint(lambda x, cond=None: 100 * x.mean((1, 2, 3)), ro.xs[-1], 1.0, cond)
    plain = am.lean_adjoint(base, ro, a1)
    calls = []

    def counting(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    tr.enable_gradient_checkpointing(counting)
    adj, _ = am.lean_adjoint(base, ro, a1, idx=torch.tensor([1, 2]))
    assert calls == [] and tr.is_gradient_checkpointing
    torch.testing.assert_close(adj, plain, rtol=0, atol=0)
    with torch.enable_grad():
        base.velocity(ro.xs[1].requires_grad_(True), grid[1].expand(2), cond)
    assert len(calls) == 2                     # outside the sweep the two blocks do checkpoint


def test_gpu_am_benchmark_runs_its_tiny_mode_on_cpu():
    """benchmarks/gpu_am.py --tiny (a 2-layer SD3 transformer, float32, CPU) runs the real phases
    and counts FLOPs that obey their closed forms: the no-grad rollout is `steps` forwards of the
    batch (exactly steps × one forward's FLOPs), and the adjoint is `steps` VJPs, each a forward
    plus the input-gradient backward, which repeats a weight product's FLOPs and doubles an
    activation product's, minus the text/time branches that do not depend on x: between 1.5 and
    3 forwards per step."""
    pytest.importorskip("diffusers")
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_am.py"
    spec = importlib.util.spec_from_file_location("_gpu_am", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.run(tiny=True, device="cpu", repeats=1)
    (r,) = out["results"]
    f, steps = r["flops"], r["steps"]
    assert f["forward"] > 0 and f["reference_rollout"] == steps * f["forward"]
    assert 1.5 * steps * f["forward"] <= f["adjoint"] <= 3 * steps * f["forward"], f
    assert f["loss"] > 0 and f["iteration"] == f["rollout"] + f["adjoint"] + f["loss"]
    assert all(v > 0 for v in r["time_s"].values()) and r["iteration_over_reference_rollout"] > 1
    assert out["machine"]["diffusers"] and r["x_floor"]["adjoint"] > 0


# --- 2: per-prompt thresholds ---------------------------------------------------------------------

class _CondGaussian(nn.Module):
    """Exact rectified-flow velocity of N(c·Δ·e₁, s² I) for the scalar condition c (rows tile).

    v(x, t) = m + (t s² − (1 − t)) (x − t m) / (t² s² + (1 − t)²).
    """

    def __init__(self, delta: float, s: float):
        super().__init__()
        self.delta, self.s = delta, s

    def config(self):
        return {"class": "CondGaussian", "delta": self.delta, "s": self.s}

    def forward(self, x, t, cond=None):
        c = torch.as_tensor(cond, dtype=x.dtype).reshape(-1)
        c = c.repeat(x.shape[0] // c.shape[0])
        m = torch.zeros_like(x)
        m[:, 0] = c * self.delta
        t = t.reshape(-1, 1)
        s2 = self.s**2
        return m + (t * s2 - (1 - t)) * (x - t * m) / (t**2 * s2 + (1 - t) ** 2)


def _quadrature_eta(mus, s, level, lam, tail):
    """η* of the dual F(η) = η + λ log E exp(g_η(r)/λ) for r ~ the equal mixture of N(μ_i, s²),
    E by the trapezoid rule on a fine grid, optimum by a grid search refined once."""
    r = torch.linspace(min(mus) - 8 * s, max(mus) + 8 * s, 4001, dtype=torch.float64)
    dens = sum(torch.exp(-0.5 * ((r - m) / s) ** 2) for m in mus) / (len(mus) * s * math.sqrt(2 * math.pi))
    w = dens * (r[1] - r[0])

    def F(eta):
        g = cvar_pseudo_reward(r[None], eta[:, None], level, tail)
        return eta + lam * torch.log((w * torch.exp(g / lam)).sum(1))

    eta = torch.linspace(min(mus) - 3 * s, max(mus) + 3 * s, 401, dtype=torch.float64)
    for _ in range(3):
        v = F(eta)
        j = int(v.argmax() if tail == "left" else v.argmin())
        h = eta[1] - eta[0]
        eta = torch.linspace(float(eta[j] - h), float(eta[j] + h), 401, dtype=torch.float64)
    return float(eta[200])


def test_per_prompt_thresholds_match_quadrature_and_differ_from_pooled(tmp_path):
    """Two prompts whose reward laws are N(0, s²) and N(Δ, s²) (r = x₁ on exact Gaussian bases):
    per-prompt η*_p = quadrature η* of each law (η*_1 = η*_0 + Δ), the pooled η* = the mixture's;
    each micro-batch is trained with its own prompt's η*."""
    delta, s, level, lam = 2.0, 0.5, 0.2, 5.0   # quadrature: η*_0 ≈ −0.34, η*_1 ≈ 1.66, pooled ≈ 0.04
    base = FlowModel(_CondGaussian(delta, s), "rectified", (2,))
    reward = lambda x, cond=None: x[:, 0]   # noqa: E731
    q0 = _quadrature_eta([0.0], s, level, lam, "left")
    q_pool = _quadrature_eta([0.0, delta], s, level, lam, "left")
    kw = dict(lam=lam, iters=2, batch_size=8, grad_accum=2, steps=20, n_offline=4000, prompts=[0.0, 1.0],
              progress=False, seed=0)
    recs = []
    tilt.finetune(base, tilt.CVaR(reward, level, "left", track=False, per_prompt=True), out=tmp_path / "pp",
                  callback=lambda i, r: recs.append(r), **kw)
    import json
    st = json.loads((tmp_path / "pp" / "stage1.json").read_text())
    eta0, eta1 = st["eta"]
    assert [p["n"] for p in st["per_prompt"]] == [2000, 2000]
    # 2000 samples: the η* estimate's sd ≈ s·√(β(1−β)/n)/φ(z_β) ≈ 0.016; tolerance ≈ 4 sd
    assert abs(eta0 - q0) < 0.07, (eta0, q0)
    assert abs(eta1 - (q0 + delta)) < 0.07, (eta1, q0 + delta)
    pooled = tilt.CVaR(reward, level, "left", track=False)
    tilt.finetune(base, pooled, **{**kw, "iters": 1})
    assert abs(pooled.solution.eta - q_pool) < 0.07, (pooled.solution.eta, q_pool)
    assert min(abs(pooled.solution.eta - eta0), abs(pooled.solution.eta - eta1)) > 0.3
    # every micro-batch used its own prompt's threshold
    for r in recs:
        assert r["eta"] == [[eta0, eta1][p] for p in r["prompts"]]


# --- 3: TOML run configs through the CLI ----------------------------------------------------------

def _tiny_pipeline_folder(tmp_path):
    """A tiny random SD3 pipeline (1-layer transformer, two tiny CLIP text encoders, a 2-level VAE)
    written with save_pretrained: what `base = "<folder>"` loads."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL
    from test_diffusers import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(tmp_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1)
    pipe.register_modules(vae=vae)
    pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_cli_toml_run_config_validation_and_resume(tmp_path):
    """`tiltflow finetune --config run.toml` on a saved tiny SD3 pipeline: 2 iterations, validation
    latents + PNG at 1 and 2, flags override the file (--iters, --out), resume continues to 3 with
    the same log prefix; an unknown key is an error naming it."""
    import json
    from safetensors.torch import load_file
    from tiltflow import cli

    folder = _tiny_pipeline_folder(tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text(f'''
base = "{folder.as_posix()}"
reward = "latent_mean"
objective = "cvar"
level = 0.5
tail = "left"
lam = 1.0
iters = 50
batch_size = 2
steps = 3
n_offline = 4
lora_rank = 2
mixed_precision = "no"
prompts = ["a red bicycle", "a cat"]
validation_prompts = ["a red bicycle"]
validation_every = 1
validation_n = 2
validation_steps = 2
checkpoint_every = 1
out = "{(tmp_path / 'ignored').as_posix()}"

[reward_options]
scale = 100.0
''')
    out = tmp_path / "run"
    import importlib.util
    tb = importlib.util.find_spec("tensorboard") is not None
    assert cli.main(["finetune", "--config", str(toml), "--iters", "2", "--out", str(out), "--no-progress",
                     *(["--report-to", "tensorboard"] if tb else [])]) == 0
    assert not (tmp_path / "ignored").exists()                 # --out overrode the file's out
    if tb:      # the loop's records and each validation grid, in one TensorBoard folder
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss")] == [1, 2]
        assert [(e.step, e.width, e.height) for e in acc.Images("validation")] == [(1, 32, 16), (2, 32, 16)]
    for name in ("config.json", "run_config.json", "log.jsonl", "metrics.json", "model.safetensors",
                 "lora.safetensors", "stage1.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["iters"] == 2 and cfg["base"] == folder.as_posix() and cfg["tail"] == "left"
    lat = load_file(str(out / "validation" / "step_00000002.safetensors"))["latents"]
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    from PIL import Image
    img = Image.open(out / "validation" / "step_00000002.png")
    assert img.size == (2 * 16, 16)                              # 2 samples of 16×16 px, one prompt row
    assert (out / "validation" / "step_00000001.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    # resume to 3 iterations: the first two records stay, one more is added
    assert cli.main(["finetune", "--config", str(toml), "--iters", "3", "--out", str(out), "--resume",
                     "--no-progress"]) == 0
    log2 = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log2] == [1, 2, 3] and log2[:2] == log
    assert (out / "validation" / "step_00000003.safetensors").is_file()
    # unknown keys and bad values are user errors (exit 2) naming the key
    bad = tmp_path / "bad.toml"
    bad.write_text(toml.read_text().replace("lam = 1.0", "lam = 1.0\nlearning_rate = 0.1"))
    assert cli.main(["finetune", "--config", str(bad), "--no-progress"]) == 2
    bad.write_text(toml.read_text().replace('reward = "latent_mean"', 'reward = "sharpness"'))
    assert cli.main(["finetune", "--config", str(bad), "--iters", "1", "--out", str(tmp_path / "b"),
                     "--no-progress"]) == 2


def test_run_config_keys_and_rewards(tmp_path, capsys):
    """Unknown keys name themselves; reward names resolve through the lookup (image rewards only
    when tiltflow.image_rewards imports); FinetuneConfig lists in TOML become tuples."""
    from tiltflow import run_config as rc

    f = tmp_path / "r.toml"
    f.write_text('base = "x"\nprompts = ["a"]\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        rc.read(f)
    run, ft = rc.split({"base": "x", "prompts": ["a"], "lora_rank": 4, "lora_targets": ["to_q"], "iters": 3})
    assert ft == {"lora_rank": 4, "lora_targets": ("to_q",), "iters": 3} and run.prompts == ["a"]
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        rc.split({"base": "x", "prompts": []})
    with pytest.raises(ValueError, match="unknown reward 'sharpness'"):
        rc.make_reward("sharpness", {})
    r = rc.make_reward("latent_mean", {"scale": 2.0})
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(r(x), 2.0 * x.mean((1, 2, 3)))
    assert "latent_mean" in rc.reward_names()


def test_toml_reader_without_tomllib_names_tomli(monkeypatch):
    """Python 3.10 has no tomllib: the fallback is tomli, and its absence says what to install."""
    import sys
    from tiltflow import run_config as rc
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ImportError, match=r"pip install 'tiltflow\[config\]'"):
        rc._toml()


def test_yaml_run_config_reads_the_same_table_as_toml(tmp_path):
    """A .yaml run config with the same keys gives the same table as the TOML one; bad YAML, a
    non-mapping document and unknown keys are ValueErrors naming the file or key."""
    from tiltflow import run_config

    toml = tmp_path / "run.toml"
    toml.write_text('base = "/models/sd3"\nreward = "pickscore"\nlam = 0.05\nlevel = 0.1\ntail = "left"\n'
                    'prompts = ["a red bicycle", "a cat"]\nlora_rank = 16\n\n[reward_options]\nmodel = "/m/p"\n')
    yml = tmp_path / "run.yaml"
    yml.write_text('base: /models/sd3\nreward: pickscore\nlam: 0.05\nlevel: 0.1\ntail: left\n'
                   'prompts: ["a red bicycle", "a cat"]\nlora_rank: 16\nreward_options:\n  model: /m/p\n')
    assert run_config.read(yml) == run_config.read(toml)
    run, ft = run_config.split(run_config.read(yml))
    assert run.tail == "left" and ft["lam"] == 0.05 and ft["lora_rank"] == 16
    bad = tmp_path / "bad.yml"
    bad.write_text("lam: [0.05\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        run_config.read(bad)
    bad.write_text("- lam\n- 0.05\n")
    with pytest.raises(ValueError, match="mapping"):
        run_config.read(bad)
    bad.write_text("lam: 0.05\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        run_config.read(bad)
