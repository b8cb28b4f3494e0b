"""Image rewards on tiny random CLIP models and VAEs built from config, saved and loaded by path.

Each check names the known answer: CLIPScore is scale · cos of transformers' own CLIP image and
text features; its gradient is the central finite difference; Aesthetic is its head applied by
hand; a Weighted sum is the sum; Decoded is the pixel reward of vae.decode(x / s + μ) mapped to
[0, 1]; one Adjoint Matching iteration with string prompts trains only the LoRA. Nothing is
downloaded: missing models raise FileNotFoundError naming the cache.
"""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import tiltflow as tilt  # noqa: E402
from tiltflow import image_rewards as ir  # noqa: E402
from tiltflow.models import diffusers_adapter as da  # noqa: E402
from tiny_text import clip_tokenizer, text_config  # noqa: E402

torch.set_num_threads(1)
PROMPTS = ["a red bicycle", "a cat"]


# --- tiny models (random weights, from config) ----------------------------------------------------

def tiny_vae(scaling=1.5, shift=0.1):
    """Two blocks: latents (4, h, w) decode to pixels (3, 2h, 2w)."""
    torch.manual_seed(2)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=scaling,
                         shift_factor=shift)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """CLIPModel (projection 8, 32 px images, 8 px patches) + CLIPProcessor, saved with save_pretrained."""
    d = tmp_path_factory.mktemp("clip")
    tok, vocab = clip_tokenizer(d)
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    cfg = transformers.CLIPConfig(text_config=text_config(vocab), projection_dim=8,
                                  vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8))
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """An SD3 pipeline folder: tiny transformer, two tiny CLIP text encoders (no T5), tiny VAE."""
    from diffusers import StableDiffusion3Pipeline
    d = tmp_path_factory.mktemp("sd3")
    tok, vocab = clip_tokenizer(d / "tok")
    # hidden 2 × 16 = joint_attention_dim 32; pooled projections 2 × 8 = pooled_projection_dim 16
    cfg = transformers.CLIPTextConfig(**text_config(vocab, projection_dim=8))
    torch.manual_seed(0)
    te1, te2 = transformers.CLIPTextModelWithProjection(cfg), transformers.CLIPTextModelWithProjection(cfg)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                               attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                               caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(), text_encoder=te1, tokenizer=tok, text_encoder_2=te2,
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(d / "pipe")
    return d / "pipe"


def _reference_clip(clip_dir, dtype=torch.float32):
    model = transformers.CLIPModel.from_pretrained(clip_dir, local_files_only=True, torch_dtype=dtype)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)


def _feat(out):
    return out if torch.is_tensor(out) else out.pooler_output


