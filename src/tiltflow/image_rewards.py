"""Image rewards: CLIP score, PickScore, an aesthetic head, weighted sums, and VAE decoding.

Every reward is a callable r(x, cond=None) -> (batch,), differentiable in x.

Pixel rewards (CLIPScore, PickScore, Aesthetic) take x: (batch, 3, H, W) with values in [0, 1]
and preprocess it in torch, as the model's CLIP image processor does but differentiably: resize
the shortest edge to the processor's size (bicubic, antialiased), centre-crop, normalise by the
CLIP mean and std. No PIL in the gradient path.

Latent rewards: `Decoded(pixel_reward, vae)` decodes the latents a diffusers model samples,
    pixels = clamp(D(x / scaling_factor + shift_factor) / 2 + 1/2, 0, 1)
(D the VAE decoder; SD3: scaling 1.5305, shift 0.0609; SD1.5: scaling 0.18215, no shift — read
from the VAE's config, as the pipelines do), and scores those pixels. Only the reward decodes, so
the backward pass goes through the decoder only when a reward is differentiated.

Text: CLIPScore and PickScore compare the image with the sample's prompt. It comes from
`prompt=` given at construction (one string for all rows, or a list whose length divides the
batch; rows tile in order) or else from cond: a string, a list of strings, or a dict with
"prompt" (encode_prompts and the adapters' prompt encoder put it there). Text embeddings are
computed once per prompt and cached.

Models load through transformers from a local folder or the Hugging Face cache only
(local_files_only=True); a missing model raises FileNotFoundError saying where it looked.
transformers is imported when a reward is built, not when tiltflow is imported.

Composition: `0.5 * PickScore() + 2.0 * Aesthetic(...)` is `Weighted([(0.5, r1), (2.0, r2)])`,
r(x) = Σ_i w_i r_i(x, cond). A weighted sum of pixel rewards is a pixel reward (decode it once:
`Decoded(0.5 * r1 + 2.0 * r2, vae)`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"image rewards need transformers ({e}); install it with "
                          "`pip install 'tiltflow[diffusers]'`") from e
    return transformers


def _folder(name_or_path, what: str) -> Path:
    from .models.diffusers_adapter import _local_folder
    return _local_folder(name_or_path, what=what)


def _check_output(r, batch: int, who: str) -> torch.Tensor:
    if not torch.is_tensor(r) or tuple(r.shape) != (batch,):
        got = tuple(r.shape) if torch.is_tensor(r) else type(r).__name__
        raise ValueError(f"{who} must return one value per sample, shape ({batch},), got {got}")
    return r


def _check_pixels(x, who: str) -> None:
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{who} takes pixels (batch, 3, H, W) in [0, 1], got {got}; latents from a "
                         f"diffusers model need decoding first: tilt.rewards.Decoded({who}(...), vae)")


def _prompt_list(prompt, name: str = "prompt") -> list[str]:
    p = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not p or not all(isinstance(s, str) for s in p):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return p


def _tile_prompts(p: list[str], batch: int, where: str) -> list[str]:
    """k prompts for `batch` rows: k must divide the batch (rows tile in order, like cond rows)."""
    if batch % len(p):
        raise ValueError(f"{len(p)} prompts ({where}) for a batch of {batch} images: give one prompt, "
                         "one per row, or a count that divides the batch")
    return p * (batch // len(p))


class ImageReward:
    """Composition for rewards: w * r, r1 + r2, r1 − r2 give `Weighted` sums."""

    def __mul__(self, w):
        return Weighted([(w, self)])

    __rmul__ = __mul__

    def __add__(self, other):
        if not callable(other):
            return NotImplemented
        return Weighted(_terms(self) + _terms(other))

    def __radd__(self, other):
        if other == 0:              # sum([r1, r2]) starts from 0
            return Weighted(_terms(self))
        return self.__add__(other) if callable(other) else NotImplemented

    def __neg__(self):
        return Weighted([(-w, r) for w, r in _terms(self)])

    def __sub__(self, other):
        return self + (-1.0) * other


def _terms(r) -> list:
    return list(r.terms) if isinstance(r, Weighted) else [(1.0, r)]


class Weighted(ImageReward):
    """r(x, cond) = Σ_i w_i r_i(x, cond).  terms: [(w_i, r_i), ...]; returns (batch,)."""

    def __init__(self, terms):
        terms = list(terms)
        if not terms:
            raise ValueError("Weighted needs at least one (weight, reward) term")
        out = []
        for j, term in enumerate(terms):
            if not (isinstance(term, (tuple, list)) and len(term) == 2):
                raise ValueError(f"terms[{j}] must be a (weight, reward) pair, got {term!r}")
            w, r = term
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weight of terms[{j}] must be a finite number, got {w!r}")
            if not callable(r):
                raise ValueError(f"terms[{j}] reward must be callable r(x, cond), got {type(r).__name__}")
            for w2, r2 in _terms(r):      # flatten nested sums: one level, one repr
                out.append((float(w) * w2, r2))
        self.terms = out

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        total = 0.0
        for w, r in self.terms:
            total = total + w * _check_output(r(x, cond), x.shape[0], repr(r))
        return total

    def __repr__(self) -> str:
        return "Weighted(" + " + ".join(f"{w!r} * {r!r}" for w, r in self.terms) + ")"


# --- CLIP preprocessing in torch -------------------------------------------------------------------

def _field(v, key):
    if isinstance(v, int):
        return v
    got = v.get(key) if isinstance(v, dict) else getattr(v, key, None)
    return None if got is None else int(got)


class ClipPixels:
    """x: (batch, 3, H, W) in [0, 1] -> pixel_values (batch, 3, h, w) as the CLIP image processor.

    Mirrors transformers' CLIPImageProcessor: resize so the shortest edge is `size` (long edge
    int(size · long / short)), centre-crop `crop` at ((H − h) // 2, (W − w) // 2), normalise
    (x − mean) / std. The resize is torch's antialiased bicubic (PIL's filter, without PIL's
    rounding to 8 bits), so it is differentiable.
    """

    _MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}

    def __init__(self, image_processor):
        ip = image_processor
        size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
        self.do_resize = bool(getattr(ip, "do_resize", True)) and size is not None
        self.shortest = _field(size, "shortest_edge") if self.do_resize else None
        self.resize_hw = None
        if self.do_resize and self.shortest is None:
            self.resize_hw = (_field(size, "height"), _field(size, "width"))
        self.crop = None
        if getattr(ip, "do_center_crop", True) and crop is not None:
            self.crop = (_field(crop, "height"), _field(crop, "width")) if not isinstance(crop, int) else (crop, crop)
        resample = getattr(ip, "resample", None)
        self.mode = self._MODES.get(3 if resample is None else int(resample), "bicubic")
        norm = getattr(ip, "do_normalize", True)
        self.mean = torch.tensor(ip.image_mean if norm else [0.0] * 3, dtype=torch.float64).reshape(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std if norm else [1.0] * 3, dtype=torch.float64).reshape(1, 3, 1, 1)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.shortest is not None:
            short, long = min(h, w), max(h, w)
            new_long = int(self.shortest * long / short)
            h, w = (self.shortest, new_long) if h <= w else (new_long, self.shortest)
        elif self.resize_hw is not None:
            h, w = self.resize_hw
        return h, w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.output_size(x.shape[-2], x.shape[-1])
        if (h, w) != tuple(x.shape[-2:]):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode=self.mode, antialias=self.mode != "nearest",
                                                align_corners=False if self.mode != "nearest" else None)
        if self.crop is not None:
            ch, cw = self.crop
            if ch > h or cw > w:
                raise ValueError(f"images of {tuple(x.shape[-2:])} pixels resize to {(h, w)}, smaller than the "
                                 f"processor's crop {self.crop}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean.to(x)) / self.std.to(x)


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected features, >= 5 an output whose pooler_output they are
    return out if torch.is_tensor(out) else out.pooler_output


def _normalise(f: torch.Tensor) -> torch.Tensor:
    f = f.to(torch.promote_types(f.dtype, torch.float32))     # bf16 models: the cosine in float32
    return f / f.norm(dim=-1, keepdim=True)


class _ClipModel:
    """A frozen transformers CLIPModel with its tokenizer and differentiable pixel preprocessing."""

    def __init__(self, model, processor=None, dtype=None, device=None, what="CLIP model"):
        tf = _transformers()
        from .models.diffusers_adapter import _dtype
        self.source = str(model)
        folder = _folder(model, what)
        proc = _folder(processor, "CLIP processor") if processor is not None else folder
        self.model = tf.CLIPModel.from_pretrained(folder, local_files_only=True, torch_dtype=_dtype(dtype))
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = tf.AutoTokenizer.from_pretrained(proc, local_files_only=True)
        self.pixels = ClipPixels(tf.AutoImageProcessor.from_pretrained(proc, local_files_only=True))
        self._text: dict[str, torch.Tensor] = {}

    def _device(self, x: torch.Tensor):
        p = next(self.model.parameters())
        if p.device != x.device:
            self.model.to(x.device)
        return p.dtype

    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, 3, H, W) in [0, 1] -> unit-norm image embeddings (batch, D), differentiable."""
        dt = self._device(x)
        pix = self.pixels(x).to(dt)
        return _normalise(_features(self.model.get_image_features(pixel_values=pix)))

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str], device) -> torch.Tensor:
        """Unit-norm text embeddings (len(prompts), D), computed once per distinct prompt."""
        new = sorted({p for p in prompts if p not in self._text})
        if new:
            dev = next(self.model.parameters()).device
            tok = self.tokenizer(new, padding=True, truncation=True, return_tensors="pt",
                                 max_length=min(self.tokenizer.model_max_length, 77))
            f = _normalise(_features(self.model.get_text_features(
                input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))))
            self._text.update(zip(new, f))
        return torch.stack([self._text[p] for p in prompts]).to(device)   # (len(prompts), D)


