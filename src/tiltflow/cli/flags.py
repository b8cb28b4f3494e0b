"""Flags from config dataclasses: one --field-name per field, typed by its default, and back.

A field declared `field(default=None, metadata={"deprecated": "new_name"})` (an old spelling kept
for a while) becomes a hidden flag that still works: the config's __post_init__ resolves it and
the command line warns (DeprecationWarning) naming the new flag.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import warnings
from dataclasses import MISSING, asdict, fields

from ..validation import positive_int, renamed

REPORT_TO = ("none", "tensorboard", "wandb")


# --- argument types --------------------------------------------------------------------------

def int_tuple(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,256,256, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,256,256, got {text!r}")
    return values


def optional_float(text: str):
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}")


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def optional_names(text: str):
    """Comma-separated names (e.g. LoRA target modules), or none."""
    if text.lower() == "none":
        return None
    return tuple(v.strip() for v in text.split(",") if v.strip()) or None


def optional_int(text: str):
    if text.lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}")


# --- config dataclass <-> flags --------------------------------------------------------------

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def deprecated(f) -> str | None:
    """The new name of a deprecated field, else None."""
    return f.metadata.get("deprecated")


def field_help(cls) -> dict:
    """The trailing `# comment` of each dataclass field, used as its --help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M)}


def _default(f, overrides: dict):
    default = overrides.get(f.name, f.default)
    if default is MISSING and f.default_factory is not MISSING:
        default = f.default_factory()
    return default


def _kind(default, annotation):
    if isinstance(default, bool):
        return boolean
    if isinstance(default, tuple):
        return int_tuple
    if isinstance(default, dict):
        return json_dict
    if isinstance(default, float):
        return float
    if isinstance(default, int):
        return int
    if default is None:
        return (optional_float if "float" in str(annotation) else
                optional_names if "tuple" in str(annotation) else optional_int)
    return str


def add_config_flags(p: argparse.ArgumentParser, cls, skip=(), no_defaults: bool = False,
                     overrides: dict | None = None) -> None:
    """One flag --field-name per dataclass field, typed by its default; deprecated fields get
    hidden flags typed like their new field. `report_to` is left to report_to_flag (one per command)."""
    helps = field_help(cls)
    overrides = overrides or {}
    by_name = {f.name: f for f in fields(cls)}
    for f in fields(cls):
        if f.name in skip or f.name == "report_to":
            continue
        new = deprecated(f)
        if new is not None:
            target = by_name.get(new, f)
            kind = _kind(_default(target, {}), target.type)
            p.add_argument(flag(f.name), dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                           help=argparse.SUPPRESS)
            continue
        default = _default(f, overrides)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        p.add_argument(flag(f.name), dest=f.name, type=_kind(default, f.type),
                       default=None if no_defaults else default, metavar=f.name.upper(),
                       help=f"{helps.get(f.name, '')} (default: {shown})".strip())


def config_from(args, cls, skip=()) -> dict:
    """The flag values of the fields of `cls`; deprecated fields only when given."""
    out = {}
    for f in fields(cls):
        if f.name in skip or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if deprecated(f) is None or value is not None:
            out[f.name] = value
    return out


def merge(cls, *layers: dict) -> dict:
    """Layers of field values (presets, then flags), later ones winning. A renamed field counts as
    one setting under either spelling: a later layer's value under one spelling removes the earlier
    layers' values under both (a preset `iters` must not clash with a given `--steps`)."""
    pairs = [(f.name, deprecated(f)) for f in fields(cls) if deprecated(f)]
    out: dict = {}
    for layer in layers:
        for old, new in pairs:
            if layer.get(old) is not None or new in layer:
                out.pop(old, None)
                out.pop(new, None)
        out.update(layer)
    return out


def build(cls, values: dict, given: dict | None = None):
    """cls(**values), warning once in flag terms for each deprecated spelling among the flags
    `given` (default: values); the config's own warning, in field terms, is not repeated."""
    for f in fields(cls):
        if deprecated(f) and (values if given is None else given).get(f.name) is not None:
            warnings.warn(f"{flag(f.name)} is deprecated, use {flag(deprecated(f))}", DeprecationWarning,
                          stacklevel=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is deprecated, use", category=DeprecationWarning)
        return cls(**values)


def config_dict(cfg, skip=()) -> dict:
    """The fields of a config instance without its deprecated aliases (resolved in __post_init__):
    what a library call takes as keyword arguments and what a run folder saves."""
    deprecated_names = {f.name for f in fields(cfg) if deprecated(f)}
    return {k: v for k, v in asdict(cfg).items() if k not in deprecated_names and k not in skip}


# --- flags every command shares ----------------------------------------------------------------

def progress_flags(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the configuration is still printed)")


def report_to_flag(p, default: str | None = "none") -> None:
    p.add_argument("--report-to", dest="report_to", default=default, choices=REPORT_TO,
                   help="experiment tracking of the training records (log.jsonl): none, tensorboard (event "
                        "files in the run folder) or wandb (default: none)")


def base_run_flag(p, required: bool = True) -> None:
    """--run (alias --base-run: torchrun's parser takes --run for its own --run-path)."""
    p.add_argument("--run", "--base-run", dest="run", required=required,
                   help="run folder holding model.safetensors (e.g. runs/pre); spell it --base-run under "
                        "torchrun, whose parser takes --run for its own --run-path")


def run_folder_flags(p, out: str, resume_help: str = "continue from the newest checkpoint in --out") -> None:
    """--out (a run folder), --resume, --no-progress and --report-to: the flags every training command has."""
    p.add_argument("--out", default=out, help=f"run folder (default: {out})")
    p.add_argument("--resume", action="store_true", help=resume_help)
    progress_flags(p)
    report_to_flag(p)


def with_report_to(fn, value: str, kwargs: dict) -> dict:
    """kwargs plus report_to=value when the library call `fn` takes it (a keyword of `fn`, or a
    field of its config already in kwargs); ValueError for tracking this version of `fn` lacks."""
    if "report_to" in kwargs or "report_to" in inspect.signature(fn).parameters:
        return {**kwargs, "report_to": value}
    if value != "none":
        raise ValueError(f"--report-to {value}: {fn.__module__}.{fn.__name__} has no experiment tracking "
                         "in this version of tiltflow; use --report-to none")
    return dict(kwargs)


def resolve_deprecated(cfg) -> None:
    """In a config's __post_init__: each deprecated field given moves to its new name (with a
    DeprecationWarning naming it, validation.renamed) and is reset to None."""
    own = type(cfg).__dataclass_fields__
    for f in fields(cfg):
        new = deprecated(f)
        if new is not None:
            value = renamed(f.name, new, getattr(cfg, f.name), getattr(cfg, new), own[new].default,
                            type(cfg).__name__)
            setattr(cfg, new, value)
            setattr(cfg, f.name, None)


def positive_ints(values, name: str) -> tuple:
    """A non-empty tuple of positive ints (network widths)."""
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{name} must be a non-empty tuple of positive integers like (128, 128), got {values!r}")
    for v in values:
        positive_int(v, name)
    return values
