"""Adapters presenting diffusers image models as tiltflow velocity networks (t = 0 noise, t = 1 data).

Conventions are translated here, once, at the boundary; everything above sees `velocity(x, t, cond)`.

SD3 family (SD3Transformer2DModel + FlowMatchEulerDiscreteScheduler). diffusers writes
    x_σ = (1 − σ) x_data + σ ε,  σ from 1 (noise) to 0 (data),  network output f = ε − x_data,
and calls the network at timestep σ · N (N = num_train_timesteps = 1000). With t = 1 − σ this is
our rectified-flow path x_t = t x1 + (1 − t) x0, and dx/dt = x1 − x0 = −f: our velocity is −f.
The scheduler's `shift` (SD3: 3.0) only warps the σ grid of a sampler; the network is a function
of σ alone, so it is not part of the velocity. `SD3Velocity.scheduler_grid` gives the warped grid.

SD1.5 family (UNet2DConditionModel, ε- or v-prediction, a DDPM β schedule). The discrete schedule
ᾱ_k becomes the path `paths.DiscreteVP` (t = 1 − (k + 1)/N at timestep k; see its docstring);
the network is called at the continuous timestep τ(t) = (1 − t) N − 1, clamped at 0 near the
data end, and its noise prediction ε̂ is turned into our velocity by the affine-path identity
    v = α̇_t (x − β_t ε̂) / α_t + β̇_t ε̂          (paths.AffinePath.noise_to_velocity).

Conditioning `cond` is a dict of cached text embeddings (see `encode_prompts`):
    "encoder_hidden_states": (b, L, D);  "pooled_projections": (b, P)   (SD3 only)
and, for classifier-free guidance, "negative_encoder_hidden_states" / "negative_pooled_projections"
of the same shapes. b must divide the batch of x (rows are tiled: b = 1 is one prompt for all).
Other entries pass through unused by the network: encode_prompts adds "prompt" (the n strings, for
text rewards such as image_rewards.CLIPScore). cond may also be a string or a list of strings when
the adapter has a `PromptEncoder` (from_diffusers attaches the pipeline's text encoders): each
prompt is encoded once, cached, and the encoder is shared by copies and never saved.
Classifier-free guidance (guidance_scale w ≠ 1) combines the network outputs as diffusers does,
f = f_neg + w (f_cond − f_neg); the conversion to a velocity is affine in f, so the velocity is
combined the same way. The default w = 1 (no guidance) keeps the base a true flow whose marginals
define p_base in the tilt p* ∝ p_base exp(r/λ); with w > 1 the "base" is the guided ODE, which
is not the velocity of any diffusion path, and the tilt is relative to that sampler.

LoRA (`add_lora`, `save_lora`, `load_lora`) goes through peft on the wrapped diffusers model;
finetune(..., lora_rank=r) adds one to a copy whose frozen weights are the caller's own tensors
(FlowModel.copy(share_weights=True): one copy of the network in memory) and trains only it (or
add_lora on the base and finetune(..., init="copy", trainable=lora_trainable)). The LoRA weights
are float32 whatever the network's dtype (peft casts the layer input to them and the output back),
so Adam and an fp16 GradScaler update float32 weights over a bf16/fp16 frozen base. Default targets
follow diffusers' recipes: SD3 (train_dreambooth_lora_sd3.py) the image- and text-stream attention
projections `SD3_TARGETS`; the U-Net the attention projections `DEFAULT_TARGETS`.

Time grid: SD3Velocity.default_grid is the scheduler's shifted σ grid, which FlowModel.sample and
finetune use by default (grid="uniform" asks for the uniform one); the U-Net keeps the uniform grid.
Only SD1.5/SD2-family U-Nets are supported: SDXL's (addition_embed_type "text_time", which need
text_embeds and time_ids besides the prompt embeddings) are refused at load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..paths import DiscreteVP

LORA_FORMAT = "tiltflow.LoRA/1"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")          # U-Net: attention projections
# SD3: diffusers' train_dreambooth_lora_sd3.py default: both streams of the joint attention
SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
               "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


def _require():
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        raise ImportError(f"diffusers adapters need diffusers and peft ({e}); install them with "
                          "`pip install 'tiltflow[diffusers]'`") from e


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


def _jsonable(d) -> dict:
    # where it was loaded from is not part of the architecture (and is a Path)
    return json.loads(json.dumps({k: v for k, v in dict(d).items() if k != "_name_or_path"}, default=str))


def _tile(c: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Repeat cond rows (b, ...) to n rows; b must divide n (rows tile in order, like solvers do)."""
    if not torch.is_tensor(c):
        raise ValueError(f"cond[{name!r}] must be a tensor, got {type(c).__name__}")
    b = c.shape[0]
    if b == 0 or n % b:
        raise ValueError(f"cond[{name!r}] has {b} rows, which does not divide the batch of {n} latents; "
                         "pass one row per latent or one row for all (e.g. one embedding per prompt)")
    return c if b == n else c.repeat(n // b, *([1] * (c.ndim - 1)))


class _DiffusersVelocity(nn.Module):
    """Shared plumbing: cond handling, guidance, dtype at the boundary, LoRA bookkeeping."""

    cond_keys: tuple = ("encoder_hidden_states",)
    lora_targets: tuple = DEFAULT_TARGETS   # add_lora's default target modules

    def __init__(self, model: nn.Module, guidance_scale: float = 1.0):
        super().__init__()
        if not (isinstance(guidance_scale, (int, float)) and guidance_scale > 0):
            raise ValueError(f"guidance_scale must be a positive number, got {guidance_scale!r}")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.lora = None    # {"rank", "alpha", "target_modules"} once add_lora ran
        self.prompt_encoder = None   # PromptEncoder: strings as cond (not weights; shared by copies)

    def weight_dtype(self) -> torch.dtype:
        """The network's own dtype (its first non-LoRA weight; LoRA weights are float32)."""
        for n, p in self.model.named_parameters():
            if "lora_" not in n:
                return p.dtype
        return torch.get_default_dtype()

    @property
    def shape(self) -> tuple:
        s = self.model.config.sample_size
        return (self.model.config.in_channels, *((s, s) if isinstance(s, int) else s))

    def encode_text(self, prompts, device=None) -> dict:
        """Prompt strings -> cond dict through the attached prompt encoder (cached), as encode_prompts."""
        if self.prompt_encoder is None:
            raise ValueError("cond is text, but this model has no prompt encoder (from_diffusers attaches the "
                             "pipeline's; a FlowModel file has none): encode the prompts once with the pipeline's "
                             "own encoders, cond=tiltflow.models.diffusers_adapter.encode_prompts(pipe, [...]), "
                             "or attach them with set_prompt_encoder(model, pipe)")
        return self.prompt_encoder(prompts, guidance=self.guidance_scale != 1.0, device=device)

    def _cond(self, cond, n: int, device=None) -> tuple[dict, dict | None]:
        if torch.is_tensor(cond):
            cond = {"encoder_hidden_states": cond}
        if _is_text(cond):
            cond = self.encode_text(cond, device)
        if not isinstance(cond, dict):
            raise ValueError(f"cond must be a dict of text embeddings ({', '.join(self.cond_keys)}), "
                             f"got {type(cond).__name__}; build it with encode_prompts")
        missing = [k for k in self.cond_keys if k not in cond]
        if missing:
            raise ValueError(f"cond is missing {missing}; it needs {list(self.cond_keys)}")
        # entries other than the embeddings (e.g. "prompt", for rewards) are not the network's
        text = cond.get("prompt")
        rows = cond[self.cond_keys[0]].shape[0] if torch.is_tensor(cond[self.cond_keys[0]]) else None
        if isinstance(text, (list, tuple)) and rows is not None and len(text) != rows:
            raise ValueError(f"cond['prompt'] has {len(text)} prompts for {rows} rows of "
                             f"{self.cond_keys[0]!r}; they must match row for row")
        pos = {k: _tile(cond[k], n, k) for k in self.cond_keys}
        if self.guidance_scale == 1.0:
            return pos, None
        neg_keys = [f"negative_{k}" for k in self.cond_keys]
        if any(k not in cond for k in neg_keys):
            raise ValueError(f"guidance_scale={self.guidance_scale} needs {neg_keys} in cond "
                             "(encode_prompts(..., guidance=True)); or set guidance_scale=1")
        return pos, {k: _tile(cond[f"negative_{k}"], n, k) for k in self.cond_keys}

    def _output(self, x, timestep, cond) -> torch.Tensor:
        """The network's own prediction f in its dtype; guidance applied. x: (batch, *shape)."""
        pos, neg = self._cond(cond, x.shape[0], x.device)
        dt = self.weight_dtype()
        # the timestep stays in x's precision, as in the pipelines (bf16 would round 999 to 1000)
        if neg is None:
            return self._call(x.to(dt), timestep, {k: v.to(x.device, dt) for k, v in pos.items()})
        both = {k: torch.cat([neg[k], pos[k]]).to(x.device, dt) for k in pos}
        f_neg, f_pos = self._call(torch.cat([x, x]).to(dt), torch.cat([timestep, timestep]), both).chunk(2)
        return f_neg + self.guidance_scale * (f_pos - f_neg)

    def _check_x(self, x):
        if x.ndim != 4 or x.shape[1] != self.model.config.in_channels:
            raise ValueError(f"latents must have shape (batch, {self.model.config.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")

    def _base_config(self) -> dict:
        dt = str(self.weight_dtype()).replace("torch.", "")
        return {"class": type(self).__name__, "model_class": type(self.model).__name__,
                "model": _jsonable(self.model.config),
                "guidance_scale": self.guidance_scale, "dtype": dt, "lora": self.lora}


class SD3Velocity(_DiffusersVelocity):
    """An SD3-family flow transformer as a velocity: v(x, t) = −f(x, σ = 1 − t).

    x: (batch, C, H, W) latents (the transformer's own latent space, i.e. after the pipeline's
    VAE scaling and shift); t: (batch,); returns (batch, C, H, W) in x's dtype.
    """

    cond_keys = ("encoder_hidden_states", "pooled_projections")
    lora_targets = SD3_TARGETS

    def __init__(self, transformer: nn.Module, num_train_timesteps: int = 1000, shift: float = 1.0,
                 guidance_scale: float = 1.0):
        super().__init__(transformer, guidance_scale)
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.path = "rectified"

    def config(self) -> dict:
        return {**self._base_config(), "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}

    def _call(self, x, timestep, cond):
        return self.model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                          pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def forward(self, x, t, cond=None):
        self._check_x(x)
        sigma = 1.0 - t                                   # diffusers' σ: 1 = noise, 0 = data
        f = self._output(x, sigma * self.num_train_timesteps, cond)
        return (-f).to(x.dtype)                           # dx/dt = x1 − x0 = −(ε − x_data)

    def scheduler_grid(self, steps: int, device=None) -> torch.Tensor:
        """The σ grid of FlowMatchEulerDiscreteScheduler.set_timesteps(steps), as t = 1 − σ
        (sd3_grid with this network's shift). Use it with integrators.ode_solve(..., method="euler")
        to reproduce the pipeline's sampler. Returns (steps + 1,) increasing from 0 to 1.
        """
        return sd3_grid(steps, self.shift, self.num_train_timesteps, device)

    def default_grid(self, steps: int, device=None) -> torch.Tensor:
        """FlowModel's grid="auto": the scheduler's grid (shift 3: small steps near the noise end)."""
        return self.scheduler_grid(steps, device)


def sd3_grid(steps: int, shift: float = 3.0, num_train_timesteps: int = 1000, device=None) -> torch.Tensor:
    """The time grid t = 1 − σ of FlowMatchEulerDiscreteScheduler.set_timesteps(steps).

    diffusers (fixed shift, no dynamic shifting) takes s uniform from 1 to σ_min = S(1/N) and
    applies S(s) = shift·s / (1 + (shift − 1) s) to it (σ_min is thus shifted twice, as there),
    then appends σ = 0. Returns (steps + 1,) increasing from 0 to 1 (shift 3: small steps near
    the noise end).
    """
    def S(s):
        return shift * s / (1 + (shift - 1) * s)
    s = S(torch.linspace(1.0, S(1.0 / num_train_timesteps), steps, dtype=torch.float64))
    grid = 1.0 - torch.cat([s, torch.zeros(1, dtype=torch.float64)])
    return grid.to(dtype=torch.get_default_dtype(), device=device)


class UNetVelocity(_DiffusersVelocity):
    """An SD1.5-family U-Net (ε- or v-prediction) on its discrete VP schedule as a velocity.

    x: (batch, C, H, W) latents; t: (batch,); returns (batch, C, H, W). See the module docstring.
    """

    def __init__(self, unet: nn.Module, path: DiscreteVP, prediction_type: str = "epsilon",
                 guidance_scale: float = 1.0):
        super().__init__(unet, guidance_scale)
        _check_unet(unet)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if not isinstance(path, DiscreteVP):
            raise ValueError(f"path must be a paths.DiscreteVP, got {type(path).__name__}")
        self.path, self.prediction_type = path, prediction_type

    def config(self) -> dict:
        return {**self._base_config(), "path": self.path.config(), "prediction_type": self.prediction_type}

    def _call(self, x, timestep, cond):
        return self.model(x, timestep, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    def noise_prediction(self, x, t, cond=None) -> torch.Tensor:
        """ε̂(x, t): the network's noise prediction (v-prediction converted: ε = β x + α v̂)."""
        self._check_x(x)
        tau = self.path.timestep(t).clamp_min(0.0)        # τ ∈ (−1, 0) is clean enough: use step 0
        f = self._output(x, tau, cond).to(x.dtype)
        if self.prediction_type == "epsilon":
            return f
        a = self.path.alpha(t).to(x).reshape(-1, 1, 1, 1)
        b = self.path.beta(t).to(x).reshape(-1, 1, 1, 1)
        return b * x + a * f                              # diffusers: v = α ε − β x_data

    def forward(self, x, t, cond=None):
        return self.path.noise_to_velocity(self.noise_prediction(x, t, cond), x, t)


def _check_unet(unet):
    """Refuse U-Nets whose forward needs more than (x, timestep, encoder_hidden_states)."""
    cfg = unet.config
    extra = {k: cfg.get(k) for k in ("addition_embed_type", "class_embed_type", "num_class_embeds")
             if cfg.get(k) is not None}
    if not extra:
        return
    what = ("an SDXL-family U-Net (addition_embed_type='text_time': its forward needs added_cond_kwargs "
            "text_embeds and time_ids)" if cfg.get("addition_embed_type") == "text_time" else
            f"a U-Net with extra conditioning {extra} (its forward needs added_cond_kwargs or class_labels)")
    raise ValueError(f"{what} is not supported. Supported: SD3-family SD3Transformer2DModel with "
                     "FlowMatchEulerDiscreteScheduler, and SD1.5/SD2-family UNet2DConditionModel conditioned "
                     "on encoder_hidden_states alone (no addition_embed_type or class embedding)")


# --- loading ---------------------------------------------------------------------------------

def _local_folder(name_or_path, what: str = "diffusers model") -> Path:
    """A local folder: the path itself, or the snapshot in the Hugging Face cache (never downloaded)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True))
    except Exception as e:  # noqa: BLE001 — several hub errors mean "not cached"
        raise FileNotFoundError(
            f"no {what} {str(name_or_path)!r}: not a local folder ({p.resolve()}) and not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}; set HF_HOME or HF_HUB_CACHE to move it). "
            "Nothing is downloaded: fetch it first, e.g. `huggingface-cli download "
            f"{name_or_path}`, or pass the folder written by save_pretrained ({type(e).__name__})") from None


def _adapter_from_parts(model, scheduler, guidance_scale) -> nn.Module:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    if isinstance(model, SD3Transformer2DModel):
        if scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError("schedulers with dynamic shifting are not supported; use a fixed shift")
        return SD3Velocity(model, scheduler.config.num_train_timesteps, scheduler.config.get("shift", 1.0),
                           guidance_scale)
    if isinstance(model, UNet2DConditionModel):
        from diffusers import DDPMScheduler
        ddpm = DDPMScheduler.from_config(scheduler.config)     # the same β schedule, whichever sampler
        if ddpm.config.get("rescale_betas_zero_snr", False):
            raise ValueError("zero-terminal-SNR schedules (ᾱ = 0 at the last step) are not supported")
        return UNetVelocity(model, DiscreteVP(ddpm.alphas_cumprod.tolist()),
                            ddpm.config.prediction_type, guidance_scale)
    raise ValueError(f"unsupported diffusers network {type(model).__name__}; "
                     "supported: SD3Transformer2DModel, UNet2DConditionModel")


def from_diffusers(path_or_pipeline, dtype=None, guidance_scale: float = 1.0, shape=None, device=None,
                   gradient_checkpointing: bool = False, text_encoders: bool = True):
    """A FlowModel around a diffusers SD3-family transformer or SD1.5-family U-Net.

    path_or_pipeline: a pipeline object, a folder written by `save_pretrained`, or a hub id already
    in the local Hugging Face cache (never downloaded: FileNotFoundError saying where it looked).
    dtype: e.g. "bfloat16" (weights; inputs and outputs are cast at the boundary).
    shape: latent shape (C, H, W); default the network's sample_size (SD3: 128 ↔ 1024 px).
    From a folder, the network, the scheduler and (text_encoders=True, if the folder has them) the
    tokenizers and text encoders are loaded — never the VAE (image_rewards.Decoded loads it where a
    reward needs pixels). A pipeline's own network is wrapped, not copied (dtype converts it in place).
    The text encoders become the adapter's frozen PromptEncoder, so cond= and finetune's prompts=
    may be strings (each encoded once); they are not part of the saved weights, and finetune moves
    them to the CPU while it trains (PromptEncoder.release).
    Refused with a ValueError: SDXL-family U-Nets (addition_embed_type "text_time") and other U-Nets
    needing added_cond_kwargs or class labels; SD3 schedulers with dynamic shifting.
    gradient_checkpointing: recompute the network's activations in backward (less memory).
    """
    _require()
    from .flow_model import FlowModel
    dtype = _dtype(dtype)
    if hasattr(path_or_pipeline, "scheduler") and hasattr(path_or_pipeline, "components"):
        pipe = path_or_pipeline
        model = getattr(pipe, "transformer", None)
        model = getattr(pipe, "unet", None) if model is None else model
        if model is None:
            raise ValueError(f"pipeline {type(pipe).__name__} has neither a transformer nor a unet")
        scheduler = pipe.scheduler
        if dtype is not None:
            model = model.to(dtype)
        text = pipe if text_encoders and getattr(pipe, "text_encoder", None) is not None else None
    else:
        import diffusers
        folder = _local_folder(path_or_pipeline)
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{folder} holds no model_index.json: not a diffusers pipeline folder")
        parts = json.loads(index.read_text())
        name = "transformer" if "transformer" in parts else "unet" if "unet" in parts else None
        if name is None:
            raise ValueError(f"{index} lists neither a transformer nor a unet: {sorted(parts)}")
        cls = getattr(diffusers, parts[name][1])
        model = cls.from_pretrained(folder, subfolder=name, local_files_only=True, torch_dtype=dtype)
        sched_cls = getattr(diffusers, parts["scheduler"][1])
        scheduler = sched_cls.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        text = None
        if text_encoders and (parts.get("text_encoder") or [None])[0] is not None:
            # the pipeline with only its tokenizers and text encoders (and our network, whose config
            # SD3's encode_prompt reads); every other component (VAE, safety checker, ...) left out
            skip = {k: None for k, v in parts.items() if isinstance(v, list) and (
                not k.startswith(("text_encoder", "tokenizer", "scheduler")) or v[0] is None)}
            text = getattr(diffusers, parts["_class_name"]).from_pretrained(
                folder, local_files_only=True, torch_dtype=dtype, **{**skip, name: model, "scheduler": scheduler})
            if device is not None:
                text.to(device)
    net = _adapter_from_parts(model, scheduler, guidance_scale)
    if text is not None:
        net.prompt_encoder = PromptEncoder(text)
    net.model.requires_grad_(False)
    if gradient_checkpointing:
        net.model.enable_gradient_checkpointing()
    fm = FlowModel(net, net.path, shape if shape is not None else net.shape)
    return fm.to(device) if device is not None else fm


def build_adapter(cfg: dict) -> nn.Module:
    """Rebuild an adapter from its `config()` with fresh weights (FlowModel.load fills them in)."""
    _require()
    import diffusers
    cfg = dict(cfg)
    cls = getattr(diffusers, cfg["model_class"])
    model = cls.from_config(cfg["model"]).to(_dtype(cfg["dtype"]))
    if cfg["class"] == "SD3Velocity":
        net = SD3Velocity(model, cfg["num_train_timesteps"], cfg["shift"], cfg["guidance_scale"])
    elif cfg["class"] == "UNetVelocity":
        net = UNetVelocity(model, DiscreteVP(cfg["path"]["alphas_cumprod"]), cfg["prediction_type"],
                           cfg["guidance_scale"])
    else:
        raise ValueError(f"unknown adapter class {cfg['class']!r}")
    if cfg.get("lora"):
        add_lora(net, **cfg["lora"])
    return net


def encode_prompts(pipe, prompts, negative_prompts=None, guidance: bool = False, device=None) -> dict:
    """Cached text embeddings for `prompts` through the pipeline's own encoders: the `cond` dict.

    Returns {"encoder_hidden_states": (n, L, D)[, "pooled_projections": (n, P)], "prompt": n strings}
    and, with guidance=True, the "negative_*" entries (negative_prompts, default the empty prompt).
    "prompt" is for text rewards (CLIPScore, PickScore); the network ignores it.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if negative_prompts is not None:
        negative_prompts = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"negative_prompts has {len(negative_prompts)} entries for {len(prompts)} prompts")
    with torch.no_grad():
        if getattr(pipe, "transformer", None) is not None:
            e, ne, p, npool = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                 do_classifier_free_guidance=guidance,
                                                 negative_prompt=negative_prompts)
            out = {"encoder_hidden_states": e, "pooled_projections": p}
            if guidance:
                out.update(negative_encoder_hidden_states=ne, negative_pooled_projections=npool)
        else:
            e, ne = pipe.encode_prompt(prompts, device, 1, guidance, negative_prompts)
            out = {"encoder_hidden_states": e}
            if guidance:
                out["negative_encoder_hidden_states"] = ne
    out["prompt"] = list(prompts)
    return out


def _is_text(c) -> bool:
    return isinstance(c, str) or (isinstance(c, (list, tuple)) and len(c) > 0 and all(isinstance(p, str) for p in c))


class PromptEncoder:
    """Prompt strings -> cond dicts through a pipeline's own text encoders, each prompt encoded once.

    Frozen (runs under no_grad) and not part of the adapter's weights: copies of the adapter
    (FlowModel.copy, finetune) share it, and FlowModel.save does not write it. Rows are cached
    per (prompt, guidance): the pipelines pad every prompt to a fixed length, so a row does not
    depend on the other prompts of its batch.
    `release()` moves the text encoders (SD3: two CLIPs and T5-XXL, ~10 GB in bf16) to the CPU;
    a prompt not yet cached is then encoded on their former device (moved there for the call
    and back). finetune releases them once the prompts are encoded and `restore()`s them when
    it returns.
    """

    ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipe):
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ValueError(f"pipeline {type(pipe).__name__} has no text encoder and tokenizer to encode prompts")
        self.pipe = pipe
        self._rows: dict = {}
        self._home = None      # while released: {encoder name: the device it was moved off}

    def __deepcopy__(self, memo):
        return self

    def _encoders(self) -> dict:
        encs = {k: getattr(self.pipe, k, None) for k in self.ENCODERS}
        return {k: m for k, m in encs.items() if isinstance(m, nn.Module)}

    @property
    def released(self) -> bool:
        return self._home is not None

    def release(self):
        """Move the text encoders to the CPU (no-op if released); cached prompts need no encoder."""
        if self._home is not None:
            return
        encs = self._encoders()
        self._home = {k: next(m.parameters()).device for k, m in encs.items() if any(True for _ in m.parameters())}
        for k in self._home:
            encs[k].to("cpu")
        if any(d.type == "cuda" for d in self._home.values()):
            torch.cuda.empty_cache()

    def restore(self):
        """Move released text encoders back to their former devices."""
        home, self._home = self._home, None
        encs = self._encoders()
        for k, d in (home or {}).items():
            encs[k].to(d)

    def _encode(self, prompts, guidance):
        if self._home is None:
            return encode_prompts(self.pipe, prompts, guidance=guidance)
        home = self._home
        self.restore()                      # on their former device for this call, then off again
        try:
            dev = next(iter(home.values()), None)
            return encode_prompts(self.pipe, prompts, guidance=guidance, device=dev)
        finally:
            self.release()

    def __call__(self, prompts, guidance: bool = False, device=None) -> dict:
        """prompts: str or list of n str -> {embedding keys: (n, ...), "prompt": n strings}."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        new = list(dict.fromkeys(p for p in prompts if (p, guidance) not in self._rows))
        if new:
            out = self._encode(new, guidance)
            for j, p in enumerate(new):
                self._rows[(p, guidance)] = {k: v[j:j + 1] for k, v in out.items() if torch.is_tensor(v)}
        rows = [self._rows[(p, guidance)] for p in prompts]
        cond = {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]}
        cond["prompt"] = prompts
        return cond


def set_prompt_encoder(model, pipe):
    """Attach `pipe`'s text encoders to a diffusers FlowModel so cond and prompts may be strings."""
    _adapter(model).prompt_encoder = None if pipe is None else PromptEncoder(pipe)
    return model