class _TextImageReward(ImageReward):
    """scale · cos(image embedding, text embedding) of the sample's prompt; x: (b, 3, H, W) -> (b,)."""

    def __init__(self, clip: _ClipModel, scale: float, prompt):
        self.clip = clip
        self.scale = float(scale)
        self.prompt = None if prompt is None else _prompt_list(prompt)

    def prompts(self, cond, batch: int) -> list[str]:
        """The prompt of each of `batch` rows: prompt= if given, else from cond."""
        if self.prompt is not None:
            return _tile_prompts(self.prompt, batch, f"prompt= of {type(self).__name__}")
        p = cond.get("prompt") if isinstance(cond, dict) else cond
        if p is None:
            raise ValueError(f"{type(self).__name__} needs a text prompt: pass prompt= when building it, or "
                             "a cond with the prompt (a string, a list of strings, or a dict with 'prompt' as "
                             "encode_prompts returns)")
        return _tile_prompts(_prompt_list(p, "cond['prompt']"), batch, "in cond")

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        _check_pixels(x, type(self).__name__)
        prompts = self.prompts(cond, x.shape[0])
        img = self.clip.image_embeddings(x)
        txt = self.clip.text_embeddings(prompts, img.device)
        return (self.scale * (img * txt).sum(-1)).to(x.dtype)

    def __repr__(self) -> str:
        p = "" if self.prompt is None else f", prompt={self.prompt if len(self.prompt) > 1 else self.prompt[0]!r}"
        return f"{type(self).__name__}({self.clip.source!r}, scale={self.scale!r}{p})"


