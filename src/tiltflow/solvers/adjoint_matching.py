"""Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen 2024, arXiv 2409.08861).

Target: p*(x) ∝ p_base(x) · exp(r(x)/λ), i.e. max_p E_p[r] − λ KL(p ‖ p_base).

Our reward convention: the terminal condition is ã(1) = −∇r(X1)/λ, so λ is a KL weight (the
paper writes the tilt exp(λ r) with λ a reward multiplier; ours is its reciprocal).

One iteration (paper Alg. 1, "lean adjoint matching"):
 1. simulate the memoryless SDE dX = b_ft dt + σ dW with the *current* fine-tuned velocity,
    b = 2v − κx, σ(t)² = 2η_t (paths.py), without gradients;
 2. integrate the lean adjoint backward, dã/dt = −(∇_x b_base(X_t, t))ᵀ ã (paper eq. 38),
    from ã(1) = −∇r(X1)/λ. We integrate it as the exact adjoint of the discrete rollout:
    ã_i = (∂X_{i+1}/∂X_i)ᵀ ã_{i+1} with the step map built from the *base* velocity
    (Euler–Maruyama step ⇒ ã_i = ã_{i+1} + h ∇b_base(X_i)ᵀ ã_{i+1}, the paper's discretisation);
    one vector–Jacobian product of the base per step, no backward pass through the fine-tuned net;
 3. regress (paper eq. 39)
        L = Σ_{t_i ∈ S} ‖ (2/σ(t_i)) (v_ft − v_base)(X_i, t_i) + σ(t_i) ã_i ‖²,
    whose minimiser is v_ft = v_base − σ² ã / 2. The control u = (b_ft − b_base)/σ = 2Δv/σ.
    The times S are drawn before step 2, whose VJPs evaluate v_base(X_i, t_i) anyway and hand it
    over at S: the loss adds only the fine-tuned forward and backward (no second base forward).

Choices, each documented where it is made: the loss is summed over data dimensions and averaged
over trajectories and the chosen times; t = 0 (σ = ∞) and t = 1 (end point) never enter the loss;
the time subset S keeps the times nearest the data and a uniform sample of the others (paper
App. G: the late steps carry most of the reward signal).
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Callable

import torch

from .. import integrators
from ..models.flow_model import FlowModel


@dataclass
class Rollout:
    """States xs (steps + 1, batch, *dims) on grid (steps + 1,), and the cond used."""
    xs: torch.Tensor
    grid: torch.Tensor
    cond: object = None


@torch.no_grad()
def rollout(model: FlowModel, n: int, grid: torch.Tensor, generator: torch.Generator,
            cond=None, scheme: str = "exponential") -> Rollout:
    """Simulate n memoryless-SDE trajectories of `model` from X_0 ~ N(0, I) without gradients."""
    x0 = model.prior(n, generator)
    xs, grid = integrators.memoryless_solve(model.path, lambda x, t: model.velocity(x, t, cond), x0,
                                            grid, generator, scheme, return_trajectory=True)
    return Rollout(xs, grid, cond)


def terminal_adjoint(reward: Callable, x1: torch.Tensor, lam: float, cond=None):
    """ã(1) = −∇r(X1)/λ; returns (ã(1) like x1, r(X1) as (batch,) detached).

    Raises ValueError if r returns the wrong shape, non-finite values, or no gradient.
    """
    from ..rewards import check_reward

    with torch.enable_grad():
        x = x1.detach().requires_grad_(True)
        r = check_reward(reward, x, cond=cond, need_grad=True)
        (g,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
    if g is None:
        raise ValueError("reward has no gradient with respect to x (it does not depend on x "
                         "differentiably); gradient-based solvers need a differentiable reward")
    if not torch.isfinite(g).all():
        raise ValueError(f"reward gradient has {int((~torch.isfinite(g)).sum())} non-finite entries")
    return -g / lam, r.detach()


def lean_adjoint(base: FlowModel, ro: Rollout, a1: torch.Tensor, scheme: str = "exponential",
                 idx: torch.Tensor | None = None):
    """Backward pass ã_i = (∂X_{i+1}/∂X_i)ᵀ ã_{i+1} through the base step map; returns (steps+1, batch, *dims).

    The noise is additive, so the step map's Jacobian does not depend on it (noise=None); for
    scheme "heun" it does, through the predictor X̃_t, and the sweep takes the noise-free map's
    (the discrete adjoint of a Heun step of the drift; tests/test_adjoint_matching.py checks the
    tilt it gives with 10 steps).
    idx (k,): loss times (loss_times); then returns (ã, v_base) with v_base (k, batch, *dims) the
    base velocity v_base(X_i, t_i), i ∈ idx, that the VJP of step i evaluates anyway: the loss
    reuses it instead of a second base forward (only the k rows are kept, so memory does not grow
    with steps). Gradient checkpointing of the base network is off during the sweep: each VJP
    backpropagates right after its forward, so recomputing the forward would only cost time.
    """
    xs = ro.xs
    ts = ro.grid.tolist()                 # python floats: no device sync per step
    adj = torch.empty_like(xs)
    adj[-1] = a1
    a = a1
    rows = {} if idx is None else {i: j for j, i in enumerate(idx.tolist())}
    kept = {}

    def v(x, t):
        out = base.velocity(x, t, ro.cond)
        if i in rows and rows[i] not in kept:
            kept[rows[i]] = out.detach()
        return out

    with _no_checkpointing(base):
        for i in range(len(ts) - 2, -1, -1):
            with torch.enable_grad():
                x = xs[i].detach().requires_grad_(True)
                out = integrators.memoryless_step(base.path, v, x, ts[i], ts[i + 1], None, scheme)
                (a,) = torch.autograd.grad(out, x, grad_outputs=a)
            adj[i] = a
    if idx is None:
        return adj
    if len(kept) != len(rows):
        raise ValueError(f"loss times must be grid indices in [0, {len(ts) - 2}], got {sorted(rows)}")
    return adj, torch.stack([kept[j] for j in range(len(rows))])


@contextlib.contextmanager
def _no_checkpointing(model: torch.nn.Module):
    """Gradient checkpointing off inside the block (diffusers and transformers modules read their
    `gradient_checkpointing` flag at every forward), back on after it."""
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in on:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in on:
            m.gradient_checkpointing = True


def loss_times(steps: int, n: int | None, generator: torch.Generator, last_fraction: float = 0.5):
    """Grid indices S ⊂ {1, ..., steps − 1} for the loss, and weights making Σ_S w f ≈ Σ_all f.

    n=None: every interior time (weights 1). Otherwise the ⌈n·last_fraction⌉ times nearest t = 1
    plus a uniform sample of the rest, reweighted by (#rest / #sampled) so the KL estimate stays
    unbiased.
    """
    dev = generator.device if generator is not None else None   # the data's device: idx indexes the states
    interior = torch.arange(1, steps, device=dev)
    if n is None or n >= len(interior):
        return interior, torch.ones(len(interior), device=dev)
    k_last = min(max(1, int(round(n * last_fraction))), n)
    last, rest = interior[-k_last:], interior[:-k_last]
    k_rest = n - k_last
    pick = rest[torch.randperm(len(rest), generator=generator, device=dev)[:k_rest]].sort().values
    idx = torch.cat([pick, last])
    w = torch.cat([torch.full((k_rest,), len(rest) / max(k_rest, 1), device=dev), torch.ones(k_last, device=dev)])
    return idx, w


def adjoint_matching_loss(ft: FlowModel, base: FlowModel, ro: Rollout, adj: torch.Tensor,
                          idx: torch.Tensor, weights: torch.Tensor, v_base: torch.Tensor | None = None):
    """The lean adjoint matching loss and the path KL estimate.

    L = mean over batch and S of w_i ‖(2/σ_i)(v_ft − v_base)(X_i, t_i) + σ_i ã_i‖² (sum over dims),
    w_i = steps · h_i with h_i = t_{i+1} − t_i the step the control at t_i acts on: the sum over
    times is the quadrature Σ h_i f(t_i) of ∫ f dt on any grid (w_i = 1 on a uniform grid; on
    SD3's shifted grid the last interior time, σ ≈ 0.1, would otherwise weigh as much as a whole step).
    KL(P_ft ‖ P_base) = E ∫ ½‖u‖² dt with u = 2Δv/σ, estimated on S with `weights` and steps h_i.
    v_base: (k, batch, *dims) the base velocity at the k times idx, as lean_adjoint(..., idx) returns
    it (None: one base forward here). Returns (loss with grad, kl float).
    """
    grid = ro.grid
    B = ro.xs.shape[1]
    t = grid[idx]                                                     # (k,)
    x = ro.xs[idx].reshape(-1, *ro.xs.shape[2:])                      # (k·B, *dims)
    tt = t.repeat_interleave(B)
    cond = _repeat_cond(ro.cond, len(idx))
    sigma = ft.path.sigma(tt).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    if v_base is None:
        with torch.no_grad():
            v_base = base.velocity(x, tt, cond)
    dv = ft.velocity(x, tt, cond) - v_base.reshape(x.shape)
    a = adj[idx].reshape_as(x)
    res = (2.0 / sigma) * dv + sigma * a
    h = grid[1:] - grid[:-1]                                          # (steps,), step i: [t_i, t_{i+1}]
    w = (h[idx] * len(h)).to(res.dtype)                               # (k,)
    loss = (res.pow(2).reshape(len(idx), B, -1).sum(-1) * w[:, None]).mean()
    with torch.no_grad():
        u2 = (2.0 * dv / sigma).pow(2).reshape(len(idx), B, -1).sum(-1).mean(1)   # (k,)
        kl = float((0.5 * u2 * weights.to(u2) * h[idx].to(u2)).sum())
    return loss, kl


def backward_loss(ft: FlowModel, base: FlowModel, ro: Rollout, adj: torch.Tensor, idx: torch.Tensor,
                  weights: torch.Tensor, chunk: int | None = None, scale: float = 1.0,
                  backward: Callable = torch.Tensor.backward, autocast: Callable = contextlib.nullcontext,
                  v_base: torch.Tensor | None = None):
    """Backpropagate scale · L (adjoint_matching_loss) in chunks of `chunk` loss times; returns (L, kl) floats.

    L is a mean over the k·B (time, trajectory) pairs, so with chunks S_c of k_c times
        L = Σ_c (k_c / k) L_c,   ∇L = Σ_c (k_c / k) ∇L_c,   kl = Σ_c kl_c,
    and gradients accumulated chunk by chunk equal the one-pass gradient up to rounding, while only
    one chunk's activations (k_c·B rows of the fine-tuned net) are alive at a time.
    chunk=None: one pass. backward(loss) replaces loss.backward() (e.g. a GradScaler's scale);
    autocast: a context manager factory wrapping the forward passes (mixed precision);
    v_base: (k, batch, *dims) base velocities at idx (lean_adjoint(..., idx)), None: computed here.
    """
    k = len(idx)
    chunk = k if chunk is None else chunk
    total, kl = 0.0, 0.0
    for s in range(0, k, chunk):
        sl = slice(s, min(s + chunk, k))
        with autocast():
            loss_c, kl_c = adjoint_matching_loss(ft, base, ro, adj, idx[sl], weights[sl],
                                                 None if v_base is None else v_base[sl])
        backward(loss_c * (scale * (sl.stop - sl.start) / k))
        total += float(loss_c.detach()) * (sl.stop - sl.start) / k
        kl += kl_c
    return total, kl


def _repeat_cond(cond, k: int):
    if cond is None or not torch.is_tensor(cond):
        return cond
    return cond.repeat(k, *([1] * (cond.ndim - 1)))