def release_text_encoders(model):
    """Move `model`'s prompt encoder's text encoders off the accelerator (PromptEncoder.release);
    returns a function that moves them back (a no-op where there is nothing to release)."""
    pe = getattr(getattr(model, "net", model), "prompt_encoder", None)
    if pe is None or pe.released:
        return lambda: None
    pe.release()
    return pe.restore


def encode_text(model, c):
    """c unchanged unless it is text (a string or list of strings) and `model` has a prompt encoder;
    then its cond dict. finetune calls this on prompts= and cond= before anything else sees them."""
    net = getattr(model, "net", model)
    if not _is_text(c) or getattr(net, "prompt_encoder", None) is None:
        return c
    return net.encode_text(c, getattr(model, "device", None))


# --- LoRA ------------------------------------------------------------------------------------

def _adapter(model) -> _DiffusersVelocity:
    net = getattr(model, "net", model)
    if not isinstance(net, _DiffusersVelocity):
        raise ValueError(f"LoRA needs a diffusers adapter (from_diffusers), got {type(net).__name__}")
    return net


def lora_trainable(name: str, p: torch.nn.Parameter) -> bool:
    """finetune(..., trainable=lora_trainable): train only the LoRA weights."""
    return "lora_" in name


def add_lora(model, rank: int = 4, alpha: float | None = None, target_modules=None):
    """Attach a peft LoRA (rank, α = rank by default, target module names) to the adapter's network.

    target_modules None: the adapter's default (SD3: `SD3_TARGETS`, both attention streams as in
    diffusers' SD3 LoRA recipe; U-Net: `DEFAULT_TARGETS`). The LoRA up-projections start at zero,
    so the model's outputs are unchanged; the LoRA weights are float32 whatever the network's dtype
    (an fp16 LoRA loses Adam's updates and cannot be unscaled by a GradScaler); every non-LoRA
    weight is frozen (requires_grad False). Returns `model`.
    """
    _require()
    from peft import LoraConfig
    net = _adapter(model)
    if net.lora is not None:
        raise ValueError(f"this model already has a LoRA {net.lora}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    targets = [str(m) for m in (net.lora_targets if target_modules is None else target_modules)]
    net.model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True))
    for n, p in net.named_parameters():
        if lora_trainable(n, p) and p.dtype != torch.float32:
            p.data = p.data.float()     # peft made it in the base's dtype
        p.requires_grad_(lora_trainable(n, p))
    net.lora = {"rank": rank, "alpha": alpha, "target_modules": targets}
    return model


