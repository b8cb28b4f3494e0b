"""validation: the checks of public arguments, one definition each, with errors that name the value.

Every public boundary (configs' __post_init__, objectives, rewards, tasks) validates with these;
inside the library values are trusted. Numbers may be Python, NumPy or 0-d torch scalars; bools
are refused where a number is meant (True is an int to Python, never a step count to a user).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable


def as_number(v: Any, name: str) -> float:
    """v as a float; ValueError naming `name` if it is not a real number (bools refused)."""
    if isinstance(v, bool) or isinstance(v, str):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {v!r}") from None


def finite(v: Any, name: str) -> float:
    """A finite real number."""
    x = as_number(v, name)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return x


def positive(v: Any, name: str) -> float:
    """A finite number > 0."""
    x = as_number(v, name)
    if not 0.0 < x < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return x


def non_negative(v: Any, name: str) -> float:
    """A finite number >= 0 (e.g. a clipping norm, where 0 means off)."""
    x = as_number(v, name)
    if not 0.0 <= x < math.inf:
        raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
    return x


def in_interval(v: Any, name: str, lo: float, hi: float, lo_open: bool = True, hi_open: bool = False) -> float:
    """A number in the interval from lo to hi, open or closed at each end as asked."""
    x = as_number(v, name)
    ok = (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                         f"got {v!r}")
    return x


def positive_int(v: Any, name: str, minimum: int = 1) -> int:
    """An int >= minimum (default 1); bools and floats refused."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return v


def integer(v: Any, name: str) -> int:
    """An int (any sign); bools and floats refused (e.g. a seed)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return v


def int_tuple(v: Any, name: str) -> tuple:
    """A non-empty tuple (or list) of positive ints, as a tuple (e.g. hidden widths)."""
    if isinstance(v, (list, tuple)) and v and all(not isinstance(h, bool) and isinstance(h, int) and h > 0 for h in v):
        return tuple(v)
    raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {v!r}")


def optional(check, v: Any, name: str, *args):
    """None, or v passed through `check`."""
    return None if v is None else check(v, name, *args)


def one_of(v: Any, name: str, choices: Iterable) -> Any:
    """v, one of `choices`."""
    choices = tuple(choices)
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {v!r}")
    return v


def renamed(old: str, new: str, old_value: Any, new_value: Any, default: Any, owner: str) -> Any:
    """The value of a renamed option: `new` unless only the deprecated `old` was set.

    Warns (DeprecationWarning naming the new spelling) when `old` is used; ValueError when both were
    set to different values.
    """
    if old_value is None:
        return new_value
    warnings.warn(f"{owner}: `{old}` is deprecated, use `{new}`", DeprecationWarning, stacklevel=4)
    if new_value is not None and new_value != default and new_value != old_value:
        raise ValueError(f"{owner}: pass `{new}` only (got {new}={new_value!r} and the deprecated {old}={old_value!r})")
    return old_value


def current_fields(cfg) -> dict:
    """dataclasses.asdict(cfg) without its deprecated alias fields (metadata {"deprecated": new})."""
    import dataclasses
    old = {f.name for f in dataclasses.fields(cfg) if "deprecated" in f.metadata}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in old}


def resolve_renamed(cfg, owner: str) -> None:
    """Move every deprecated alias field of dataclass `cfg` onto its new field (warning), then clear it."""
    import dataclasses
    for f in dataclasses.fields(cfg):
        new = f.metadata.get("deprecated")
        if new is None or getattr(cfg, f.name) is None:
            continue
        default = next(g.default for g in dataclasses.fields(cfg) if g.name == new)
        setattr(cfg, new, renamed(f.name, new, getattr(cfg, f.name), getattr(cfg, new), default, owner))
        setattr(cfg, f.name, None)