class CLIPScore(_TextImageReward):
    """r(x, c) = scale · cos(E_img(x), E_txt(c)) with a CLIP model (Hessel et al. 2021, CLIPScore).

    model: hub id (in the local cache) or folder with a CLIPModel; processor: where its tokenizer
    and image processor are (default: the same). scale 100 follows torchmetrics' CLIPScore, which
    also clamps at 0; we do not clamp, so the gradient never vanishes.
    x: (batch, 3, H, W) in [0, 1]; returns (batch,).
    """

    def __init__(self, model: str = DEFAULT_CLIP, processor: str | None = None, prompt=None,
                 scale: float = 100.0, dtype=None, device=None):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        super().__init__(_ClipModel(model, processor, dtype, device), scale, prompt)


class PickScore(_TextImageReward):
    """r(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c)) with the PickScore CLIP-H model (Kirstain
    et al. 2023), as its reference code scores a prompt and an image (≈ 100 × cosine).

    x: (batch, 3, H, W) in [0, 1]; returns (batch,).
    """

    def __init__(self, model: str = PICKSCORE, processor: str | None = PICKSCORE_PROCESSOR, prompt=None,
                 dtype=None, device=None):
        clip = _ClipModel(model, processor, dtype, device, what="PickScore model")
        super().__init__(clip, float(clip.model.logit_scale.detach().float().exp()), prompt)
        self._processor = processor

    def __repr__(self) -> str:
        p = "" if self.prompt is None else f", prompt={self.prompt if len(self.prompt) > 1 else self.prompt[0]!r}"
        return f"PickScore({self.clip.source!r}, processor={self._processor!r}{p})"