def save_lora(model, path: str | os.PathLike) -> Path:
    """Write only the LoRA weights (and their config) to a safetensors file."""
    _require()
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    net = _adapter(model)
    if net.lora is None:
        raise ValueError("this model has no LoRA to save (add_lora first)")
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(net.model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": LORA_FORMAT, "lora": json.dumps(net.lora),
                                         "adapter": type(net).__name__})
    os.replace(tmp, path)
    return path


def load_lora(model, path: str | os.PathLike):
    """Load LoRA weights written by `save_lora` onto the same base (adds the LoRA if absent)."""
    _require()
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file
    net = _adapter(model)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no LoRA file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != LORA_FORMAT:
        raise ValueError(f"{path} is not a tiltflow LoRA file (format {meta.get('format')!r})")
    cfg = json.loads(meta["lora"])
    if meta.get("adapter") != type(net).__name__:
        raise ValueError(f"{path} holds a LoRA for {meta.get('adapter')}, not {type(net).__name__}")
    if net.lora is None:
        add_lora(net, **cfg)
    elif net.lora != cfg:
        raise ValueError(f"{path} holds LoRA {cfg}, but the model has LoRA {net.lora}")
    dev = next(net.model.parameters()).device
    res = set_peft_model_state_dict(net.model, load_file(str(path), device=str(dev)))
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"{path} does not fit this network: unexpected LoRA weights {bad[:3]}...")
    return model
