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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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


def save_checkpoint(out: Path, step: int, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None, generators: dict[str, torch.Generator],
                    extra: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoints/step_{step}: module weights, optimizer, generator and torch RNG states."""
    ckdir = Path(out) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    meta = {"step": step, "extra": extra or {}}
    if optimizer is not None:
        opt_t, opt_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_t)
        meta["optimizer"] = opt_meta
    for name, g in generators.items():
        tensors[f"rng.{name}"] = g.get_state()
    tensors["rng.torch_global"] = torch.get_rng_state()
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
                generators: dict[str, torch.Generator], warn=print) -> dict | None:
    """Restore the newest checkpoint that verifies; returns its metadata, or None if none exists."""
    ckdir = Path(out) / "checkpoints"
    for meta_path in sorted(ckdir.glob("step_*.json"), reverse=True):
        tpath = meta_path.with_suffix(".safetensors")
        try:
            meta = json.loads(meta_path.read_text())
            if not tpath.exists() or _sha256(tpath) != meta["sha256"]:
                raise ValueError("checksum mismatch")
            tensors = load_file(str(tpath))
        except (ValueError, KeyError, OSError) as e:
            warn(f"warning: skipping corrupt checkpoint {meta_path.name}: {e}")
            continue
        for name, m in modules.items():
            prefix = name + "."
            m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if optimizer is not None and "optimizer" in meta:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        for name, g in generators.items():
            g.set_state(tensors[f"rng.{name}"])
        torch.set_rng_state(tensors["rng.torch_global"])
        return meta
    return None