class Aesthetic(ImageReward):
    """r(x) = head(E_img(x) / |E_img(x)|): a linear or MLP head on unit-norm CLIP image embeddings
    (the LAION aesthetic predictor: CLIP ViT-L/14 and an MLP 768 → 1024 → 128 → 64 → 16 → 1).

    head: a safetensors file of Linear layers "<name>.weight" (out, in) and "<name>.bias" (out,),
    applied in the natural order of their names ("layers.0" < "layers.2" < "layers.10"); convert a
    .pth predictor once with safetensors.torch.save_file(torch.load(...)). activation: None (the
    LAION head has none between its layers) or "relu"/"gelu" between layers.
    x: (batch, 3, H, W) in [0, 1]; cond is ignored; returns (batch,).
    """

    def __init__(self, head, clip: str = DEFAULT_CLIP, processor: str | None = None, activation: str | None = None,
                 dtype=None, device=None):
        if activation not in (None, "relu", "gelu"):
            raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
        self.head_path, self.activation = Path(head), activation
        self.layers = _load_head(self.head_path)
        self.clip = _ClipModel(clip, processor, dtype, device)
        d = self.clip.model.config.projection_dim
        if self.layers[0][0].shape[1] != d:
            raise ValueError(f"the head in {head} takes {self.layers[0][0].shape[1]} features, but the CLIP model "
                             f"{clip!r} gives {d}")

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        _check_pixels(x, "Aesthetic")
        h = self.clip.image_embeddings(x)
        for j, (w, b) in enumerate(self.layers):
            h = h @ w.to(h).T + (0.0 if b is None else b.to(h))
            if self.activation is not None and j < len(self.layers) - 1:
                h = torch.relu(h) if self.activation == "relu" else torch.nn.functional.gelu(h)
        return h[:, 0].to(x.dtype)

    def __repr__(self) -> str:
        return f"Aesthetic({str(self.head_path)!r}, clip={self.clip.source!r}, activation={self.activation!r})"


def _natural(name: str):
    return [int(s) if s.isdigit() else s for s in name.split(".")]


def _load_head(path: Path) -> list:
    """[(W (out, in), b (out,) or None), ...] from a safetensors file, in natural name order."""
    if not path.is_file():
        raise FileNotFoundError(f"no aesthetic head at {path.resolve()} (a safetensors file of Linear weights)")
    from safetensors.torch import load_file
    state = load_file(str(path))
    names = sorted({k[:-len(".weight")] for k in state if k.endswith(".weight")}, key=_natural)
    if not names:
        raise ValueError(f"{path} holds no '<layer>.weight' tensors: {sorted(state)[:5]}")
    layers = []
    for n in names:
        w, b = state[n + ".weight"].float(), state.get(n + ".bias")
        if w.ndim != 2 or (b is not None and tuple(b.shape) != (w.shape[0],)):
            raise ValueError(f"{path}: layer {n!r} is not a Linear layer (weight {tuple(w.shape)}, "
                             f"bias {None if b is None else tuple(b.shape)})")
        if layers and layers[-1][0].shape[0] != w.shape[1]:
            raise ValueError(f"{path}: layer {n!r} takes {w.shape[1]} inputs after {layers[-1][0].shape[0]} outputs")
        layers.append((w, None if b is None else b.float()))
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"{path}: the last layer has {layers[-1][0].shape[0]} outputs; a reward head needs 1")
    return layers


# --- latents -> pixels ---------------------------------------------------------------------------

def _load_vae(vae, dtype=None):
    """An AutoencoderKL-like module from a module, a pipeline (its .vae) or a folder / cached hub id."""
    if hasattr(vae, "components"):
        if getattr(vae, "vae", None) is None:
            raise ValueError(f"pipeline {type(vae).__name__} has no VAE")
        return vae.vae, f"{type(vae).__name__}.vae"
    if hasattr(vae, "decode") and hasattr(vae, "config"):
        return vae, type(vae).__name__
    if not isinstance(vae, (str, Path)):
        raise ValueError(f"vae must be an AutoencoderKL, a pipeline or a folder, got {type(vae).__name__}")
    from .models.diffusers_adapter import _require
    _require()
    import diffusers
    folder = _folder(vae, "VAE")
    sub = "vae" if (folder / "vae" / "config.json").is_file() else None
    cfg = folder / (sub or "") / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no VAE in {folder}: neither {folder / 'vae' / 'config.json'} nor "
                                f"{folder / 'config.json'} exists")
    import json
    cls = getattr(diffusers, json.loads(cfg.read_text()).get("_class_name", "AutoencoderKL"))
    from .models.diffusers_adapter import _dtype
    return cls.from_pretrained(folder, subfolder=sub, local_files_only=True, torch_dtype=_dtype(dtype)), str(vae)


