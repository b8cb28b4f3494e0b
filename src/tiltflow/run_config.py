"""TOML (or YAML) run configs for fine-tuning diffusers bases: `tiltflow finetune --config run.toml`.

A run config names everything one fine-tuning of a text-to-image model needs, flat:

    base = "stabilityai/stable-diffusion-3.5-medium"   # hub id in the local HF cache, or a folder
    dtype = "bfloat16"
    guidance_scale = 1.0
    reward = "pickscore"                                # REWARD_NAMES below
    objective = "cvar"                                  # expected | cvar
    level = 0.1
    tail = "left"
    lam = 0.05
    iters = 200
    prompts = ["a red bicycle", "a cat on a mat"]
    lora_rank = 16
    mixed_precision = "bf16"
    validation_prompts = ["a red bicycle"]
    validation_every = 50
    out = "runs/sd3-left"

    [reward_options]                                    # keyword arguments of the reward
    model = "/models/pickscore"

The same keys in a .yaml / .yml file (`reward_options:` a nested mapping) are read with PyYAML's
safe loader. Keys are the fields of `RunConfig` (the model, reward, objective, prompts, validation, out) and of
methods.finetune.FinetuneConfig (lam, iters, batch_size, grad_accum, lora_rank, mixed_precision,
...); any other key is a ValueError naming it. The CLI's flags override the file's values.

What a run does: load the pipeline from the folder or the cache (never downloaded), encode the
prompts once with its own text encoders (negative prompts too when guidance_scale ≠ 1), wrap its
network with models.diffusers_adapter.from_diffusers, fine-tune with one prompt per micro-batch,
and every `validation_every` iterations write validation/step_NNNNNNNN.safetensors (the latents of
`validation_n` ODE samples per validation prompt, fixed noise) and, when the pipeline has a VAE,
validation/step_NNNNNNNN.png (the decoded grid, one row per prompt).

Rewards by name: "latent_mean" (r = scale · mean latent value, a toy with a closed-form tilt) and,
when tiltflow.image_rewards is importable, "clip_score", "pickscore", "aesthetic": pixel rewards
decoded from the latents through the pipeline's VAE (image_rewards.Decoded).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .methods.finetune import FinetuneConfig
from .validation import one_of, positive, positive_int


@dataclass
class RunConfig:
    """The run-level settings of a TOML run config (FinetuneConfig holds the optimisation ones)."""
    base: str = ""                        # diffusers pipeline: a folder written by save_pretrained, or a cached hub id
    dtype: str | None = None              # weights' dtype, e.g. "bfloat16" (None: as stored)
    guidance_scale: float = 1.0           # classifier-free guidance of the base (1: none, the base is a true flow)
    latent_size: int | None = None        # latent height = width (None: the network's sample_size)
    reward: str = "latent_mean"           # a name in REWARD_NAMES
    reward_options: dict = field(default_factory=dict)   # keyword arguments of the reward
    objective: str = "expected"           # expected or cvar
    level: float = 0.1                    # CVaR tail mass β
    tail: str = "right"                   # CVaR tail
    smoothing: float = 0.0                # softplus width τ of the CVaR hinge in stage 2
    per_prompt: bool = False              # CVaR: one threshold η* per prompt instead of one pooled
    prompts: list = field(default_factory=list)          # training prompts (one per micro-batch, cycled)
    negative_prompt: str | None = None    # with guidance_scale ≠ 1 (None: the empty prompt)
    validation_prompts: list = field(default_factory=list)  # (empty: the first four training prompts)
    validation_every: int = 0             # write validation samples every N iterations (0: never)
    validation_n: int = 2                 # samples per validation prompt
    validation_steps: int = 28            # Euler steps of the validation ODE
    out: str = "runs/sd"                  # run folder
    resume: bool = False                  # continue from the newest checkpoint in `out`

    def __post_init__(self):
        if not isinstance(self.base, str) or not self.base:
            raise ValueError("base must name a diffusers pipeline: a folder written by save_pretrained or a hub id "
                             "in the local Hugging Face cache, e.g. base = \"stabilityai/stable-diffusion-3.5-medium\"")
        if not isinstance(self.prompts, list) or not self.prompts or \
                not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {self.prompts!r}")
        if not isinstance(self.validation_prompts, list) or not all(isinstance(p, str) for p in self.validation_prompts):
            raise ValueError(f"validation_prompts must be a list of strings, got {self.validation_prompts!r}")
        one_of(self.objective, "objective", ("expected", "cvar"))
        positive_int(self.validation_every, "validation_every", minimum=0)
        positive_int(self.validation_n, "validation_n")
        positive_int(self.validation_steps, "validation_steps")
        if not isinstance(self.reward_options, dict):
            raise ValueError(f"reward_options must be a table of keyword arguments, got {self.reward_options!r}")
        positive(self.guidance_scale, "guidance_scale")


# --- reading ---------------------------------------------------------------------------------------

def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:     # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ImportError("reading TOML run configs on Python 3.10 needs tomli: pip install 'tiltflow[config]' "
                              "(Python 3.11+ has tomllib built in)") from None
    return tomllib


def valid_keys() -> list[str]:
    return sorted({f.name for f in fields(RunConfig)} | set(FinetuneConfig.__dataclass_fields__))


def _yaml():
    try:
        import yaml
    except ModuleNotFoundError:
        raise ImportError("reading YAML run configs needs PyYAML: "
                          "pip install 'tiltflow[config]' (or tiltflow[diffusers])") from None
    return yaml


def read(path) -> dict:
    """The key → value table of a TOML run config (or YAML: .yaml / .yml, the same keys);
    ValueError for unknown keys or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run config {str(path)!r}")
    if path.suffix.lower() in (".yaml", ".yml"):
        yaml = _yaml()
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    else:
        tomllib = _toml()
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    known = set(valid_keys())
    for key in data:
        if key not in known:
            raise ValueError(f"unknown key {key!r} in {path}; valid keys: {', '.join(valid_keys())}")
    return data


