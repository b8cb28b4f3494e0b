"""prompts: many conditions in one fine-tuning run, one prompt per micro-batch in a shuffled cycle.

A condition is a tensor, or a dict/list of tensors (diffusers' encode_prompts output). `prompts=[c_1,
..., c_P]` (or one batched encode_prompts dict) is split into one-row conditions; micro-batch k of
a run (k = iteration · shards + shard, the same numbering on every process) takes prompt π_e(k mod P)
with e = k div P and π_e a permutation drawn from (seed, e) alone: every prompt once per epoch of P
micro-batches, in a shuffled order, a pure function of the iteration (resume and data parallel need
no extra state).
"""

from __future__ import annotations

import torch


def rows(c, what: str):
    """Row count of a condition (tensor, or dict of tensors / lists), checking they agree."""
    if torch.is_tensor(c):
        return 1 if c.ndim == 0 else c.shape[0]
    if isinstance(c, (list, tuple)) and not any(torch.is_tensor(v) or isinstance(v, (dict, list, tuple)) for v in c):
        return len(c)
    if isinstance(c, dict) and c:
        n = {k: rows(v, f"{what}[{k!r}]") for k, v in c.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"{what} has entries with different row counts {n}")
        return next(iter(n.values()))
    raise ValueError(f"{what} must be a tensor or a dict of tensors (e.g. encode_prompts output), "
                     f"got {type(c).__name__}")


def split_prompts(prompts) -> list:
    """The list of per-prompt conditions: a list as given, or the rows of one batched dict."""
    if isinstance(prompts, dict):
        n = rows(prompts, "prompts")
        return [{k: v[j:j + 1] for k, v in prompts.items()} for j in range(n)]
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of conditions or an encode_prompts dict, got {prompts!r}")
    if all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts are text: encode them once with the pipeline's own encoders, "
                         "prompts=tiltflow.models.diffusers_adapter.encode_prompts(pipe, [...]), "
                         "and pass that (or a list of per-prompt conditions)")
    conds = []
    for j, c in enumerate(prompts):
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = torch.tensor([c])
        if rows(c, f"prompts[{j}]") != 1:
            raise ValueError(f"prompts[{j}] has {rows(c, f'prompts[{j}]')} rows; each prompt's condition "
                             "must have exactly one row (pass a batched encode_prompts dict to split it)")
        conds.append(c)
    return conds


def on_device(c, device):
    """A condition (tensor, or dict/list holding tensors) with its tensors on `device`."""
    if torch.is_tensor(c):
        return c.to(device)
    if isinstance(c, dict):
        return {k: on_device(v, device) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return type(c)(on_device(v, device) for v in c)
    return c


def repeat(c, n: int):
    """One-row condition c repeated to n rows."""
    if torch.is_tensor(c):
        c = c.reshape(1) if c.ndim == 0 else c
        return c.expand(n, *c.shape[1:])
    if isinstance(c, dict):
        return {k: repeat(v, n) for k, v in c.items()}
    return list(c) * n


def cat(conds: list):
    """Row-wise concatenation of conditions of the same structure."""
    c0 = conds[0]
    if torch.is_tensor(c0):
        return torch.cat(conds)
    if isinstance(c0, dict):
        return {k: cat([c[k] for c in conds]) for k in c0}
    return [v for c in conds for v in c]


def stack_prompts(conds: list, counts) -> object:
    """conds[p] repeated counts[p] times, in order: the condition of a pooled batch."""
    return cat([repeat(c, k) for c, k in zip(conds, counts) if k > 0])


class PromptSchedule:
    """Micro-batch k -> prompt π_e(k mod P), e = k div P, π_e a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def __call__(self, k: int) -> int:
        e, j = divmod(k, self.n)
        if e not in self._perms:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * e + 1) % 2**63)
            self._perms = {e: torch.randperm(self.n, generator=g).tolist()}   # only the current epoch
        return self._perms[e][j]


def prompt_record(conds) -> dict:
    """What identifies the prompts in the config (count and a digest of their tensors)."""
    import hashlib
    h = hashlib.sha256()
    for c in conds:
        for k, v in sorted(c.items()) if isinstance(c, dict) else [("", c)]:
            h.update(str(k).encode())
            if torch.is_tensor(v):
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(v).encode())
    return {"count": len(conds), "sha256": h.hexdigest()[:16]}


def prepare(model, cond, prompts, device):
    """(cond, conds, restore): the run's condition(s) on `device`, and a function undoing `release`.

    Text (a string or list of strings) goes through the model's own prompt encoder first; then the
    text encoders (SD3's T5-XXL) leave the accelerator for the run (a new prompt, e.g. in a callback,
    is still encoded on demand) and `restore()` brings them back. conds: None for one condition,
    else the list of one-row conditions of `prompts`.
    """
    from ..models.diffusers_adapter import encode_text, release_text_encoders
    if prompts is not None and cond is not None:
        raise ValueError("pass either cond (one condition) or prompts (several), not both")
    if prompts is not None or cond is not None:
        prompts, cond = encode_text(model, prompts), encode_text(model, cond)
    restore = release_text_encoders(model)
    conds = None if prompts is None else [on_device(c, device) for c in split_prompts(prompts)]
    return on_device(cond, device), conds, restore
