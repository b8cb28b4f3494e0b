"""A CPU-side check for "made on the default device instead of the data's device".

On a GPU such a tensor or generator is a crash (`Expected all tensors to be on the same device`,
`quantile() q tensor must be on the same device`, `Expected a 'cpu' device type for generator`);
on a CPU-only machine it is invisible, because the default device is the data's device.
`DefaultDeviceCheck()` plays a GPU machine on the CPU: the test's tensors (and anything made
with `device=` from them) stand for the data's device, while every tensor factory (torch.zeros,
arange, tensor, randn, randperm, ...) called *directly* from a line of src/tiltflow without a
`device=`, or with the literal string "cpu", returns a `HostTensor`, a CPU tensor that stands for
"the host, not the data's device". Host tensors then follow CUDA's rules (torch's own):

- an operation mixing a host tensor with a data tensor raises AssertionError naming both lines,
  except 0-dim host tensors (CPU scalars mix with CUDA tensors) and host index tensors
  (cuda_x[cpu_index] works); `.to(x)`, `.to(x.device)`, `.to(device=dev)` and `copy_` move a
  host tensor onto the data's device, `.to("cpu")` and `.cpu()` (from tiltflow) onto the host;
- a generator made by tiltflow without a device (torch.Generator(), or device="cpu") is a host
  generator; a draw whose target (a factory's device, else its first tensor) is on the other
  side from its generator raises AssertionError (`torch.randperm(n, generator=cuda_gen)`).

Left alone, as on a GPU they are moved with the module: tensors made while an nn.Module is
constructed (its __init__, or a `from_config` classmethod) and everything torch makes itself.
Not seen: `torch.zeros(..., device=host_tensor.device)` (a torch.device cannot carry the mark),
so such a tensor counts as on the data's device.

    with DefaultDeviceCheck():
        tilt.finetune(model, reward, device="cpu", ...)
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.utils._device
from torch._C import DisableTorchFunctionSubclass
from torch.overrides import TorchFunctionMode

import tiltflow

SRC = os.path.dirname(os.path.abspath(tiltflow.__file__)) + os.sep
_ROOT = os.path.dirname(SRC[:-1]) + os.sep                      # .../src/: sites read "tiltflow/x.py:12"
_FACTORIES = torch.utils._device._device_constructors()
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}       # keep a tensor argument's device
_REAL_GENERATOR = torch.Generator
_DEVICE_GET = torch.Tensor.device.__get__
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
HOST = torch.device("cpu", 0)   # a host tensor's .device; the data's CPU device is torch.device("cpu")
_MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cuda, torch.Tensor.type_as}


def _where(frame) -> str:
    name = frame.f_code.co_filename
    return f"{name[len(_ROOT):] if name.startswith(SRC) else name}:{frame.f_lineno}"


def _tiltflow_site() -> str | None:
    """'tiltflow/x.py:12' of the innermost src/tiltflow frame of the stack, else None."""
    f = sys._getframe(1)
    while f is not None and not f.f_code.co_filename.startswith(SRC):
        f = f.f_back
    return None if f is None else _where(f)


def _builds_a_module(frame) -> bool:
    """True if `frame` runs inside the construction of an nn.Module by tiltflow code."""
    while frame is not None and frame.f_code.co_filename.startswith(SRC):
        name = frame.f_code.co_name
        if name == "from_config" or (name == "__init__" and isinstance(frame.f_locals.get("self"), torch.nn.Module)):
            return True
        frame = frame.f_back
    return False


def _host_device(device) -> bool:
    """Not the data's device: absent, the literal "cpu" written in the code, or a host tensor's device."""
    return device is None or device == HOST or (isinstance(device, str) and torch.device(device).type == "cpu")


def _tensors(args, kwargs) -> list[torch.Tensor]:
    """The tensor arguments, including those inside lists and tuples (indices, torch.cat)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [b for b in a if isinstance(b, torch.Tensor)]
    return out


def _ndim(t: torch.Tensor) -> int:
    with DisableTorchFunctionSubclass():
        return t.ndim


def _plain(x):
    """Tensors (also inside tuples/lists) as plain torch.Tensor: on the data's device."""
    if isinstance(x, HostTensor):
        with DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    if isinstance(x, (tuple, list)):   # also torch.Size and torch.return_types
        return type(x)([_plain(v) for v in x])
    return x


def _host(x, site: str | None):
    if isinstance(x, torch.Tensor) and not isinstance(x, HostTensor):
        with DisableTorchFunctionSubclass():
            x = x.as_subclass(HostTensor)
        x.made_at = site
    elif isinstance(x, (tuple, list)):
        return type(x)([_host(v, site) for v in x])
    return x