def split(values: dict) -> tuple[RunConfig, dict]:
    """(RunConfig, FinetuneConfig keyword arguments) from one flat table of values, checked."""
    run_names = {f.name for f in fields(RunConfig)}
    types = {f.name: f.type for f in fields(FinetuneConfig)}
    run = RunConfig(**{k: v for k, v in values.items() if k in run_names})
    ft = {}
    for k, v in values.items():
        if k in run_names:
            continue
        if k not in types:
            raise ValueError(f"unknown setting {k!r}; valid keys: {', '.join(valid_keys())}")
        ft[k] = tuple(v) if isinstance(v, list) and "tuple" in str(types[k]) else v
    FinetuneConfig(**ft)      # unknown or mistyped fields surface here; values are checked by finetune
    return run, ft


# --- rewards by name -------------------------------------------------------------------------------

class LatentMean:
    """r(x) = scale · mean of the latent x: (batch, C, H, W) -> (batch,). The tilt by exp(r/λ) shifts
    every latent entry's mean by scale / (λ · C·H·W) when the base is Gaussian."""

    name = "latent_mean"

    def __init__(self, scale: float = 1.0):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.scale * x.flatten(1).mean(1)

    def __repr__(self) -> str:
        return f"LatentMean(scale={self.scale:g})"


IMAGE_REWARDS = {"clip_score": "CLIPScore", "pickscore": "PickScore", "aesthetic": "Aesthetic"}


def reward_names() -> list[str]:
    """The names `reward = "..."` accepts (image rewards only where tiltflow.image_rewards imports)."""
    names = ["latent_mean"]
    try:
        from . import image_rewards
        names += [n for n, cls in IMAGE_REWARDS.items() if hasattr(image_rewards, cls)]
    except ImportError:
        pass
    return names


def make_reward(name: str, options: dict, pipe=None):
    """The reward `name` built with `options`; image rewards score the pipeline's VAE decoding."""
    if name == "latent_mean":
        return LatentMean(**options)
    if name in IMAGE_REWARDS:
        try:
            from . import image_rewards
        except ImportError as e:
            raise ImportError(f"reward {name!r} needs tiltflow.image_rewards ({e}); install "
                              "`pip install 'tiltflow[diffusers]'`") from e
        cls = getattr(image_rewards, IMAGE_REWARDS[name], None)
        if cls is not None:
            if pipe is None or getattr(pipe, "vae", None) is None:
                raise ValueError(f"reward {name!r} scores pixels: the pipeline needs a VAE to decode the latents")
            return image_rewards.Decoded(cls(**options), pipe)
    raise ValueError(f"unknown reward {name!r}; valid: {', '.join(reward_names())}")


def make_objective(run: RunConfig, reward):
    from .objectives import CVaR, ExpectedReward
    if run.objective == "expected":
        return ExpectedReward(reward)
    return CVaR(reward, level=run.level, tail=run.tail, smoothing=run.smoothing, per_prompt=run.per_prompt)


# --- validation samples ----------------------------------------------------------------------------

