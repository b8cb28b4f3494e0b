"""The `tiltflow` command: pretrain | finetune | gft | fdc | sample-energy | sample | evaluate | demo | molecules | digits.

Each training command writes a run folder (config.json, log.jsonl, metrics.json,
model.safetensors, checkpoints/, plots) and can be resumed with --resume. The flags of
`pretrain`, `finetune`, `gft`, `demo`, `molecules` and `digits` map one to one onto the fields of
PretrainConfig, FinetuneConfig, GFTConfig, DemoConfig, MoleculesConfig and DigitsConfig. User
errors (a missing run folder or model file, an unknown name, an invalid setting) print one line
and exit with code 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed
from . import rewards as rewards_mod
from .methods.finetune import FinetuneConfig, finetune
from .methods import gft as gft_mod
from .methods.gft import GFTConfig, gradual_finetune
from .methods.fdc import FDCConfig, fdc
from .methods.pretrain import PretrainConfig, pretrain
from .methods.sample_energy import EnergyConfig, sample_energy
from .metrics import energy_distance, mean_pairwise_distance, reward_summary
from .models.flow_model import FlowModel
from .objectives import CVaR, ExpectedReward
from .tasks import toy2d

EXIT_USER_ERROR = 2
EVAL_SEED_OFFSET = 1000     # evaluation samples never share a stream with training
RUN_INFO = "cli.json"       # names (task, reward, objective) a run was made with


# --- configuration ---------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """How fresh samples are drawn to evaluate a model (saved with every evaluation)."""
    n_eval: int = 2000       # ODE samples per model for rewards, diversity, energy distances
    eval_steps: int = 50     # Heun steps of the ODE (and of the log-likelihood integral)
    n_kl: int = 500          # samples for the KL(fine-tuned ‖ base) estimate by log-likelihoods; 0 skips


@dataclass
class DemoConfig:
    """The main job: pretrain on a 2-D task, then fine-tune by expected reward, left CVaR and
    right CVaR, and compare (printed and saved as config.json in the demo folder)."""
    task: str = "mixture"                 # toy2d task the base model is pretrained on
    reward: str = "linear"                # rewards.REWARDS name; linear r(x) = x₁ + 0.5·x₂
    lam: float = 3.0                      # KL weight λ of every fine-tuning
    level: float = 0.1                    # CVaR tail mass β
    pretrain_steps: int = 3000
    pretrain_batch_size: int = 256
    hidden: tuple = (128, 128, 128)       # MLP widths of the base model
    iters: int = 300                      # Adjoint Matching iterations of each fine-tuning
    batch_size: int = 256                 # trajectories per fine-tuning iteration
    steps: int = 20                       # memoryless-SDE steps per trajectory
    lr: float = 2e-3                      # fine-tuning learning rate
    n_eval: int = 2000
    eval_steps: int = 50
    n_kl: int = 500
    seed: int = 0
    device: str = "auto"                  # auto: the GPU when there is one, else the CPU


# `demo --fast`: the same pipeline in about 30 seconds (used by the CLI test); pictures are rough.
FAST = dict(pretrain_steps=400, iters=30, batch_size=64, steps=10, n_eval=500, eval_steps=20, n_kl=100)


@dataclass
class MoleculesConfig:
    """Conformers of one molecule: pretrain an EGNN on ETKDG + MMFF94 conformers, fine-tune it
    toward −MMFF94 energy (expected or CVaR), write SDF (saved as config.json in the folder)."""
    smiles: str = "CCO"                   # SMILES, or a .smi/.sdf/.mol file (its first molecule)
    n_conformers: int = 256               # ETKDG + MMFF94 conformers (the data), cached on disk
    reward: str = "mmff"                  # mmff: −MMFF94 energy (kcal/mol); rg: −radius of gyration (Å)
    objective: str = "cvar"               # expected or cvar
    level: float = 0.1                    # CVaR tail mass β
    tail: str = "left"                    # CVaR tail; left: lift the worst (highest-energy) conformers
    lam: float = 100.0                    # KL weight λ (in reward units: kcal/mol for mmff)
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 128
    pretrain_lr: float = 2e-3
    hidden: tuple = (64, 64, 64, 64)      # EGNN: (width,) * layers
    iters: int = 40                       # Adjoint Matching iterations
    batch_size: int = 64                  # trajectories per fine-tuning iteration
    steps: int = 20                       # memoryless-SDE steps per trajectory
    lr: float = 2e-4                      # fine-tuning learning rate
    n_offline: int = 1024                 # base samples for the CVaR threshold (stage 1)
    n_samples: int = 100                  # samples of base and fine-tuned model written as SDF and evaluated
    sample_steps: int = 50                # Heun steps of the ODE samples
    seed: int = 0
    device: str = "auto"                  # auto: the GPU when there is one, else the CPU


def _field_help(cls) -> dict:
    """The trailing `# comment` of each dataclass field, used as its --help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M)}


def _int_tuple(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,256,256, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,256,256, got {text!r}")
    return values


def _optional_float(text: str):
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_names(text: str):
    """Comma-separated names (e.g. LoRA target modules), or none."""
    if text.lower() == "none":
        return None
    return tuple(v.strip() for v in text.split(",") if v.strip()) or None


def _optional_int(text: str):
    if text.lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}")


def _add_config_flags(p: argparse.ArgumentParser, cls, skip=(), no_defaults: bool = False,
                      overrides: dict | None = None):
    """One flag --field-name per dataclass field, typed by its default."""
    helps = _field_help(cls)
    overrides = overrides or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        default = overrides.get(f.name, f.default)
        if default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        kind = (_bool if isinstance(default, bool) else
                _int_tuple if isinstance(default, tuple) else
                _json_dict if isinstance(default, dict) else
                float if isinstance(default, float) else
                int if isinstance(default, int) else
                (_optional_float if "float" in str(f.type) else _optional_names if "tuple" in str(f.type)
                 else _optional_int) if default is None else str)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                       default=None if no_defaults else default, metavar=f.name.upper(),
                       help=f"{helps.get(f.name, '')} (default: {shown})".strip())


def _config_from(args, cls, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in skip}


def _progress_flags(p):
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the configuration is still printed)")


def _base_run_flag(p, required: bool = True):
    """--run (alias --base-run: torchrun's parser takes --run for its own --run-path)."""
    p.add_argument("--run", "--base-run", dest="run", required=required,
                   help="run folder holding model.safetensors (e.g. runs/pre); spell it --base-run under "
                        "torchrun, whose parser takes --run for its own --run-path")


def _run_folder_flags(p, out: str, resume_help: str = "continue from the newest checkpoint in --out"):
    """--out (a run folder), --resume and --no-progress: the flags every training command has."""
    p.add_argument("--out", default=out, help=f"run folder (default: {out})")
    p.add_argument("--resume", action="store_true", help=resume_help)
    _progress_flags(p)


# --- helpers ---------------------------------------------------------------------------------

def _run_dir(run) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist; pass the --out of a "
                                "finished `tiltflow pretrain` or `tiltflow finetune`")
    return run