def _to_target(args, kwargs):
    """Where Tensor.to / cuda sends a tensor: "host", "data" or None (dtype only)."""
    for a in (*args[1:], kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, torch.Tensor):
            return "host" if isinstance(a, HostTensor) else "data"
        if isinstance(a, (str, torch.device)):
            return "host" if _host_device(a) else "data"
    return None


class HostTensor(torch.Tensor):
    """A CPU tensor standing for the host side of a GPU machine (see the module docstring)."""

    made_at: str | None = None

    def __deepcopy__(self, memo):   # e.g. a path's schedule table inside a model's copy()
        out = _host(copy.deepcopy(_plain(self), memo), self.made_at)
        memo[id(self)] = out
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return HOST
        tensors = _tensors(args, kwargs)
        made = next((t.made_at for t in tensors if isinstance(t, HostTensor) and t.made_at), None)
        if func in _MOVES:
            target = "data" if func is torch.Tensor.cuda else _to_target(args, kwargs)
            if func is torch.Tensor.copy_ or target is None:   # in place, or a dtype change: stays where it is
                target = "host" if isinstance(args[0], HostTensor) else "data"
        elif "device" in kwargs:
            target = "host" if _host_device(kwargs["device"]) else "data"
        else:
            if func in _INDEXING:   # x[i], x[i] = v: the result lives with x; host indices into data are fine
                target = "host" if isinstance(args[0], HostTensor) else "data"
                index = [t for t in _tensors(args[1:2], {}) if _ndim(t) > 0]
                mixed = target == "host" and any(not isinstance(t, HostTensor) for t in index)
                tensors = [args[0], *_tensors(args[2:], {})]
            else:
                mixed = False
            big = [t for t in tensors if _ndim(t) > 0]
            host = [t for t in big if isinstance(t, HostTensor)]
            data = [t for t in tensors if not isinstance(t, HostTensor)]
            if mixed or (host and data):   # 0-dim host tensors mix with data, as CPU scalars with CUDA tensors
                raise AssertionError(
                    f"{_tiltflow_site() or 'torch'}: {getattr(func, '__name__', func)} mixes a tensor on the "
                    "data's device with one made on the default device" + (f" at {made}" if made else "")
                    + "; make it on the data's device (device=x.device)")
            if func not in _INDEXING:
                target = "data" if any(not isinstance(t, HostTensor) for t in big) else "host"
        out = super().__torch_function__(func, types, args, kwargs)
        return _plain(out) if target == "data" else _host(_plain(out), made)


class _Generator(_REAL_GENERATOR):
    """torch.Generator that remembers where tiltflow made it on the host."""

    def __new__(cls, device=None):
        g = super().__new__(cls) if device is None else super().__new__(cls, device=device)
        f = sys._getframe(1)
        g.host_at = _where(f) if f.f_code.co_filename.startswith(SRC) and _host_device(device) else None
        return g

    @property
    def device(self):   # draws with device=generator.device stay on the host
        return HOST if self.host_at else _REAL_GENERATOR.device.__get__(self)


class DefaultDeviceCheck(TorchFunctionMode):
    """Host tensors and generators for what tiltflow makes without a device (see module doc)."""

    def __enter__(self):
        torch.Generator = _Generator
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Generator = _REAL_GENERATOR
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        if not caller.f_code.co_filename.startswith(SRC):
            return func(*args, **kwargs)
        site = _where(caller)
        on_host = None           # where the result goes: True host, False data's device, None as torch says
        if func in _FACTORIES:
            device = kwargs.get("device")
            data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
            if not _host_device(device):
                on_host = False
            elif func in _FROM_DATA and isinstance(data, torch.Tensor):   # follows its data, or "cpu"
                on_host = device is not None or isinstance(data, HostTensor)
            elif not _builds_a_module(caller):
                on_host = True
        elif func is torch.Tensor.cpu or (func is torch.Tensor.to and _to_target(args, kwargs) == "host"):
            on_host = True
        draws_on_host = on_host if on_host is not None else \
            any(isinstance(t, HostTensor) for t in _tensors(args, kwargs)[:1])
        gen = kwargs.get("generator")
        if gen is not None and bool(getattr(gen, "host_at", None)) != draws_on_host:
            what = "on the host with a generator on the data's device" if draws_on_host else \
                f"on the data's device with a host generator (made without a device at {gen.host_at})"
            raise AssertionError(f"{site}: {getattr(func, '__name__', func)} draws {what}; "
                                 "make the generator and the draw on the data's device")
        out = func(*args, **kwargs)
        return out if on_host is None else _host(out, site) if on_host else _plain(out)
