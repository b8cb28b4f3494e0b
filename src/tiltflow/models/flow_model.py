"""FlowModel: a velocity network on a probability path, with sampling, likelihood and I/O."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import integrators, validation
from ..paths import AffinePath, get_path
from .analytic import GaussianMixtureVelocity
from .mlp import MLPVelocity

FORMAT = "tiltflow.FlowModel/1"


class ResidualVelocity(nn.Module):
    """v(x, t) = v_base(x, t) + v_res(x, t) with v_base frozen: a control added to a base.

    Used when the base has nothing to train (closed-form velocities) or to keep the base
    weights exact; with a zero-initialised residual the sum starts equal to the base.
    """

    def __init__(self, base: nn.Module, residual: nn.Module):
        super().__init__()
        self.base, self.residual = base, residual
        self.base.requires_grad_(False)
        self.dim = getattr(base, "dim", None)

    def config(self) -> dict:
        return {"class": "ResidualVelocity", "base": self.base.config(), "residual": self.residual.config()}

    def forward(self, x, t, cond=None):
        return self.base(x, t, cond) + self.residual(x, t, cond)


def build_net(cfg: dict) -> nn.Module:
    """Rebuild a velocity network from its `config()` (names only, nothing unpickled)."""
    cfg = dict(cfg)
    cls = cfg.pop("class", None)
    if cls == "MLPVelocity":
        return MLPVelocity(**cfg)
    if cls == "GaussianMixtureVelocity":
        return GaussianMixtureVelocity.from_config({"class": cls, **cfg})
    if cls == "ResidualVelocity":
        return ResidualVelocity(build_net(cfg["base"]), build_net(cfg["residual"]))
    if cls == "EGNNVelocity":
        from .egnn import EGNNVelocity
        return EGNNVelocity(**cfg)
    if cls == "SE3Velocity":
        from .se3 import SE3Velocity
        return SE3Velocity(**cfg)
    if cls == "SmallUNetVelocity":
        from .unet import SmallUNetVelocity
        return SmallUNetVelocity(**cfg)
    if cls == "FixedCondVelocity":
        from .unet import FixedCondVelocity
        return FixedCondVelocity(build_net(cfg["net"]), [cfg["cond"]])
    if cls in ("SD3Velocity", "UNetVelocity"):  # diffusers adapters; needs tiltflow[diffusers]
        from .diffusers_adapter import build_adapter
        return build_adapter({"class": cls, **cfg})
    raise ValueError(f"unknown network class {cls!r} in checkpoint; known: MLPVelocity, "
                     "GaussianMixtureVelocity, ResidualVelocity, EGNNVelocity, SE3Velocity, SmallUNetVelocity, "
                     "FixedCondVelocity, SD3Velocity, UNetVelocity")


class FlowModel(nn.Module):
    """A generative flow: velocity network `net` on `path`, data of shape `shape`.

    velocity(x, t, cond) -> like x;  sample(n) -> (n, *shape);  log_prob(x) -> (n,).
    """

    def __init__(self, net: nn.Module, path: AffinePath | str | dict | None = None, shape=None):
        super().__init__()
        self.net = net
        if path is None:  # a closed-form net knows its path; otherwise rectified flow
            path = getattr(net, "path", "rectified")
        self.path = path if isinstance(path, AffinePath) else get_path(path)
        if shape is None:
            shape = (net.dim,)
        self.shape = tuple(int(s) for s in shape)

    @property
    def device(self) -> torch.device:
        for t in self.state_dict().values():
            return t.device
        return torch.device("cpu")

    def config(self) -> dict:
        return {"net": self.net.config(), "path": self.path.config(), "shape": list(self.shape)}

    def velocity(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """x: (batch, *shape); t: float or (batch,); returns (batch, *shape)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(x, t, cond)

    def _v(self, cond):
        return lambda x, t: self.velocity(x, t, cond)

    def prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """x0 ~ N(0, I): (n, *shape)."""
        return torch.randn((n, *self.shape), generator=generator, device=device or self.device)

    def time_grid(self, steps: int, grid: str = "auto", device=None) -> torch.Tensor:
        """The integration grid (steps + 1,), increasing from t = 0 (noise) to t = 1 (data).

        grid "auto": the network's own grid where it has one (`net.default_grid(steps, device)`;
        SD3: the scheduler's shifted σ grid, as the pipeline samples), uniform otherwise;
        "uniform": uniform for every network.
        """
        validation.positive_int(steps, "steps")
        if grid not in ("auto", "uniform"):
            raise ValueError(f"grid must be 'auto' (the network's own grid, else uniform) or 'uniform', got {grid!r}")
        own = getattr(self.net, "default_grid", None) if grid == "auto" else None
        return own(steps, device=device) if callable(own) else integrators.time_grid(steps, device=device)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 100, sde: bool = False, cond=None, seed: int | None = None,
               generator: torch.Generator | None = None, method: str = "heun",
               return_trajectory: bool = False, grid: str = "auto", scheme: str = "exponential"):
        """Draw n samples: ODE (`method` euler/midpoint/heun) or the memoryless SDE (`sde=True`,
        stepped by `scheme`, integrators.memoryless_step: "exponential", or "heun" for second order).

        grid: "auto" (the network's own time grid, e.g. SD3's shifted one; uniform for networks
        without one) or "uniform" (see `time_grid`).
        Randomness: `generator` if given, else a generator seeded with `seed`; with neither, a
        fresh seed drawn from the global torch RNG (two calls differ; `torch.manual_seed` makes
        them reproducible).
        Returns (n, *shape), or (trajectory (steps + 1, n, *shape), grid) with return_trajectory.
        """
        validation.positive_int(n, "n")
        validation.positive_int(steps, "steps")
        if generator is None:
            if seed is None:   # fresh randomness, reproducible under torch.manual_seed
                seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            generator = torch.Generator(device=self.device).manual_seed(seed)
        x = self.prior(n, generator)
        grid = self.time_grid(steps, grid, device=x.device)
        if sde:
            return integrators.memoryless_solve(self.path, self._v(cond), x, grid, generator, scheme,
                                                return_trajectory=return_trajectory)
        return integrators.ode_solve(self._v(cond), x, grid, method, return_trajectory)

    def log_prob(self, x: torch.Tensor, steps: int = 100, cond=None, exact: bool | None = None,
                 n_samples: int = 1, seed: int = 0, grid: str = "auto", create_graph: bool = False) -> torch.Tensor:
        """log p_1(x) by the instantaneous change of variables; x: (n, *shape) -> (n,).

        exact=None uses the exact divergence when the data has at most 16 dimensions and
        Hutchinson's estimator (n_samples Rademacher probes) otherwise. grid: as in `sample`.
        create_graph: the result stays differentiable in x (∇_x log p by autograd; default detached).
        """
        validation.positive_int(steps, "steps")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor (n, {', '.join(map(str, self.shape))}), got {type(x).__name__}")
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape (n, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a real floating-point tensor, got dtype {x.dtype}")
        if exact is None:
            exact = x[0].numel() <= 16
        gen = torch.Generator(device=x.device).manual_seed(seed)
        grid = self.time_grid(steps, grid, device=x.device)
        return integrators.log_prob(self._v(cond), x, grid, exact, n_samples, gen, create_graph)

    # --- I/O ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write weights and architecture to one safetensors file (atomic: temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "config": json.dumps(self.config())})
        os.replace(tmp, path)
        return path

    @staticmethod
    def read_config(path: str | os.PathLike) -> dict:
        """The architecture stored in a FlowModel file; ValueError if it is not one."""
        from ..checkpoint import read_metadata
        return json.loads(read_metadata(path, FORMAT, "FlowModel checkpoint", "model")["config"])

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "FlowModel":
        """Rebuild a FlowModel saved with `save`. Nothing is unpickled."""
        cfg = cls.read_config(path)
        model = cls(build_net(cfg["net"]), cfg["path"], cfg["shape"])
        model.load_weights(path)
        return model.to(device) if device is not None else model

    def load_weights(self, path: str | os.PathLike) -> "FlowModel":
        """Load weights saved by `save` into this model; ValueError if the architecture differs."""
        cfg = self.read_config(path)
        if cfg != self.config():
            raise ValueError(f"checkpoint {path} holds a different model:\n  checkpoint: {cfg}\n"
                             f"  this model: {self.config()}")
        from safetensors.torch import load_file
        state = load_file(str(path), device=str(self.device))
        self.load_state_dict(state, strict=True)
        return self

    def copy(self, share_weights: bool = False) -> "FlowModel":
        """An independent deep copy (fine-tuning never modifies its base).

        share_weights=True: new modules whose parameters and buffers are frozen views of this
        model's tensors (requires_grad False, no new storage). Moving the copy (`.to`) or adding
        modules to it (a LoRA) leaves this model alone; writing into a shared tensor in place
        changes both. finetune builds its frozen base and a LoRA run's network this way.
        """
        if not share_weights:
            return copy.deepcopy(self)
        memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in self.parameters()}
        memo.update({id(b): b.detach() for b in self.buffers()})
        return copy.deepcopy(self, memo)