def decode_latents(vae, x: torch.Tensor, scaling_factor: float | None = None,
                   shift_factor: float | None = None) -> torch.Tensor:
    """pixels = clamp(D(x / s + μ) / 2 + 1/2, 0, 1), as the pipelines decode: latents x (b, C, h, w)
    -> (b, 3, H, W) in x's dtype, differentiable in x. s, μ default to the VAE's config (the
    pipelines' latents are (z − μ) · s); x must be on the VAE's device."""
    cfg = vae.config
    s = cfg.get("scaling_factor", 1.0) if scaling_factor is None else scaling_factor
    mu = (cfg.get("shift_factor", None) or 0.0) if shift_factor is None else shift_factor
    img = vae.decode((x / s + mu).to(next(vae.parameters()).dtype), return_dict=False)[0]
    return (img.to(x.dtype) / 2 + 0.5).clamp(0, 1)           # [-1, 1] -> [0, 1]


class Decoded(ImageReward):
    """A pixel reward on latents: r(x, c) = r_pix(clamp(D(x / s + μ) / 2 + 1/2, 0, 1), c).

    pixel_reward: r_pix(pixels (b, 3, H, W) in [0, 1], cond) -> (b,).
    vae: an AutoencoderKL, a pipeline (its .vae), or a folder / cached hub id holding one (itself
    or in the subfolder "vae"). scaling_factor s, shift_factor μ: default the VAE's config (the
    pipelines' latents are (z − μ) · s). The VAE is frozen; gradients flow through its decoder
    into x. gradient_checkpointing trades decoder compute for memory in that backward pass;
    dtype (e.g. "bfloat16") applies when the VAE is loaded from a folder.
    x: (batch, latent_channels, h, w); the decoded pixels must be (batch, 3, h·f, w·f), f the VAE's
    scale factor; returns (batch,).
    """

    def __init__(self, pixel_reward, vae, scaling_factor: float | None = None, shift_factor: float | None = None,
                 gradient_checkpointing: bool = False, dtype=None):
        if not callable(pixel_reward):
            raise ValueError(f"pixel_reward must be callable r(pixels, cond), got {type(pixel_reward).__name__}")
        self.reward = pixel_reward
        self.vae, self.source = _load_vae(vae, dtype)
        self.vae.eval().requires_grad_(False)
        cfg = self.vae.config
        s = cfg.get("scaling_factor", 1.0) if scaling_factor is None else scaling_factor
        mu = (cfg.get("shift_factor", None) or 0.0) if shift_factor is None else shift_factor
        for name, v in (("scaling_factor", s), ("shift_factor", mu)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if s == 0:
            raise ValueError("scaling_factor must be non-zero")
        self.scaling_factor, self.shift_factor = float(s), float(mu)
        self.channels = int(cfg.get("latent_channels", 4))
        self.factor = 2 ** (len(cfg.get("block_out_channels", (0,))) - 1)
        if gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """latents (b, C, h, w) -> pixels (b, 3, h·f, w·f) in [0, 1], differentiable in x."""
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != self.channels:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"latents must have shape (batch, {self.channels}, h, w) for this VAE, got {got}")
        if next(self.vae.parameters()).device != x.device:
            self.vae.to(x.device)
        img = decode_latents(self.vae, x, self.scaling_factor, self.shift_factor)
        want = (x.shape[0], 3, x.shape[2] * self.factor, x.shape[3] * self.factor)
        if tuple(img.shape) != want:
            raise ValueError(f"the VAE decoded latents {tuple(x.shape)} to pixels {tuple(img.shape)}, expected {want}")
        return img

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return _check_output(self.reward(self.decode(x), cond), x.shape[0], repr(self.reward)).to(x.dtype)

    def __repr__(self) -> str:
        return (f"Decoded({self.reward!r}, vae={self.source!r}, scaling_factor={self.scaling_factor!r}, "
                f"shift_factor={self.shift_factor!r})")