def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Pixels (b, 3, H, W) in [0, 1] on the CPU of latents (b, C, h, w), as the pipelines decode
    (image_rewards.decode_latents)."""
    from .image_rewards import decode_latents
    with torch.no_grad():
        img = decode_latents(pipe.vae, latents.float().to(next(pipe.vae.parameters()).device))
    return img.cpu()


def write_grid(path: Path, images: torch.Tensor, rows: int) -> None:
    """images (n, 3, H, W) in [0, 1] as one PNG, `rows` rows (one per prompt)."""
    from PIL import Image
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    grid = torch.zeros(3, rows * h, cols * w)
    for k in range(n):
        i, j = divmod(k, cols)
        grid[:, i * h:(i + 1) * h, j * w:(j + 1) * w] = images[k]
    arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


def validation_callback(run: RunConfig, pipe, conds: list, every: int, iters: int, seed: int, tracker=None):
    """callback(iteration, record, model) of finetune writing validation samples every `every`
    iterations (and their decoded grid to `tracker`, a tracking.Tracker, as "validation")."""
    from safetensors.torch import save_file

    from . import distributed, integrators
    folder = Path(run.out) / "validation"
    prompts = run.validation_prompts or run.prompts[:4]

    def callback(it, record, model):
        if not (it % every == 0 or it == iters) or not distributed.is_main():
            return
        folder.mkdir(parents=True, exist_ok=True)
        was_training = model.training
        model.eval()
        if hasattr(model.net, "scheduler_grid"):      # the pipeline's own σ grid (SD3: shifted)
            grid = model.net.scheduler_grid(run.validation_steps, device=model.device)
        else:
            grid = integrators.time_grid(run.validation_steps, device=model.device)
        xs = []
        with torch.no_grad():
            for c in conds:     # the same noise at every validation and for every prompt
                x0 = model.prior(run.validation_n, torch.Generator(device=model.device).manual_seed(seed))
                xs.append(integrators.ode_solve(lambda y, t, c=c: model.velocity(y, t, c), x0, grid, "euler"))
        model.train(was_training)
        x = torch.cat(xs).float().cpu().contiguous()
        stem = folder / f"step_{it:08d}"
        save_file({"latents": x}, str(stem.with_suffix(".safetensors")),
                  metadata={"prompts": json.dumps(prompts), "per_prompt": str(run.validation_n),
                            "iteration": str(it), "steps": str(run.validation_steps)})
        if getattr(pipe, "vae", None) is not None:
            write_grid(stem.with_suffix(".png"), decode(pipe, x), rows=len(prompts))
            if tracker is not None:
                tracker.log_figure("validation", stem.with_suffix(".png"), it)

    return callback, prompts


# --- the run ---------------------------------------------------------------------------------------

def load_pipeline(base: str, dtype=None):
    """A diffusers pipeline from a folder or the local Hugging Face cache (nothing is downloaded)."""
    from .models import diffusers_adapter as da
    da._require()
    import diffusers
    import inspect
    folder = da._local_folder(base)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} holds no model_index.json: not a diffusers pipeline folder")
    parts = json.loads(index.read_text())
    cls = getattr(diffusers, parts.get("_class_name", ""), diffusers.DiffusionPipeline)
    # components saved as None (e.g. SD3 without its T5 encoder) must be passed as None again
    absent = {n: None for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty
              and (parts.get(n) is None or parts.get(n) == [None, None])}
    return cls.from_pretrained(folder, local_files_only=True, torch_dtype=da._dtype(dtype), **absent)


def run_finetune(run: RunConfig, ft: dict, progress: bool = True, report_to: str = "none"):
    """Fine-tune the pipeline `run.base` as the run config says; returns the fine-tuned FlowModel.

    ft: FinetuneConfig keyword arguments (lam, iters, ...); report_to: experiment tracking
    ("none", "tensorboard", "wandb"; the log.jsonl records and the validation grids). Under torchrun only rank 0 writes run_config.json."""
    from . import checkpoint as ckpt
    from . import distributed as dist
    from .methods.finetune import finetune
    from .models import diffusers_adapter as da
    from .tracking import tracked

    pipe = load_pipeline(run.base, run.dtype)
    model = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet
    device = dist.device(ft.get("device", "auto"), model)
    guided = run.guidance_scale != 1.0
    neg = None if not guided else [run.negative_prompt or ""] * len(run.prompts)
    # the text encoders stay where the pipeline loaded them; only the embeddings move to `device`
    to = lambda c: {k: v.to(device) if torch.is_tensor(v) else v for k, v in c.items()}  # noqa: E731
    cond = to(da.encode_prompts(pipe, run.prompts, negative_prompts=neg, guidance=guided))  # with "prompt" for image rewards
    val_prompts = run.validation_prompts or run.prompts[:4]
    vneg = None if not guided else [run.negative_prompt or ""] * len(val_prompts)
    vcond = to(da.encode_prompts(pipe, val_prompts, negative_prompts=vneg, guidance=guided))
    val_conds = [{k: v[j:j + 1] for k, v in vcond.items()} for j in range(len(val_prompts))]
    shape = None
    if run.latent_size is not None:
        shape = (model.config.in_channels, run.latent_size, run.latent_size)
    base = da.from_diffusers(pipe, guidance_scale=run.guidance_scale, shape=shape, device=device)
    reward = make_reward(run.reward, dict(run.reward_options), pipe)
    objective = make_objective(run, reward)
    out = Path(run.out)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / "run_config.json", {**asdict(run), **ft})
    # one tracker: the loop's records and the validation grids
    with tracked(report_to, out, "finetune", {**asdict(run), **ft}, enabled=dist.is_main()) as tracker:
        callback = None
        if run.validation_every > 0:
            callback, _ = validation_callback(run, pipe, val_conds, run.validation_every,
                                              ft.get("iters", FinetuneConfig.iters), ft.get("seed", 0), tracker)
        return finetune(base, objective, out=out, resume=run.resume, progress=progress, prompts=cond,
                        callback=callback, report_to=tracker, **ft)