def _images(n, h=24, w=40, seed=0, dtype=torch.float32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- CLIP score, PickScore ------------------------------------------------------------------------

def test_clipscore_is_scaled_cosine_of_clip_features(clip_dir):
    """r(x, c) = s · ⟨f/|f|, g/|g|⟩ with f = get_image_features(preprocessed x), g = get_text_features(c)."""
    r = tilt.rewards.CLIPScore(str(clip_dir), scale=2.5)
    x = _images(4)                                 # 24 × 40: resized to 32 × 53, centre-cropped to 32 × 32
    pix = r.clip.pixels(x)
    assert pix.shape == (4, 3, 32, 32)
    model, tok = _reference_clip(clip_dir)
    with torch.no_grad():
        f = _feat(model.get_image_features(pixel_values=pix))
        ids = tok(PROMPTS, padding=True, return_tensors="pt")
        g = _feat(model.get_text_features(**ids))
        cos = torch.nn.functional.cosine_similarity(f, g.repeat(2, 1), dim=-1)     # rows tile: p0 p1 p0 p1
        got = r(x, {"prompt": PROMPTS})
    torch.testing.assert_close(got, 2.5 * cos, atol=1e-5, rtol=0)    # float32 rounding only
    # the same with the prompt fixed at construction (one for all rows), or as a plain string cond
    fixed = tilt.rewards.CLIPScore(str(clip_dir), scale=2.5, prompt="a cat")
    with torch.no_grad():
        cos_cat = torch.nn.functional.cosine_similarity(f, g[1:].expand(4, -1), dim=-1)
        torch.testing.assert_close(fixed(x, {"prompt": PROMPTS}), 2.5 * cos_cat, atol=1e-5, rtol=0)
        torch.testing.assert_close(r(x, "a cat"), 2.5 * cos_cat, atol=1e-5, rtol=0)
    assert set(r.clip._text) == set(PROMPTS)       # each prompt's text embedding computed once


def test_pickscore_scale_is_exp_logit_scale(clip_dir):
    """PickScore = exp(logit_scale) · cos, the logits_per_image of CLIPModel's own forward."""
    r = tilt.rewards.PickScore(str(clip_dir), processor=str(clip_dir))
    model, tok = _reference_clip(clip_dir)
    x = _images(2, 32, 32, seed=1)
    with torch.no_grad():
        out = model(pixel_values=r.clip.pixels(x), **tok(["a cat"], return_tensors="pt"))
        torch.testing.assert_close(r(x, "a cat"), out.logits_per_image[:, 0], atol=1e-4, rtol=1e-6)  # ≈ 2.66 × float32 rounding
    assert "PickScore(" in repr(r) and "0x" not in repr(r)       # reprs enter the run config hash


def test_preprocessing_matches_clip_image_processor(clip_dir):
    """Our torch preprocessing equals CLIPImageProcessor: exactly at the model's size (no resize);
    after a resize (shortest edge to 32) and centre crop, up to PIL's 8-bit fixed-point filter."""
    ip = transformers.AutoImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    pixels = ir.ClipPixels(ip)
    g = torch.Generator().manual_seed(0)
    for h, w, tol in ((32, 32, 1e-6), (48, 64, 0.01), (100, 37, 0.01)):
        img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        ref = ip(images=[img.numpy()], return_tensors="pt")["pixel_values"]
        ours = pixels(img.permute(2, 0, 1)[None].float() / 255)
        assert ours.shape == ref.shape == (1, 3, 32, 32)
        # mean |error|: one 8-bit level is 1/255/std ≈ 0.015 (seen: 0.0044, 0.0050); a crop one pixel off
        # gives 0.6 on noise. (PIL also clips bicubic overshoot to [0, 255], which we do not: max ≈ 0.35.)
        assert (ours - ref).abs().mean() < tol, (h, w, (ours - ref).abs().mean())


def test_clipscore_gradient_matches_finite_differences(clip_dir):
    """∂r/∂x_i = (r(x + ε e_i) − r(x − ε e_i)) / 2ε + O(ε²), in float64, on a few pixels."""
    r = tilt.rewards.CLIPScore(str(clip_dir), prompt="a red bicycle", dtype="float64")
    x = _images(2, 20, 20, seed=3, dtype=torch.float64).requires_grad_(True)
    grad, = torch.autograd.grad(r(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    eps = 1e-6
    for idx in [(0, 0, 3, 4), (0, 2, 10, 17), (1, 1, 19, 0), (1, 0, 7, 7)]:
        e = torch.zeros_like(x)
        e[idx] = eps
        with torch.no_grad():
            fd = (r(x + e) - r(x - e)).sum() / (2 * eps)
        assert abs(float(fd) - float(grad[idx])) < 1e-6 + 1e-5 * abs(float(grad[idx])), (idx, float(fd), float(grad[idx]))


# --- aesthetic head, weighted sums ----------------------------------------------------------------

def _head(tmp_path, relu_ok=True):
    g = torch.Generator().manual_seed(4)
    # names in natural order 0 < 2 < 10 (a string sort would put 10 before 2)
    state = {"layers.0.weight": torch.randn(6, 8, generator=g), "layers.0.bias": torch.randn(6, generator=g),
             "layers.2.weight": torch.randn(4, 6, generator=g), "layers.2.bias": torch.randn(4, generator=g),
             "layers.10.weight": torch.randn(1, 4, generator=g), "layers.10.bias": torch.randn(1, generator=g)}
    save_file(state, str(tmp_path / "head.safetensors"))
    return tmp_path / "head.safetensors", state


@pytest.mark.parametrize("activation", [None, "relu"])
def test_aesthetic_is_head_on_unit_clip_features(clip_dir, tmp_path, activation):
    """r(x) = W₃ a(W₂ a(W₁ u + b₁) + b₂) + b₃ with u = f/|f| the CLIP image embedding, a = id or ReLU."""
    path, s = _head(tmp_path)
    r = tilt.rewards.Aesthetic(path, clip=str(clip_dir), activation=activation)
    model, _ = _reference_clip(clip_dir)
    x = _images(3, 32, 32, seed=5)
    a = (lambda h: h) if activation is None else torch.relu
    with torch.no_grad():
        u = torch.nn.functional.normalize(_feat(model.get_image_features(pixel_values=r.clip.pixels(x))), dim=-1)
        h = a(u @ s["layers.0.weight"].T + s["layers.0.bias"])
        h = a(h @ s["layers.2.weight"].T + s["layers.2.bias"])
        want = (h @ s["layers.10.weight"].T + s["layers.10.bias"])[:, 0]
        torch.testing.assert_close(r(x), want, atol=1e-5, rtol=1e-5)
    bad = {"a.weight": torch.zeros(6, 8), "b.weight": torch.zeros(1, 5)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="takes 5 inputs after 6 outputs"):
        tilt.rewards.Aesthetic(tmp_path / "bad.safetensors", clip=str(clip_dir))
    with pytest.raises(FileNotFoundError, match="no aesthetic head"):
        tilt.rewards.Aesthetic(tmp_path / "missing.safetensors", clip=str(clip_dir))


def test_weighted_sum_of_rewards(clip_dir, tmp_path):
    """(w₁ r₁ + w₂ r₂ − r₂)(x) = w₁ r₁(x) + (w₂ − 1) r₂(x); Weighted([...]) and sum() agree."""
    clip = tilt.rewards.CLIPScore(str(clip_dir), prompt="a cat")
    aes = tilt.rewards.Aesthetic(_head(tmp_path)[0], clip=str(clip_dir))
    x = _images(2, 32, 32, seed=6)
    with torch.no_grad():
        r1, r2 = clip(x), aes(x)
        comp = 0.5 * clip + 2.0 * aes - aes
        torch.testing.assert_close(comp(x), 0.5 * r1 + 1.0 * r2)
        torch.testing.assert_close(tilt.rewards.Weighted([(0.5, clip), (2.0, aes)])(x), 0.5 * r1 + 2.0 * r2)
        torch.testing.assert_close(sum([clip, aes])(x), r1 + r2)
    assert len(comp.terms) == 3 and repr(comp).startswith("Weighted(0.5 * CLIPScore(")
    with pytest.raises(ValueError, match="finite number"):
        tilt.rewards.Weighted([(float("nan"), clip)])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        tilt.rewards.Weighted([(1.0, lambda x, c=None: x.mean(dim=(2, 3)))])(x)


# --- latents through the VAE ----------------------------------------------------------------------

def test_decoded_is_pixel_reward_of_vae_decode(clip_dir, vae_dir, sd3_dir):
    """r(x) = r_pix(clamp(D(x / s + μ) / 2 + 1/2, 0, 1)) with s, μ from the VAE config; ∇_x r finite."""
    pix = tilt.rewards.CLIPScore(str(clip_dir), prompt="a red bicycle")
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = pix(((vae.decode(x / 1.5 + 0.1).sample / 2 + 0.5).clamp(0, 1)))
    for source in (vae_dir, str(sd3_dir), vae):          # a VAE folder, a pipeline folder ("vae/"), a module
        r = tilt.rewards.Decoded(pix, source)
        assert (r.scaling_factor, r.shift_factor, r.factor) == (1.5, 0.1, 2)
        with torch.no_grad():
            torch.testing.assert_close(r(x), want, atol=1e-5, rtol=0)
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(r(xg).sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # explicit factors override the config (SD1.5-style: scaling only)
    r = tilt.rewards.Decoded(pix, vae, scaling_factor=0.18215, shift_factor=0.0)
    with torch.no_grad():
        torch.testing.assert_close(r(x), pix(((vae.decode(x / 0.18215).sample / 2 + 0.5).clamp(0, 1))), atol=1e-5, rtol=0)


def test_adjoint_matching_iteration_with_string_prompts(clip_dir, sd3_dir, tmp_path):
    """One AM iteration on the tiny SD3 transformer, prompts as strings through the folder's text
    encoders, CLIPScore of the VAE-decoded latents: finite loss, only LoRA weights change; the
    reward sees each micro-batch's prompt; sampling with cond="..." equals encode_prompts' cond."""
    base = da.from_diffusers(sd3_dir)
    assert base.net.prompt_encoder is not None and "vae" not in dict(base.named_modules())
    seen = []
    clip = tilt.rewards.CLIPScore(str(clip_dir))

    def spy(pixels, cond):
        seen.append(list(cond["prompt"]))
        return clip(pixels, cond)

    reward = tilt.rewards.Decoded(spy, sd3_dir)
    recs = []
    ft = tilt.finetune(base, reward, lam=1.0, iters=1, batch_size=2, steps=3, lr=1e-2, lora_rank=2,
                       prompts=PROMPTS, progress=False, seed=0, callback=lambda it, rec: recs.append(rec))
    assert len(recs) == 1 and torch.isfinite(torch.tensor(recs[0]["loss"]))
    p = PROMPTS[recs[0]["prompts"][0]]
    assert seen and seen[0] == [p]                  # the micro-batch's prompt (one row; the reward tiles it)
    before = dict(base.named_parameters())
    changed = [n for n, q in ft.named_parameters() if n.replace(".base_layer", "") not in before
               or not torch.equal(q, before[n.replace(".base_layer", "")])]
    assert changed and all("lora_" in n for n in changed), changed[:3]
    assert set(k for k, _ in base.net.prompt_encoder._rows) == set(PROMPTS)   # each prompt encoded once
    assert ft.net.prompt_encoder is base.net.prompt_encoder                   # shared, not copied
    assert not any("text_encoder" in k for k in ft.state_dict())              # nor saved
    pipe = base.net.prompt_encoder.pipe
    cond = da.encode_prompts(pipe, ["a cat"])
    assert cond["prompt"] == ["a cat"]
    x1 = ft.sample(2, steps=2, cond="a cat", seed=1)
    torch.testing.assert_close(x1, ft.sample(2, steps=2, cond=cond, seed=1))
    # a saved model has no encoder until one is attached again
    loaded = tilt.FlowModel.load(ft.save(tmp_path / "ft.safetensors"))
    assert loaded.net.prompt_encoder is None
    torch.testing.assert_close(da.set_prompt_encoder(loaded, pipe).sample(2, steps=2, cond="a cat", seed=1), x1)


# --- errors ---------------------------------------------------------------------------------------

def test_missing_models_raise_file_not_found_naming_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"no CLIP model 'tiltflow-test/none'.*" + str(tmp_path / "hub")):
        tilt.rewards.CLIPScore("tiltflow-test/none")
    with pytest.raises(FileNotFoundError, match=r"PickScore_v1.*Hugging Face cache"):
        tilt.rewards.PickScore()
    with pytest.raises(FileNotFoundError, match=r"no VAE 'tiltflow-test/none'.*" + str(tmp_path / "hub")):
        tilt.rewards.Decoded(lambda p, c=None: p.mean((1, 2, 3)), "tiltflow-test/none")


class _ShrinkingVAE(torch.nn.Module):
    """Claims a ×2 decoder but returns pixels at the latent size."""

    config = {"latent_channels": 4, "block_out_channels": [8, 8], "scaling_factor": 1.0}

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def decode(self, z, return_dict=False):
        return (self.w * z[:, :3],)


def test_bad_inputs_give_clear_errors(clip_dir, vae_dir, sd3_dir):
    clip = tilt.rewards.CLIPScore(str(clip_dir), prompt="a cat")
    with pytest.raises(ValueError, match=r"takes pixels \(batch, 3, H, W\).*Decoded"):
        clip(torch.rand(2, 4, 8, 8))                      # latents handed to a pixel reward
    dec = tilt.rewards.Decoded(clip, vae_dir)
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 4, h, w\).*\(2, 3, 8, 8\)"):
        dec(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"decoded latents \(2, 4, 8, 8\) to pixels \(2, 3, 8, 8\), expected \(2, 3, 16, 16\)"):
        tilt.rewards.Decoded(clip, _ShrinkingVAE())(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"one value per sample, shape \(2,\), got \(2, 3\)"):
        tilt.rewards.Decoded(lambda p, c=None: p.mean(dim=(2, 3)), vae_dir)(torch.randn(2, 4, 8, 8))
    x = _images(4, 32, 32)
    with pytest.raises(ValueError, match="3 prompts .* for a batch of 4"):
        tilt.rewards.CLIPScore(str(clip_dir), prompt=["a", "b", "c"])(x)
    with pytest.raises(ValueError, match="3 prompts .* for a batch of 4"):
        tilt.rewards.CLIPScore(str(clip_dir))(x, {"prompt": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="needs a text prompt"):
        tilt.rewards.CLIPScore(str(clip_dir))(x)
    with pytest.raises(ValueError, match="prompt must be a string"):
        tilt.rewards.CLIPScore(str(clip_dir), prompt=[])
    # the adapter: text cond needs a prompt encoder; cond['prompt'] must match the embeddings' rows
    base = da.from_diffusers(sd3_dir)
    bare = da.from_diffusers(sd3_dir, text_encoders=False)
    lat, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="no prompt encoder.*encode_prompts"):
        bare.velocity(lat, t, "a cat")
    with pytest.raises(ValueError, match="encode them"):     # finetune's message for text without an encoder
        tilt.finetune(bare, dec, prompts=PROMPTS, iters=1, batch_size=2, steps=2, progress=False)
    cond = base.net.encode_text(PROMPTS)
    with pytest.raises(ValueError, match=r"cond\['prompt'\] has 1 prompts for 2 rows"):
        base.velocity(lat, t, {**cond, "prompt": ["a cat"]})
    with pytest.raises(ValueError, match="negative_prompts has 1 entries for 2 prompts"):
        da.encode_prompts(base.net.prompt_encoder.pipe, PROMPTS, negative_prompts=["x"], guidance=True)
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 4, H, W\)"):
        base.velocity(torch.randn(2, 3, 8, 8), t, cond)


def test_import_does_not_load_transformers():
    code = ("import sys, tiltflow as tilt; tilt.rewards.CLIPScore, tilt.rewards.Decoded; "
            "print('transformers' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_string_cond_equals_encode_prompts_sd15_and_guided_sd3(sd3_dir, tmp_path):
    """v(x, t, "a cat") = v(x, t, encode_prompts(pipe, ["a cat"], guidance)) for an SD1.5 folder
    (U-Net, one CLIP text encoder) and for SD3 with classifier-free guidance (negative = "")."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    tok, vocab = clip_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config(vocab)))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    StableDiffusionPipeline(vae=tiny_vae(0.18215, None), text_encoder=te, tokenizer=tok, unet=unet,
                            scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                    steps_offset=1, clip_sample=False),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(tmp_path / "sd15")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7])
    for folder, w in ((tmp_path / "sd15", 1.0), (sd3_dir, 3.0)):
        fm = da.from_diffusers(folder, guidance_scale=w)
        cond = da.encode_prompts(fm.net.prompt_encoder.pipe, ["a cat"], guidance=w != 1.0)
        with torch.no_grad():
            torch.testing.assert_close(fm.velocity(x, t, "a cat"), fm.velocity(x, t, cond), rtol=0, atol=0)
    assert tilt.rewards.Decoded(lambda p, c=None: p.mean((1, 2, 3)), tmp_path / "sd15").shift_factor == 0.0
