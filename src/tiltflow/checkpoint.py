"""Run folders and resumable training state: safetensors for tensors, JSON for the rest.

A run folder holds `config.json`, `log.jsonl`, `metrics.json`, the final `model.safetensors`
and `checkpoints/step_XXXXXXXX.{safetensors,json}`. Each checkpoint is written to a temporary
file and renamed (atomic on POSIX), its JSON records the SHA-256 of the tensor file, and
`load_latest` skips a checkpoint whose checksum or JSON does not verify. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .tracking import get_logger


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")


def config_hash(config: dict, exclude=()) -> str:
    """SHA-256 of the JSON of `config` without the keys in `exclude` (those may change on resume)."""
    kept = {k: v for k, v in config.items() if k not in exclude}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(module: torch.nn.Module, per_tensor: int = 4096) -> str:
    """A short SHA-256 of a module's weight names, shapes, dtypes and first `per_tensor` values:
    cheap even for large models, and different for another model of the same architecture."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        head = t.detach().reshape(-1)[:per_tensor].cpu()
        h.update((torch.view_as_real(head) if head.is_complex() else head).double().numpy().tobytes())
    return h.hexdigest()[:16]


def read_metadata(path, fmt: str, what: str, noun: str = "") -> dict:
    """The string metadata of a safetensors file written with metadata["format"] == fmt; ValueError
    (naming `what`; `noun` names the missing file, default `what`) for a missing, unreadable or
    foreign file. Reads no tensors, unpickles nothing."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {noun or what} file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 — safetensors raises several types on bad files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a tiltflow {what} (format {meta.get('format')!r})")
    return meta


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def prepare_run(out: str | os.PathLike, config: dict, resume: bool, resumable_keys=("iters", "steps")) -> Path:
    """Create the run folder and write config.json; with resume, check the config is the same.

    Keys in `resumable_keys` may change on resume (to train longer); any other difference is an
    error, because the checkpoint would belong to another run.
    """
    out = Path(out)
    old = out / "config.json"
    if resume and old.exists():
        prev = json.loads(old.read_text())
        diff = sorted(k for k in set(prev) | set(config)
                      if k not in resumable_keys and prev.get(k) != json.loads(json.dumps(config.get(k), default=str)))
        if diff:
            raise ValueError(f"cannot resume {out}: its config differs in {diff} "
                             f"(was {[prev.get(k) for k in diff]}, now {[config.get(k) for k in diff]}); "
                             "use another --out or the same settings")
    out.mkdir(parents=True, exist_ok=True)
    write_json(old, config)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _global_rng_state() -> tuple[dict, dict]:
    """Tensors and JSON of the global torch, CUDA, numpy and Python RNG states."""
    tensors = {"rng.torch_global": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}
    return tensors, meta


def _set_global_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch_global"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in meta and "rng.numpy_keys" in tensors:
        kind, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in meta:
        version, internal, gauss_next = meta["python"]
        random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(out: Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None,
                    generators: dict[str, torch.Generator | torch.Tensor],
                    extra: dict | None = None, keep: int = 2, config_hash: str | None = None) -> Path:
    """Write checkpoints/step_{step}: module weights, optimizer, generators and global RNG states.

    generators: name -> a torch.Generator or its state (a ByteTensor, e.g. gathered from
    another process). config_hash: see `config_hash`; `load_latest` refuses a mismatch.
    """
    ckdir = Path(out) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    meta = {"step": step, "extra": extra or {}, "config_hash": config_hash}
    if optimizer is not None:
        opt_t, opt_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_t)
        meta["optimizer"] = opt_meta
    for name, g in generators.items():
        tensors[f"rng.{name}"] = g if torch.is_tensor(g) else g.get_state()
    rng_tensors, meta["rng"] = _global_rng_state()
    tensors.update(rng_tensors)
    stem = ckdir / f"step_{step:08d}"
    tmp = stem.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, stem.with_suffix(".safetensors"))
    meta["sha256"] = _sha256(stem.with_suffix(".safetensors"))
    write_json(stem.with_suffix(".json"), meta)  # written last: its presence marks a complete checkpoint
    for old in sorted(ckdir.glob("step_*.json"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return stem


def load_latest(out: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer | None,
                generators: dict[str, torch.Generator], warn=None, config_hash: str | None = None) -> dict | None:
    """Restore the newest checkpoint that verifies; returns its metadata, or None if none exists.

    A checkpoint whose tensor file is missing, truncated or altered (SHA-256 mismatch) is
    reported through `warn` (a callable taking the message; None: the "tiltflow.checkpoint"
    logger's warning) and the previous one is tried. A checkpoint of another run
    (config_hash differs) or another model (different weight names or shapes) is a ValueError.
    """
    if warn is None:
        warn = get_logger("checkpoint").warning
    ckdir = Path(out) / "checkpoints"
    for meta_path in sorted(ckdir.glob("step_*.json"), reverse=True):
        tpath = meta_path.with_suffix(".safetensors")
        try:
            meta = json.loads(meta_path.read_text())
            if not tpath.exists() or _sha256(tpath) != meta["sha256"]:
                raise ValueError("SHA-256 checksum mismatch" if tpath.exists() else "tensor file missing")
            tensors = load_file(str(tpath))
        except (ValueError, KeyError, OSError) as e:
            warn(f"warning: checkpoint {meta_path.name} is corrupt or incomplete ({e}); "
                 "trying the previous one")
            continue
        if config_hash is not None and meta.get("config_hash") not in (None, config_hash):
            raise ValueError(f"checkpoint {meta_path} belongs to a run with another configuration "
                             f"(config hash {meta['config_hash'][:12]}, this run {config_hash[:12]}); "
                             "resume with the settings it was made with, or use another out folder")
        for name, m in modules.items():
            prefix = name + "."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            own = m.state_dict()
            if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
                wrong = sorted(set(state) ^ set(own)) or [k for k in own if state[k].shape != own[k].shape]
                raise ValueError(f"checkpoint {meta_path} holds another model for {name!r} (mismatched "
                                 f"weights {wrong[:4]}); resume with the model it was made from, or use "
                                 "another out folder")
            m.load_state_dict(state)
        if optimizer is not None and "optimizer" in meta:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        for name, g in generators.items():
            if f"rng.{name}" not in tensors:
                raise ValueError(f"checkpoint {meta_path} has no random stream {name!r}: it was written with "
                                 f"{meta.get('extra', {}).get('shards', 1)} shards (processes × grad_accum); "
                                 "resume with the same number of processes × grad_accum")
            g.set_state(tensors[f"rng.{name}"])
        _set_global_rng_state(tensors, meta.get("rng", {}))
        return meta
    return None