def _load_model(run, device="auto") -> FlowModel:
    """The model of a finished run folder, on `device` (distributed.device: "auto" picks the GPU if any)."""
    f = _run_dir(run) / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"no model file {str(f)!r}: the run has not finished; "
                                "complete it with --resume or pass another --run")
    return FlowModel.load(f, device=distributed.device(device))


def _run_info(run) -> dict:
    f = Path(run) / RUN_INFO
    return json.loads(f.read_text()) if f.is_file() else {}


def _plots():
    """The plots module, or None with a note naming the extra (plots are optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: skipping plots: plotting needs matplotlib: pip install 'tiltflow[plot]'", file=sys.stderr)
        return None
    from . import plots
    return plots


def _exact_tilt(task, reward, lam: float):
    """The exact tilt p ∝ p_task·exp(r/λ) when it has a closed form (GaussianMixture with a
    linear or quadratic reward), else None."""
    if not isinstance(task, toy2d.GaussianMixture):
        return None
    if isinstance(reward, rewards_mod.Linear):
        return task.tilt_linear(reward.a, lam)
    if isinstance(reward, rewards_mod.Quadratic):
        return task.tilt_quadratic(reward.A, lam, reward.b)
    return None


def _exact_tilt_kl(task, reward, lam: float) -> float | None:
    """KL(p* ‖ p) = E_p*[r]/λ − log Z with Z = E_p exp(r/λ), for a linear reward on a mixture:
    log Z = log Σ_k π_k exp(a·μ_k/λ + aᵀΣ_k a/(2λ²)) and E_p*[r] = a·E_p*[x]."""
    if not (isinstance(task, toy2d.GaussianMixture) and isinstance(reward, rewards_mod.Linear)):
        return None
    a = reward.a
    w, mu, cov = task.weights.double(), task.means.double(), task.covs.double()
    log_z = torch.logsumexp(w.log() + mu @ a / lam + (cov @ a @ a) / (2 * lam**2), dim=0)
    mean_star = task.tilt_linear(a, lam).mean().double()
    return float(mean_star @ a / lam - log_z)


def _evaluate(model: FlowModel, reward, ev: EvalConfig, seed: int, base: FlowModel | None = None):
    """Reward summary and diversity of fresh ODE samples; with `base`, also the estimate
    KL(p_model ‖ p_base) ≈ mean over n_kl model samples of log p_model(x) − log p_base(x).

    Returns (stats dict, samples (n, *shape), rewards (n,)).
    """
    x = model.sample(ev.n_eval, steps=ev.eval_steps, seed=seed + EVAL_SEED_OFFSET)
    with torch.no_grad():
        r = reward(x) if reward is not None else None
    stats = {"n": ev.n_eval, "ode_steps": ev.eval_steps,
             "diversity": mean_pairwise_distance(x[:2000].cpu())}
    if r is not None:
        stats.update({f"reward_{k}": v for k, v in reward_summary(r.float().cpu()).items()})
    if base is not None and ev.n_kl > 0:
        xk = x[: ev.n_kl]
        kl = (model.log_prob(xk, steps=ev.eval_steps) - base.log_prob(xk, steps=ev.eval_steps)).mean()
        stats["kl"] = float(kl)
        stats["kl_n"] = xk.shape[0]
    return stats, x.cpu(), (None if r is None else r.cpu())


def _print_config(name: str, cfg) -> None:
    if distributed.is_main():
        print(f"tiltflow {name}: {cfg}")


# --- pretrain --------------------------------------------------------------------------------

def _run_pretrain(task_name: str, out, cfg: dict, resume: bool, progress: bool) -> FlowModel:
    task = toy2d.get_task(task_name)
    if not progress:
        _print_config("pretrain", PretrainConfig(**cfg))
    model = pretrain(task, out=out, resume=resume, progress=progress, **cfg)
    if not distributed.is_main():   # under torchrun only rank 0 writes and plots
        return model
    out = Path(out)
    ckpt.write_json(out / RUN_INFO, {"command": "pretrain", "task": task_name})
    plots = _plots()
    if plots is not None:
        g = torch.Generator().manual_seed(cfg["seed"] + EVAL_SEED_OFFSET)
        plots.plot_samples(out / "samples.png",
                           {"data": task.sample(2000, generator=g),
                            "model": model.sample(2000, steps=50, seed=cfg["seed"] + EVAL_SEED_OFFSET)},
                           title=f"pretrained on {task_name}")
    return model


def cmd_pretrain(args) -> int:
    cfg = _config_from(args, PretrainConfig)
    _run_pretrain(args.task, args.out, cfg, args.resume, not args.no_progress)
    if not distributed.is_main():
        return 0
    print(f"wrote {args.out}/: model.safetensors, metrics.json, log.jsonl, samples.png")
    return 0


# --- finetune --------------------------------------------------------------------------------

def _make_objective(objective: str, reward, level: float, tail: str, smoothing: float):
    if objective == "expected":
        return ExpectedReward(reward)
    if objective == "cvar":
        return CVaR(reward, level=level, tail=tail, smoothing=smoothing)
    raise ValueError(f"unknown objective {objective!r}; valid: expected, cvar")


def _run_finetune(base_run, out, reward_name: str, objective: str, level: float, tail: str,
                  smoothing: float, cfg: dict, ev: EvalConfig, resume: bool, progress: bool) -> dict:
    """Fine-tune the model of `base_run`, evaluate base and result on fresh ODE samples, plot.

    Returns {"base": stats, "finetuned": stats, ...} (also stored in metrics.json) plus the
    samples and rewards under "_samples" for callers that draw more figures.
    """
    reward = rewards_mod.get_reward(reward_name)
    obj = _make_objective(objective, reward, level, tail, smoothing)
    base = _load_model(base_run, cfg["device"])
    info = _run_info(base_run)
    task_name = info.get("task")
    if not progress:
        _print_config("finetune", FinetuneConfig(**cfg))
    ft = finetune(base, obj, out=out, resume=resume, progress=progress, **cfg)
    if not distributed.is_main():   # under torchrun only rank 0 evaluates, writes and plots
        return None

    out = Path(out)
    label = "expected reward" if objective == "expected" else f"{tail} CVaR (β = {level:g})"
    ckpt.write_json(out / RUN_INFO, {"command": "finetune", "task": task_name, "base_run": str(base_run),
                                     "reward": reward_name, "objective": objective, "level": level,
                                     "tail": tail, "smoothing": smoothing, "lam": cfg["lam"]})
    b_stats, xb, rb = _evaluate(base, reward, ev, cfg["seed"])
    f_stats, xf, rf = _evaluate(ft, reward, ev, cfg["seed"], base=base)
    evaluation = {"config": asdict(ev), "seed": cfg["seed"] + EVAL_SEED_OFFSET,
                  "base": b_stats, "finetuned": f_stats}
    panels, hists = {"base": xb, f"fine-tuned ({label})": xf}, {"base": rb, "fine-tuned": rf}
    task = toy2d.get_task(task_name) if task_name else None
    exact = _exact_tilt(task, reward, cfg["lam"]) if objective == "expected" else None
    if exact is not None:
        g = torch.Generator().manual_seed(cfg["seed"] + EVAL_SEED_OFFSET)
        y, y2 = exact.sample(ev.n_eval, generator=g), exact.sample(ev.n_eval, generator=g)
        ry = reward(y)
        evaluation["exact_tilt"] = {
            "energy_distance_finetuned": energy_distance(xf, y),
            "energy_distance_base": energy_distance(xb, y),
            "energy_distance_noise_floor": energy_distance(y2, y),
            "kl": _exact_tilt_kl(task, reward, cfg["lam"]),
            "diversity": mean_pairwise_distance(y[:2000]),
            **{f"reward_{k}": v for k, v in reward_summary(ry.float()).items()},
        }
        panels["exact tilt"] = y
        hists["exact tilt"] = ry

    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["evaluation"] = evaluation
    ckpt.write_json(metrics_path, metrics)

    plots = _plots()
    if plots is not None:
        title = f"{reward!r}, {label}, λ = {cfg['lam']:g}"
        plots.plot_samples(out / "before_after.png", panels, title=title, density=reward)
        plots.plot_training(out / "training.png", out / "log.jsonl", title=f"Adjoint Matching: {label}")
        plots.plot_reward_hist(out / "reward_hist.png", hists, level=level if objective == "cvar" else 0.1)
    samples = {"base": (xb, rb), "finetuned": (xf, rf)}
    if exact is not None:
        samples["exact tilt"] = (y, ry)
    return {**evaluation, "_samples": samples}


def _print_eval_table(rows: dict) -> None:
    cols = [("reward_mean", "reward mean"), ("reward_cvar_left_10", "CVaR₁₀ left"),
            ("reward_cvar_right_10", "CVaR₁₀ right"), ("kl", "KL"), ("diversity", "diversity")]
    width = max(len(k) for k in rows) + 2
    print("model".ljust(width) + "".join(h.rjust(14) for _, h in cols))
    for name, stats in rows.items():
        cells = []
        for k, _ in cols:
            v = stats.get(k)
            cells.append(("—" if v is None else f"{v:.3f}").rjust(14))
        print(name.ljust(width) + "".join(cells))


def _finetune_flags(s, no_defaults: bool = False):
    """The flags of `tiltflow finetune` (no_defaults: every default None, to see what was given)."""
    d = (lambda v: None) if no_defaults else (lambda v: v)  # noqa: E731
    _base_run_flag(s, required=False)
    s.add_argument("--config", default=None,
                   help="a TOML or YAML run config for a diffusers base (run_config.py: base, reward, prompts, "
                        "validation, ...) instead of --run; the flags given here override its values")
    s.add_argument("--reward", default=d("linear"), help=f"one of: {', '.join(rewards_mod.REWARDS)}; with "
                   "--config: latent_mean, clip_score, pickscore, aesthetic (default: linear)")
    s.add_argument("--objective", default=d("expected"), choices=("expected", "cvar"),
                   help="expected reward, or CVaR of the reward (tail-aware) (default: expected)")
    s.add_argument("--level", type=float, default=d(0.1), help="CVaR tail mass β in (0, 1] (default: 0.1)")
    s.add_argument("--tail", default=d("right"), choices=("right", "left"), help="CVaR tail (default: right)")
    s.add_argument("--smoothing", type=float, default=d(0.0),
                   help="softplus width τ of the CVaR hinge in stage 2 (default: 0, the exact hinge)")
    _add_config_flags(s, FinetuneConfig, no_defaults=no_defaults)
    _add_config_flags(s, EvalConfig, no_defaults=no_defaults)
    s.add_argument("--out", default=d("runs/ft"), help="run folder (default: runs/ft; with --config: its `out`)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    _progress_flags(s)


def cmd_finetune_config(args) -> int:
    """`finetune --config run.toml`: a diffusers base, with the given flags overriding the file."""
    from . import run_config
    values = run_config.read(args.config)
    explicit = argparse.ArgumentParser(add_help=False)
    _finetune_flags(explicit, no_defaults=True)
    given, _ = explicit.parse_known_args(getattr(args, "argv", None) or [])
    run_keys = {f.name for f in fields(run_config.RunConfig)}
    for k, v in vars(given).items():
        if v is None or k in ("config", "run", "no_progress") or (k == "resume" and not v):
            continue
        if k in run_keys or k in FinetuneConfig.__dataclass_fields__:
            values[k] = v
        elif k in EvalConfig.__dataclass_fields__:
            raise ValueError(f"--{k.replace('_', '-')} evaluates 2-D runs and does not apply with --config")
    run, ft = run_config.split(values)
    if args.no_progress and distributed.is_main():
        print(f"tiltflow finetune: {run} {FinetuneConfig(**ft)}")
    run_config.run_finetune(run, ft, progress=not args.no_progress)
    if distributed.is_main():
        extra = ", validation/" if run.validation_every else ""
        print(f"wrote {run.out}/: model.safetensors, lora.safetensors (with lora_rank), run_config.json, "
              f"metrics.json, log.jsonl{extra}")
    return 0


def cmd_finetune(args) -> int:
    if args.config is not None:
        if args.run is not None:
            raise ValueError("pass either --run (a tiltflow run folder) or --config (a TOML or YAML run config), not both")
        return cmd_finetune_config(args)
    if args.run is None:
        raise ValueError("finetune needs --run (a run folder holding model.safetensors) or --config run.toml")
    cfg = _config_from(args, FinetuneConfig)
    ev = EvalConfig(**_config_from(args, EvalConfig))
    res = _run_finetune(args.run, args.out, args.reward, args.objective, args.level, args.tail,
                        args.smoothing, cfg, ev, args.resume, not args.no_progress)
    if res is None:
        return 0
    _print_eval_table({"base": res["base"], "fine-tuned": res["finetuned"]})
    if "exact_tilt" in res:
        e = res["exact_tilt"]
        print(f"energy distance to the exact tilt: fine-tuned {e['energy_distance_finetuned']:.4f}, "
              f"base {e['energy_distance_base']:.4f} (noise floor {e['energy_distance_noise_floor']:.4f})")
    print(f"wrote {args.out}/: model.safetensors, metrics.json, log.jsonl, before_after.png, "
          "training.png, reward_hist.png")
    return 0


# --- gft -------------------------------------------------------------------------------------

def _load_samples(path) -> torch.Tensor:
    """Samples (n, d) from a .npy file or a .safetensors file (key "samples", or its only tensor)."""
    path = Path(path)
    if path.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"--target must be a .npy or .safetensors file (no pickle formats), got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no target file {str(path)!r}")
    if path.suffix == ".npy":
        import numpy as np
        return torch.as_tensor(np.load(path, allow_pickle=False))
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    if "samples" in tensors:
        return tensors["samples"]
    if len(tensors) != 1:
        raise ValueError(f"{path} holds tensors {sorted(tensors)}; name the samples 'samples'")
    return next(iter(tensors.values()))


def _schedule(text: str):
    """A schedule name, or comma-separated temperatures such as 1,0.1,0."""
    if text in gft_mod.SCHEDULES:
        return text
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--schedule must be one of {', '.join(gft_mod.SCHEDULES)} or comma-separated "
                         f"temperatures like 1,0.1,0; got {text!r}") from None


def cmd_gft(args) -> int:
    cfg = _config_from(args, GFTConfig)
    cfg["schedule"] = _schedule(cfg["schedule"])
    base = _load_model(args.run, cfg["device"])
    target = _load_samples(args.target)
    progress = not args.no_progress
    if not progress:
        _print_config("gft", GFTConfig(**cfg))
    ft = gradual_finetune(base, target, out=args.out, progress=progress, resume=args.resume, **cfg)
    if not distributed.is_main():   # under torchrun only rank 0 writes and plots
        return 0
    out = Path(args.out)
    ckpt.write_json(out / RUN_INFO, {"command": "gft", "base_run": str(args.run), "target": str(args.target),
                                     "task": _run_info(args.run).get("task")})
    metrics = json.loads((out / "metrics.json").read_text())
    plots = _plots()
    if plots is not None and len(ft.shape) == 1 and ft.shape[0] == 2:
        seed = cfg["seed"] + EVAL_SEED_OFFSET
        sde = cfg["flow"] == "stochastic"
        plots.plot_samples(out / "samples.png",
                           {"pretrained": base.sample(2000, steps=50, sde=sde, seed=seed),
                            "target samples": target[:2000].float(),
                            "GFT": ft.sample(2000, steps=50, sde=sde, seed=seed)},
                           title=f"gradual fine-tuning ({cfg['variant']}, {cfg['coupling']} coupling)")
    print(f"energy distance to the target samples: GFT {metrics['energy_distance']:.4f}, "
          f"pretrained {metrics['energy_distance_pretrained']:.4f}; straightness {metrics['straightness']:.4f}")
    print(f"wrote {args.out}/: model.safetensors, metrics.json, log.jsonl" + (", samples.png" if plots else ""))
    return 0


# --- fdc -------------------------------------------------------------------------------------

FDC_UTILITIES = ("entropy", "mean-variance", "cvar", "novelty", "design", "diversity", "expected")


def _float_or_none(text: str):
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}")


def _make_utility(args, base: FlowModel):
    from . import utilities as u
    name = args.utility
    if name not in FDC_UTILITIES:
        raise ValueError(f"unknown utility {name!r}; valid: {', '.join(FDC_UTILITIES)}")
    if name == "entropy":
        return u.Entropy()
    if name == "design":
        return u.ExperimentDesign(reg=args.reg)
    if name == "diversity":
        return u.KernelDiversity(args.bandwidth)
    if name == "novelty":   # novelty with respect to what the pretrained model generates
        return u.Novelty(base.sample(1000, steps=50, seed=args.seed + EVAL_SEED_OFFSET), args.bandwidth)
    reward = rewards_mod.get_reward(args.reward)
    if name == "mean-variance":
        return u.MeanVariance(reward, kappa=args.kappa)
    if name == "cvar":
        return u.CVaRUtility(reward, level=args.level, tail=args.tail)
    return u.ExpectedRewardUtility(reward)


def _make_divergence(args):
    from . import divergences as d
    if args.divergence == "kl":
        return d.KL()
    if args.divergence == "renyi":
        return d.Renyi(alpha=args.alpha)
    if args.divergence == "ot":
        return d.OT(p=2)
    raise ValueError(f"unknown divergence {args.divergence!r}; valid: kl, renyi, ot")


def cmd_fdc(args) -> int:
    outer = _config_from(args, FDCConfig)
    inner = _config_from(args, FinetuneConfig, skip=("lam",))
    base = _load_model(args.run, inner["device"])
    utility, divergence = _make_utility(args, base), _make_divergence(args)
    if args.no_progress:
        _print_config("fdc", FDCConfig(**outer))
    ft = fdc(base, utility, divergence, out=args.out, resume=args.resume, progress=not args.no_progress,
             **outer, **inner)
    out = Path(args.out)
    ckpt.write_json(out / RUN_INFO, {"command": "fdc", "task": _run_info(args.run).get("task"),
                                     "base_run": str(args.run), "utility": args.utility,
                                     "divergence": args.divergence, "lam": outer["lam"]})
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    print(f"{'outer':>5} {'utility':>10} {'divergence':>11} {'objective':>10} {'KL':>8}")
    for r in log:
        cells = [f"{r.get(k):.4f}" if isinstance(r.get(k), float) else "—" for k in ("utility", "divergence", "objective", "kl")]
        print(f"{r['outer']:>5} {cells[0]:>10} {cells[1]:>11} {cells[2]:>10} {cells[3]:>8}")
    plots = _plots()
    if plots is not None and len(base.shape) == 1 and base.shape[0] == 2:
        seed = inner["seed"] + EVAL_SEED_OFFSET
        plots.plot_samples(out / "before_after.png", {"base": base.sample(2000, steps=50, seed=seed),
                                                       f"FDC ({args.utility})": ft.sample(2000, steps=50, seed=seed)},
                           title=f"FDC: {utility!r} − {outer['lam']:g}·{divergence!r}")
    print(f"wrote {args.out}/: model.safetensors, log.jsonl, metrics.json, outer_01/ …, before_after.png")
    return 0


# --- sample ----------------------------------------------------------------------------------

def cmd_sample(args) -> int:
    out = Path(args.out)
    if out.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"--out must end in .npy or .safetensors (no pickle formats), got {str(out)!r}")
    model = _load_model(args.run, args.device)
    x = model.sample(args.n, steps=args.steps, sde=args.sde, seed=args.seed).cpu().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np
        np.save(out, x.numpy(), allow_pickle=False)
    else:
        from safetensors.torch import save_file
        save_file({"samples": x}, str(out), metadata={"run": str(args.run), "sde": str(args.sde),
                                                      "steps": str(args.steps), "seed": str(args.seed)})
    print(f"wrote {tuple(x.shape)} samples ({'SDE' if args.sde else 'ODE'}, {args.steps} steps) to {out}")
    return 0


# --- evaluate --------------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    model = _load_model(args.run, args.device)
    info = _run_info(args.run)
    task_name = args.task or info.get("task")
    reward_name = args.reward or info.get("reward")
    task = toy2d.get_task(task_name) if task_name else None
    reward = rewards_mod.get_reward(reward_name) if reward_name else None
    ev = EvalConfig(n_eval=args.n, eval_steps=args.steps, n_kl=0)
    stats, x, _ = _evaluate(model, reward, ev, args.seed)
    result = {"run": str(args.run), "task": task_name, "reward": reward_name, "seed": args.seed + EVAL_SEED_OFFSET,
              **stats}
    if task is not None:
        g = torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET)
        y, y2 = task.sample(args.n, generator=g), task.sample(args.n, generator=g)
        result["energy_distance_to_data"] = energy_distance(x, y)
        result["energy_distance_noise_floor"] = energy_distance(y2, y)
        if args.n_loglik > 0:
            yl = y[: args.n_loglik].to(model.device)
            ll = model.log_prob(yl, steps=args.steps)
            result["data_log_likelihood"] = float(ll.mean())
            result["data_log_likelihood_n"] = yl.shape[0]
            if hasattr(task, "log_prob"):
                # E_data[log p_data − log p_model] = KL(data ‖ model) ≥ 0
                true_ll = float(task.log_prob(yl.cpu()).double().mean())
                result["data_log_likelihood_true"] = true_ll
                result["kl_data_model"] = true_ll - result["data_log_likelihood"]
    out = Path(args.out) if args.out else Path(args.run) / "evaluation.json"
    ckpt.write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


# --- sample-energy ---------------------------------------------------------------------------

def cmd_sample_energy(args) -> int:
    from .tasks.energies import SAMPLER_DEFAULTS, get_energy
    energy = get_energy(args.energy)
    given = {f.name: getattr(args, f.name) for f in fields(EnergyConfig) if getattr(args, f.name) is not None}
    cfg = asdict(EnergyConfig(**{**SAMPLER_DEFAULTS[args.energy], **given}))
    for name in ("n_samples", "n_eval"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    progress = not args.no_progress
    if not progress:
        _print_config("sample-energy", EnergyConfig(**cfg))
    t0 = time.perf_counter()
    sampler = sample_energy(energy, energy.dim, out=args.out, resume=args.resume, progress=progress, **cfg)
    train_s = time.perf_counter() - t0
    if not distributed.is_main():   # under torchrun only rank 0 evaluates, writes and plots
        return 0
    out, seed = Path(args.out), cfg["seed"] + EVAL_SEED_OFFSET
    x = sampler.sample(args.n_samples, seed=seed).cpu()
    import numpy as np
    np.save(out / "samples.npy", x.numpy(), allow_pickle=False)
    pw = sampler.log_Z(args.n_eval, seed=seed + 1)
    with torch.no_grad():
        e = energy(x.double())
    metrics = {"energy": args.energy, "dim": energy.dim, "n_samples": args.n_samples,
               "energy_mean": float(e.mean()), "energy_median": float(e.median()),
               "crooks": pw.summary(), "log_Z": pw.log_Z, "ess_fraction": pw.ess_fraction,
               "log_Z_exact": energy.log_Z, "train_s_this_call": train_s}
    if energy.log_Z is not None:
        metrics["log_Z_error"] = pw.log_Z - energy.log_Z
    y = None
    if hasattr(energy, "sample"):   # exact samples exist (gmm40, manywell)
        g = torch.Generator().manual_seed(seed)
        y, y2 = energy.sample(args.n_samples, g), energy.sample(args.n_samples, g)
        metrics["energy_distance_to_exact"] = energy_distance(x[:2000], y[:2000])
        metrics["energy_distance_noise_floor"] = energy_distance(y2[:2000], y[:2000])
    ckpt.write_json(out / "metrics.json", metrics)
    ckpt.write_json(out / RUN_INFO, {"command": "sample-energy", "energy": args.energy})
    written = ["model.safetensors", "samples.npy", "metrics.json", "log.jsonl"]
    plots = _plots() if energy.dim == 2 else None
    if plots is not None:
        panels = {"sampler": x} if y is None else {"exact": y, "sampler": x}
        plots.plot_samples(out / "samples.png", panels, title=f"{args.energy}: Adjoint Sampling",
                           density=lambda z: -energy(z), density_label="−E")
        written.append("samples.png")
    print(f"log Z (Crooks, {args.n_eval} paths) {pw.log_Z:.4f}" +
          (f" (exact {energy.log_Z:.4f})" if energy.log_Z is not None else "") +
          f"; ESS {pw.ess:.0f} ({100 * pw.ess_fraction:.1f} %); median energy {metrics['energy_median']:.3f}")
    print(f"wrote {args.out}/: " + ", ".join(written))
    return 0


# --- demo ------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if getattr(args, f.name) is not None}
    cfg = DemoConfig(**{**(FAST if args.fast else {}), **given})
    out = Path(args.out)
    progress = not args.no_progress
    t_start = time.perf_counter()
    print(f"tiltflow demo: {cfg}")
    ckpt.prepare_run(out, asdict(cfg), args.resume, resumable_keys=("pretrain_steps", "iters"))

    pre_cfg = asdict(PretrainConfig(steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size,
                                    hidden=cfg.hidden, seed=cfg.seed, device=cfg.device))
    ev = EvalConfig(n_eval=cfg.n_eval, eval_steps=cfg.eval_steps, n_kl=cfg.n_kl)
    timings = {}
    t = time.perf_counter()
    print("\n== 1/4 pretrain the base model ==")
    _run_pretrain(cfg.task, out / "pre", pre_cfg, args.resume, progress)
    timings["pretrain_s"] = time.perf_counter() - t

    ft_cfg = asdict(FinetuneConfig(lam=cfg.lam, iters=cfg.iters, batch_size=cfg.batch_size, steps=cfg.steps,
                                   lr=cfg.lr, seed=cfg.seed, device=cfg.device))
    runs = {"expected": ("expected", "right"), "cvar-left": ("cvar", "left"), "cvar-right": ("cvar", "right")}
    results = {}
    for i, (name, (objective, tail)) in enumerate(runs.items(), start=2):
        print(f"\n== {i}/4 fine-tune: {name} ==")
        t = time.perf_counter()
        results[name] = _run_finetune(out / "pre", out / name, cfg.reward, objective, cfg.level, tail, 0.0,
                                      ft_cfg, ev, args.resume, progress)
        timings[f"finetune_{name}_s"] = time.perf_counter() - t

    keys = ("reward_mean", "reward_std", "reward_cvar_left_10", "reward_cvar_right_10", "kl", "diversity")
    pick = lambda s: {k: s.get(k) for k in keys}  # noqa: E731
    models = {"base": {**pick(results["expected"]["base"]), "kl": 0.0}}
    for name, res in results.items():
        models[name] = pick(res["finetuned"])
        stage1 = json.loads((out / name / "metrics.json").read_text()).get("stage1")
        if stage1:
            models[name]["eta"] = stage1.get("eta")
    exact = results["expected"].get("exact_tilt")
    summary = {"config": asdict(cfg), "eval": asdict(ev), "models": models}
    if exact is not None:
        summary["exact_tilt"] = {
            "description": f"closed-form tilt of the {cfg.task} task by {cfg.reward} at λ = {cfg.lam:g} "
                           "(toy2d.GaussianMixture.tilt_linear), compared with the expected-reward model",
            **exact,
        }

    rows = dict(models)
    if exact is not None:
        rows["exact tilt"] = exact
    plots = _plots()
    if plots is not None:
        xb, rb = results["expected"]["_samples"]["base"]
        panels = {"base": xb, **{n: r["_samples"]["finetuned"][0] for n, r in results.items()}}
        hists = {"base": rb, **{n: r["_samples"]["finetuned"][1] for n, r in results.items()}}
        if "exact tilt" in results["expected"]["_samples"]:
            panels["exact tilt (expected)"] = results["expected"]["_samples"]["exact tilt"][0]
        reward = rewards_mod.get_reward(cfg.reward)
        plots.plot_samples(out / "samples.png", panels, density=reward,
                           title=f"{cfg.task}: base and fine-tuned by {cfg.reward} reward, λ = {cfg.lam:g}")
        plots.plot_reward_hist(out / "reward_hist.png", hists, level=cfg.level)
    timings["total_s"] = time.perf_counter() - t_start
    summary["timings"] = timings
    summary["torch_threads"] = torch.get_num_threads()
    ckpt.write_json(out / "summary.json", summary)

    print(f"\n== summary ({cfg.n_eval} ODE samples per model; KL by log-likelihoods on {cfg.n_kl}) ==")
    _print_eval_table(rows)
    if exact is not None:
        print(f"energy distance to exact tilted samples: expected {exact['energy_distance_finetuned']:.4f}, "
              f"base {exact['energy_distance_base']:.4f} (noise floor {exact['energy_distance_noise_floor']:.4f})")
    print(f"wall time {timings['total_s']:.0f} s; wrote {out}/summary.json, samples.png, reward_hist.png and "
          "run folders pre/, expected/, cvar-left/, cvar-right/")
    return 0


# --- digits ----------------------------------------------------------------------------------

DIGITS_OBJECTIVES = ("expected", "right-cvar", "left-cvar", "fdc-entropy")


@dataclass
class DigitsConfig:
    """The offline image task: a class-conditional U-Net flow on scikit-learn's 8×8 digits,
    fine-tuned toward r(x, d) = log p_clf(d | x) of an in-repo classifier (saved as config.json)."""
    objective: str = "left-cvar"          # expected, right-cvar, left-cvar or fdc-entropy (FDC of E r + α·H)
    digit: int | None = None              # one digit 0..9; none: all ten, one prompt per micro-batch (fdc-entropy needs one)
    lam: float = 0.05                     # KL weight λ (reward units: nats of log-probability)
    level: float = 0.1                    # CVaR tail mass β
    alpha: float = 0.02                   # entropy weight α of fdc-entropy
    iters_outer: int = 1                  # FDC outer iterations (one reaches the optimum for E r + α·H with KL)
    pretrain_steps: int = 1500
    pretrain_batch_size: int = 128
    channels: tuple = (16, 32)            # U-Net widths at 8×8 and 4×4
    iters: int = 100                      # Adjoint Matching iterations (per FDC outer iteration)
    batch_size: int = 32                  # trajectories per iteration (one digit each)
    steps: int = 20                       # memoryless-SDE steps per trajectory
    lr: float = 1e-4                      # fine-tuning learning rate
    n_offline: int = 1000                 # base samples for the CVaR threshold (stage 1)
    per_digit: int = 100                  # evaluation samples per digit
    eval_steps: int = 50                  # Heun steps of the evaluation samples
    n_kl: int = 64                        # paths per digit of the path-KL estimate; 0 skips
    seed: int = 0
    device: str = "auto"                  # auto: the GPU when there is one, else the CPU


def _digits_table(models: dict) -> None:
    cols = [("reward_mean", "mean r"), ("cvar_left_10", "left 10%"), ("cvar_right_10", "right 10%"),
            ("accuracy", "accuracy"), ("diversity", "diversity"), ("kl_path", "KL (path)")]
    print("model".ljust(11) + "".join(h.rjust(11) for _, h in cols))
    for name, st in models.items():
        print(name.ljust(11) + "".join(f"{st[k]:11.4f}" if st.get(k) is not None else "—".rjust(11) for k, _ in cols))


def cmd_digits(args) -> int:
    from .tasks import digits     # scikit-learn is optional: imported only here

    cfg = DigitsConfig(**{f.name: getattr(args, f.name) for f in fields(DigitsConfig)})
    if cfg.objective not in DIGITS_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(DIGITS_OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.digit is not None and not 0 <= cfg.digit <= 9:
        raise ValueError(f"digit must be in 0..9 (or none for all ten), got {cfg.digit}")
    if cfg.objective == "fdc-entropy" and cfg.digit is None:
        raise ValueError("objective fdc-entropy needs one digit (fdc takes no condition): pass --digit D")
    if cfg.per_digit < 2:
        raise ValueError(f"per_digit must be at least 2 (diversity compares pairs), got {cfg.per_digit}")
    out = Path(args.out)
    progress = not args.no_progress
    print(f"tiltflow digits: {cfg}")
    ckpt.prepare_run(out, asdict(cfg), args.resume, resumable_keys=("pretrain_steps", "iters", "iters_outer"))
    clf = digits.classifier()                 # seed 0 for every run: rewards comparable across runs
    timings, t = {}, time.perf_counter()
    if args.base_run is not None:
        base = _load_model(args.base_run, cfg.device)
        if base.shape != digits.SHAPE or base.config()["net"].get("class") != "SmallUNetVelocity":
            raise ValueError(f"--base-run {args.base_run} does not hold a digits model (SmallUNetVelocity on "
                             f"(1, 8, 8)); its model has shape {base.shape}")
    else:
        base = digits.pretrain_base(cfg.pretrain_steps, channels=cfg.channels, batch_size=cfg.pretrain_batch_size,
                                    seed=cfg.seed, device=cfg.device, out=out / "pre", resume=args.resume,
                                    progress=progress)
    timings["pretrain_s"] = time.perf_counter() - t
    t = time.perf_counter()
    common = dict(iters=cfg.iters, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed,
                  device=cfg.device, out=out / "ft", resume=args.resume, progress=progress)
    chosen = list(range(10)) if cfg.digit is None else [cfg.digit]
    if cfg.objective == "fdc-entropy":
        utility = digits.RewardEntropy(digits.DigitReward(clf, cfg.digit), alpha=cfg.alpha)
        ft = fdc(digits.bind_digit(base, cfg.digit), utility, lam=cfg.lam, iters_outer=cfg.iters_outer,
                 n_eval=cfg.per_digit, eval_steps=cfg.eval_steps, n_kl=0, init="copy", **common)
    else:
        r = digits.DigitReward(clf)
        obj = ExpectedReward(r) if cfg.objective == "expected" else \
            CVaR(r, level=cfg.level, tail=cfg.objective.split("-")[0])
        where = {"prompts": digits.prompts()} if cfg.digit is None else {"cond": digits.one_hot([cfg.digit])}
        ft = finetune(base, obj, lam=cfg.lam, n_offline=cfg.n_offline, **where, **common)
    timings["finetune_s"] = time.perf_counter() - t
    seed = cfg.seed + EVAL_SEED_OFFSET
    ev = dict(per_digit=cfg.per_digit, digits=chosen, steps=cfg.eval_steps, seed=seed, n_kl=cfg.n_kl)
    models = {"base": digits.evaluate(base, clf, **{**ev, "n_kl": 0}),
              "finetuned": digits.evaluate(ft, clf, base=base, **ev)}
    models["base"]["kl_path"] = 0.0
    ckpt.write_json(out / "metrics.json", {"config": asdict(cfg), "models": models, "timings": timings})
    ckpt.write_json(out / RUN_INFO, {"command": "digits", "objective": cfg.objective})
    written = ["metrics.json", "pre/" if args.base_run is None else None, "ft/"]
    try:
        xb, _ = digits.sample(base, 8, chosen, cfg.eval_steps, seed)
        xf, _ = digits.sample(ft, 8, chosen, cfg.eval_steps, seed)
        digits.plot_grids(out / "before_after.png", {"base": xb, cfg.objective: xf}, ncols=8,
                          title=f"digits {'0-9' if cfg.digit is None else cfg.digit}: {cfg.objective}, λ = {cfg.lam:g}")
        written.append("before_after.png")
    except ImportError as e:
        print(f"note: skipping before_after.png: {e}", file=sys.stderr)
    print(f"\ndigits {'0-9' if cfg.digit is None else cfg.digit}, {cfg.per_digit} ODE samples per digit; "
          "r = log p_clf(requested digit | x):")
    _digits_table(models)
    print(f"wrote {args.out}/: {', '.join(w for w in written if w)}")
    return 0


# --- molecules -------------------------------------------------------------------------------

def cmd_molecules(args) -> int:
    from .tasks import molecules      # RDKit is optional: imported only here

    cfg = MoleculesConfig(**{f.name: getattr(args, f.name) for f in fields(MoleculesConfig)})
    if cfg.objective not in ("expected", "cvar"):
        raise ValueError(f"objective must be 'expected' or 'cvar', got {cfg.objective!r}")
    if cfg.n_samples < 2:
        raise ValueError(f"n_samples must be at least 2 (diversity compares pairs), got {cfg.n_samples}")
    out = Path(args.out)
    progress = not args.no_progress
    task = molecules.conformers(cfg.smiles, n=cfg.n_conformers, seed=cfg.seed)   # bad SMILES: ValueError
    reward = task.reward(cfg.reward)
    obj = _make_objective(cfg.objective, reward, cfg.level, cfg.tail, 0.0)
    print(f"tiltflow molecules: {cfg}")
    print(f"tiltflow molecules: {task}")
    ckpt.prepare_run(out, asdict(cfg), args.resume, resumable_keys=("pretrain_steps", "iters"))
    t = time.perf_counter()
    base = pretrain(task.data, cfg.pretrain_steps, model="egnn", cond=task.graph, hidden=cfg.hidden,
                    batch_size=cfg.pretrain_batch_size, lr=cfg.pretrain_lr, seed=cfg.seed, device=cfg.device,
                    out=out / "pre", resume=args.resume, progress=progress)
    timings = {"pretrain_s": time.perf_counter() - t}
    t = time.perf_counter()
    # init="copy": a residual MLP on top of the EGNN would break E(3) equivariance
    ft = finetune(base, obj, lam=cfg.lam, iters=cfg.iters, batch_size=cfg.batch_size, steps=cfg.steps,
                  lr=cfg.lr, init="copy", n_offline=cfg.n_offline, seed=cfg.seed, device=cfg.device,
                  out=out / "ft", resume=args.resume, progress=progress)
    timings["finetune_s"] = time.perf_counter() - t
    label = "finetuned"
    models, seed = {"data": task.evaluate(task.data[: cfg.n_samples])}, cfg.seed + EVAL_SEED_OFFSET
    written = []
    for name, model in (("base", base), (label, ft)):
        x = model.sample(cfg.n_samples, steps=cfg.sample_steps, seed=seed).cpu()
        models[name] = task.evaluate(x)
        written.append(task.write_sdf(x, out / f"{name}.sdf").name)
    ckpt.write_json(out / "summary.json", {"config": asdict(cfg), "molecule": task.name, "atoms": task.n_atoms,
                                           "models": models, "timings": timings})
    print(f"\n{task.name}, {cfg.n_samples} ODE samples per model (energies in kcal/mol):")
    cols = [("energy_q50", "median E"), ("reward_cvar_left_0.1", "worst-10% E"), ("rate_valid", "valid"),
            ("diversity_rmsd", "RMSD (Å)")]
    print("model".ljust(11) + "".join(h.rjust(13) for _, h in cols))
    for name, st in models.items():
        vals = [st["energy_q50"], -st["reward_cvar_left_0.1"], st["rate_valid"], st["diversity_rmsd"]]
        print(name.ljust(11) + "".join(f"{v:13.3f}" for v in vals))
    print(f"wrote {args.out}/: {', '.join(written)}, summary.json, pre/, ft/")
    return 0


# --- parser and entry point ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiltflow",
        description="Fine-tune flow models by exponential tilts p* ∝ p_base·exp(r/λ) "
                    "(Adjoint Matching; expected reward or CVaR).")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the small 2-D models run fastest on one thread, "
                        "and much faster than with several when cores are shared)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tasks, rewards = ", ".join(toy2d.TASKS), ", ".join(rewards_mod.REWARDS)

    s = sub.add_parser("pretrain", help="fit a flow model to a 2-D task by flow matching",
                       description="Fit a flow model to a 2-D task; writes a run folder and samples.png.")
    s.add_argument("--task", default="mixture", help=f"one of: {tasks} (default: mixture)")
    _add_config_flags(s, PretrainConfig)
    _run_folder_flags(s, "runs/pre")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("finetune", help="fine-tune a run's model toward a reward (expected or CVaR)",
                       description="Fine-tune the model of --run by Adjoint Matching; writes a run folder with "
                                   "before_after.png, training.png, reward_hist.png and an evaluation in metrics.json; "
                                   "or fine-tune a diffusers pipeline as the TOML or YAML run config --config says.")
    _finetune_flags(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("gft", help="gradual fine-tuning of a run's model toward target samples",
                       description="Adapt the model of --run to the samples in --target by Gradual Fine-Tuning "
                                   "(a cooling schedule of objectives from the pretrained to the target velocity); "
                                   "writes a run folder with metrics.json and samples.png.")
    _base_run_flag(s)
    s.add_argument("--target", required=True, help="target samples (n, d): .npy or .safetensors")
    _add_config_flags(s, GFTConfig, skip=("schedule",))
    s.add_argument("--schedule", default="geometric",
                   help="geometric, linear, cosine, or comma-separated temperatures such as 1,0.1,0 "
                        "(0 alone: standard fine-tuning) (default: geometric)")
    _run_folder_flags(s, "runs/gft")
    s.set_defaults(func=cmd_gft)

    s = sub.add_parser("fdc", help="Flow Density Control: a utility of the whole distribution",
                       description="Maximise F(p) − λ·D(p‖p_base) for the model of --run by a sequence of "
                                   "Adjoint Matching runs (one per outer iteration); writes a run folder with "
                                   "log.jsonl (utility, divergence, KL per outer iteration) and before_after.png.")
    _base_run_flag(s)
    s.add_argument("--utility", default="entropy",
                   help=f"one of: {', '.join(FDC_UTILITIES)} (default: entropy)")
    s.add_argument("--divergence", default="kl", help="kl, renyi or ot (W2² with POT potentials) (default: kl)")
    s.add_argument("--alpha", type=float, default=0.5, help="Rényi order α ≠ 1 (default: 0.5)")
    s.add_argument("--reward", default="linear", help=f"reward of mean-variance, cvar, expected: {rewards} (default: linear)")
    s.add_argument("--kappa", type=float, default=1.0, help="mean-variance weight κ in E r − κ Var r (default: 1)")
    s.add_argument("--level", type=float, default=0.1, help="CVaR tail mass β in (0, 1] (default: 0.1)")
    s.add_argument("--tail", default="left", choices=("right", "left"), help="CVaR tail (default: left, risk-averse)")
    s.add_argument("--bandwidth", type=float, default=0.5, help="kernel width of novelty and diversity (default: 0.5)")
    s.add_argument("--reg", type=float, default=1e-3, help="ε in log det(E φφᵀ + εI) of design (default: 0.001)")
    _add_config_flags(s, FDCConfig, skip=("step",))
    s.add_argument("--step", type=_float_or_none, default=None,
                   help="mirror step γ; none: 1/(λ + curvature of the utility) (default: none)")
    _add_config_flags(s, FinetuneConfig, skip=("lam",))
    _run_folder_flags(s, "runs/fdc", "continue from the last finished outer iteration")
    s.set_defaults(func=cmd_fdc)

    s = sub.add_parser("sample", help="draw samples from a run's model",
                       description="Draw samples from the model of --run and save them as .npy or .safetensors.")
    s.add_argument("--run", required=True, help="run folder holding model.safetensors")
    s.add_argument("--n", type=int, default=1000, help="number of samples (default: 1000)")
    s.add_argument("--steps", type=int, default=100, help="integration steps (default: 100)")
    s.add_argument("--sde", action="store_true", help="memoryless SDE instead of the ODE")
    s.add_argument("--out", default="samples.npy", help="output file, .npy or .safetensors (default: samples.npy)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ... (default: auto)")
    _progress_flags(s)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("evaluate", help="energy distance, rewards and likelihood of a run's model",
                       description="Evaluate the model of --run on fresh ODE samples; prints and writes JSON.")
    s.add_argument("--run", required=True, help="run folder holding model.safetensors")
    s.add_argument("--task", default=None, help=f"task to compare with: {tasks} (default: the run's task)")
    s.add_argument("--reward", default=None, help=f"reward to summarise: {rewards} (default: the run's reward)")
    s.add_argument("--n", type=int, default=2000, help="samples of model and data (default: 2000)")
    s.add_argument("--steps", type=int, default=50, help="ODE steps for samples and likelihoods (default: 50)")
    s.add_argument("--n-loglik", type=int, default=500,
                   help="data points whose log-likelihood is computed; 0 skips (default: 500)")
    s.add_argument("--out", default=None, help="JSON file (default: RUN/evaluation.json)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:1, ... (default: auto)")
    _progress_flags(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("sample-energy", help="train a sampler for exp(−E) of gmm40, manywell, dw4, lj13 or lj55",
                       description="Train a sampler for exp(−E) by Adjoint Sampling with a replay buffer; writes a "
                                   "run folder with model.safetensors, samples.npy, metrics.json (log Z by the Crooks "
                                   "estimator, ESS, energies) and samples.png for 2-D energies. Unset flags take the "
                                   "energy's defaults (tasks/energies.py SAMPLER_DEFAULTS), then EnergyConfig's.")
    s.add_argument("--energy", required=True, help="one of: gmm40, manywell, dw4, lj13, lj55")
    _add_config_flags(s, EnergyConfig, no_defaults=True)
    s.add_argument("--n-samples", type=int, default=2000, help="samples written to samples.npy (default: 2000)")
    s.add_argument("--n-eval", type=int, default=2000, help="paths of the log Z / ESS estimate (default: 2000)")
    _run_folder_flags(s, "runs/energy")
    s.set_defaults(func=cmd_sample_energy)

    s = sub.add_parser("demo", help="the main job: pretrain, fine-tune three ways, compare",
                       description="Pretrain on the mixture task, fine-tune by expected reward and by left and "
                                   "right CVaR, write plots and summary.json, print a table.")
    s.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    s.add_argument("--fast", action="store_true",
                   help="small settings, about 30 seconds (" + ", ".join(f"{k}={v}" for k, v in FAST.items()) + ")")
    _add_config_flags(s, DemoConfig, no_defaults=True)
    s.add_argument("--resume", action="store_true", help="continue each stage from its newest checkpoint")
    _progress_flags(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("molecules", help="conformers of one molecule: pretrain an EGNN, fine-tune on MMFF94, write SDF",
                       description="Generate conformers of --smiles (ETKDG + MMFF94, cached), pretrain an "
                                   "E(3)-equivariant EGNN flow on them, fine-tune it toward −MMFF94 energy "
                                   "(default: left CVaR, the worst conformers), and write base.sdf, finetuned.sdf "
                                   "(energies, validity flags) and summary.json. Needs RDKit: "
                                   "pip install 'tiltflow[mol]'.")
    _add_config_flags(s, MoleculesConfig)
    s.add_argument("--out", default="runs/mol", help="output folder (default: runs/mol)")
    s.add_argument("--resume", action="store_true", help="continue each stage from its newest checkpoint")
    _progress_flags(s)
    s.set_defaults(func=cmd_molecules)

    s = sub.add_parser("digits", help="8×8 digits: pretrain a class-conditional U-Net flow, fine-tune toward a classifier",
                       description="Pretrain a class-conditional U-Net flow on scikit-learn's 8×8 digits (or reuse "
                                   "--base-run), fine-tune it toward r(x, d) = log p_clf(d | x) of an in-repo "
                                   "classifier by expected reward, right or left CVaR (TFFT) or FDC with entropy, and "
                                   "write metrics.json and before_after.png (image grids). Needs scikit-learn: "
                                   "pip install 'tiltflow[digits]'.")
    _add_config_flags(s, DigitsConfig)
    s.add_argument("--base-run", dest="base_run", default=None,
                   help="run folder whose model.safetensors is a pretrained digits model (skips pretraining)")
    _run_folder_flags(s, "runs/digits")
    s.set_defaults(func=cmd_digits)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv        # finetune --config tells the flags given from the defaults
    if args.threads < 1:
        print(f"tiltflow: error: --threads must be a positive integer, got {args.threads}", file=sys.stderr)
        return EXIT_USER_ERROR
    torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tiltflow {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ImportError as e:
        print(f"tiltflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ntiltflow {args.command}: interrupted; continue with the same command and --resume",
              file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()   # closes the process group opened under torchrun, if any


if __name__ == "__main__":
    sys.exit(main())
