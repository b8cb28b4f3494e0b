"""Objectives that reduce to ONE exponential tilt p*(x) ∝ p_base(x)·exp(g(x)/λ).

An objective turns a reward ``r(x, cond=None) -> (batch,)`` into the pseudo-reward ``g`` of
that tilt (``pseudo_reward``) and scores samples (``value``).

- ``ExpectedReward``: g = r, the plain KL-regularised fine-tuning target.
- ``CVaR``: tail-aware fine-tuning (TFFT, arXiv 2602.16796). With tail mass β = ``level``,

      right-CVaR_β(r) = min_η { η + E[(r − η)₊]/β }      (mean of the top β fraction)
      left-CVaR_β(r)  = max_η { η − E[(η − r)₊]/β }      (mean of the bottom β fraction)

  For a fixed threshold η the KL-regularised problem max_p CVaR − λ·KL(p‖p_base) is a tilt
  with pseudo-reward g_η(r) = (r − η)₊/β (right) or −(η − r)₊/β (left); its value is

      F(η) = η + λ·log E_base exp(g_η(r)/λ).

  Stage 1 (``solve_threshold``) picks η* = argmin F_R (right: min over η of a max over p,
  swapped because F_R is convex) or η* = argmax F_L (left: max over both, no swap). Stage 2
  fine-tunes once with g_η* (left), or on the right with η re-estimated on each rollout batch
  as its (1 − β)-quantile: F'(η*) = 0 says exactly β of the optimal tilt lies beyond η*
  (``TrackedCVaRPseudoReward``). Why the tails differ: right-CVaR is concave in p (a min of
  affine functions), so max_p CVaR_R − λKL is a concave problem with one optimum; left-CVaR
  is CONVEX in p (a max of affine functions), so max_p CVaR_L − λKL can have several local
  optima, one per local maximum of F_L (e.g. for a bimodal reward law: keep both modes, or
  drop the lower one). F_L is not concave, and stage 1 must be solved globally.

Stage 1 is exact for the empirical law of the offline batch. Between consecutive sorted
rewards the dual has the form F(η) = η + λ·log(a + b·e^{−η/(βλ)}) − λ·log n with a, b ≥ 0
fixed, which is convex in η on each such piece. Hence

- the left maximum is attained at one of the rewards (a convex function on an interval
  peaks at an end), and F_L is increasing below min r and non-increasing above max r;
- the right minimum is at a reward or at the stationary point of one piece, which has the
  closed form e^{−η/(βλ)}·Σ_{r>η} e^{r/(βλ)} = β·#{r ≤ η}/(1 − β), i.e. exactly a
  fraction β of the tilted mass lies above η.

Enumerating these candidates is a global search with no step size, in O(n log n) after one
sort, in float64 with log-sum-exp; it replaces the grid + bracketing refinement that would
otherwise be needed for the non-concave left dual.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import softplus

from .metrics import cvar
from .validation import finite, in_interval, non_negative, one_of, positive

__all__ = [
    "CVaR",
    "CVaRPseudoReward",
    "TrackedCVaRPseudoReward",
    "ExpectedReward",
    "ThresholdSolution",
    "cvar_pseudo_reward",
    "solve_threshold",
    "tail_fraction",
    "threshold_dual",
]

Reward = Callable[..., Tensor]
_TAILS = ("right", "left")
_FEW_BEYOND = 50  # stage 1 warns (fixed thresholds) when fewer offline rewards lie beyond η̂


# --------------------------------------------------------------------------- validation


def _check_level(level: float) -> float:
    return in_interval(level, "level", 0.0, 1.0)   # β, the tail mass: (0, 1]


def _check_rewards(rewards: Any, name: str = "rewards") -> Tensor:
    r = torch.as_tensor(rewards)
    if r.ndim != 1 or r.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(r.shape)}")
    if not torch.is_floating_point(r):
        r = r.to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        bad = r[~torch.isfinite(r)][0].item()
        raise ValueError(f"{name} must be finite, got {bad} at some entries")
    return r


def _call_reward(reward: Reward, x: Tensor, cond: Any = None) -> Tensor:
    """r(x) or r(x, cond); returns (batch,)."""
    return reward(x) if cond is None else reward(x, cond)


def _rewards_of(reward: Reward, x: Tensor, cond: Any = None) -> Tensor:
    """Rewards of a batch, checked: x (batch, *dims) -> (batch,)."""
    r = _call_reward(reward, x, cond)
    if not isinstance(r, Tensor) or r.ndim != 1 or r.shape[0] != x.shape[0]:
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(
            f"reward must return a tensor of shape (batch,) = ({x.shape[0]},), got {shape}"
        )
    return r


# --------------------------------------------------------------------------- pseudo-reward


def cvar_pseudo_reward(
    r: Tensor, eta: float | Tensor, level: float, tail: str, smoothing: float = 0.0
) -> Tensor:
    """TFFT pseudo-reward g_η(r) of one tilt; differentiable in r (and in η if a tensor).

    g_η(r) = (r − η)₊/β (right) or −(η − r)₊/β (left).

    With ``smoothing = 0`` the hinge is ``relu`` and autograd uses the subgradient 0 at the
    kink: dg/dr = 1[r > η]/β (right) or 1[r < η]/β (left), the stage-2 gradient of TFFT.
    With ``smoothing = τ > 0``, (z)₊ is replaced by τ·softplus(z/τ) = τ·log(1 + e^{z/τ}):
    dg/dr = sigmoid(±(r − η)/τ)/β is nonzero everywhere (so samples short of the threshold
    still feel it), and g exceeds the hinge by at most τ·log 2/β (at r = η); τ → 0 recovers
    the hinge.

    r: (batch,) rewards. Returns (batch,).
    """
    beta = _check_level(level)
    one_of(tail, "tail", _TAILS)
    tau = non_negative(smoothing, "smoothing")
    if beta == 1.0:
        # β = 1: CVaR is the mean and every η ≤ min r (right) / ≥ max r (left) is optimal; the
        # hinge then equals r − η on the offline batch. Dropping it makes g = r − η everywhere,
        # so fresh samples beyond the batch's range keep their gradient (the expected-reward tilt).
        return r - eta
    z = r - eta if tail == "right" else eta - r
    hinge = torch.relu(z) if tau == 0.0 else tau * softplus(z / tau)
    return hinge / beta if tail == "right" else -hinge / beta


def tail_fraction(r: Tensor, eta: float, tail: str) -> float:
    """Fraction of r beyond η: #{r > η}/n (right) or #{r < η}/n (left); r: (n,).

    The threshold's optimality condition says it is β under the optimal tilt (F'(η*) = 0), so
    finetune logs it per iteration as a convergence diagnostic.
    """
    r = r.detach()
    return float(((r > eta) if one_of(tail, "tail", _TAILS) == "right" else (r < eta)).double().mean())


@dataclass(frozen=True)
class CVaRPseudoReward:
    """g(x, cond=None) = g_η(r(x)) for a fixed threshold η; see ``cvar_pseudo_reward``.

    x: (batch, *dims). Returns (batch,), differentiable through the reward.
    """

    reward: Reward
    eta: float
    level: float
    tail: str
    smoothing: float = 0.0

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        r = _call_reward(self.reward, x, cond)
        return cvar_pseudo_reward(r, self.eta, self.level, self.tail, self.smoothing)


class TrackedCVaRPseudoReward:
    """g_{η_k}(r(x)) with η_k = q_k, the tail quantile of the batch it is called on (self-consistent η).

    The optimality condition of the threshold: F'(η) = 1 − P_{p_η}(r > η)/β (right) or
    1 − P_{p_η}(r < η)/β (left), p_η ∝ p_base·exp(g_η/λ), so at η* exactly a fraction β of
    the optimal tilt lies beyond η*: η* = Q_{1−β}(p_η*) (right) or Q_β(p_η*) (left). The model
    being fine-tuned samples p_η, so its own rollouts estimate η: q_k is the (1 − β)-quantile
    (right) or β-quantile (left) of the current batch's rewards, and the fixed point of
    (model → p_η, η → q(model)) is η*. Stage 1's offline η̂ is only the starting value of
    ``self.eta``: on the right tail it rests on the few offline samples beyond it and is biased
    low, which the slope 1/(βλ) amplifies (``benchmarks/tfft.py``).

    The update is undamped (η_k from the current batch alone): about ⌈βn⌉ rollouts of every
    batch carry the gradient ∇r/β, and that holds the tilted tail's mass at β. Measured on the
    `mixture` benchmark (λ = 1, β = 0.1): averaging η over iterations (EMA, pooled batches, or
    a Robbins–Monro step on the fraction beyond η), or holding η at the exact η*, lets Adjoint
    Matching move the tail mass on its own and it oscillates or collapses to the base. No state
    is kept, so resume and data parallel need nothing (each micro-batch uses its own quantile).
    Left tail (``track=True``): F_L has several stationary points and tracking settles at the
    self-consistent one the model runs into, not necessarily stage 1's global maximum (the
    left default keeps η̂ fixed; stage 1 is accurate there, most samples lie beyond it).
    Called once per micro-batch on the rollout's end points; the current η_k is in ``self.eta``.
    """

    def __init__(self, reward: Reward, eta0: float, level: float, tail: str, smoothing: float = 0.0):
        self.reward, self.eta0 = reward, finite(eta0, "eta")
        self.level, self.tail = _check_level(level), one_of(tail, "tail", _TAILS)
        self.smoothing = non_negative(smoothing, "smoothing")
        self.eta = self.eta0

    def __call__(self, x: Tensor, cond: Any = None) -> Tensor:
        r = _call_reward(self.reward, x, cond)
        self.eta = float(torch.quantile(r.detach().double(), 1.0 - self.level if self.tail == "right" else self.level))
        return cvar_pseudo_reward(r, self.eta, self.level, self.tail, self.smoothing)

    def __repr__(self) -> str:
        return f"TrackedCVaRPseudoReward(eta0={self.eta0:.4g}, level={self.level:g}, tail={self.tail!r})"


# --------------------------------------------------------------------------- stage 1


def threshold_dual(
    rewards: Tensor, eta: float | Tensor, level: float, lam: float, tail: str
) -> Tensor:
    """The stage-1 dual F(η) = η + λ·log E exp(g_η(r)/λ), E over the batch of base rewards.

    Direct evaluation in float64 with log-sum-exp (O(m·n) work, chunked over η).

    rewards: (n,) rewards of base samples. eta: scalar or (m,). Returns () or (m,), float64.
    """
    r = _check_rewards(rewards).detach().to("cpu", torch.float64)
    beta, lam = _check_level(level), positive(lam, "lam")
    one_of(tail, "tail", _TAILS)
    eta_t = torch.as_tensor(eta, dtype=torch.float64)
    if not bool(torch.isfinite(eta_t).all()):
        raise ValueError(f"eta must be finite, got {eta!r}")
    return _dual(r, eta_t, beta, lam, tail)


def _dual(r: Tensor, eta: Tensor, beta: float, lam: float, tail: str) -> Tensor:
    """threshold_dual without checks. r: (n,), eta: any shape -> same shape."""
    n = r.numel()
    chunk = max(1, 2**22 // n)
    out = []
    for e in eta.reshape(-1).split(chunk):
        g = cvar_pseudo_reward(r[None, :], e[:, None], beta, tail)
        # F(η) = η + λ·log((1/n)·Σ_i exp(g_η(r_i)/λ))
        out.append(e + lam * (torch.logsumexp(g / lam, dim=1) - math.log(n)))
    return torch.cat(out).reshape(eta.shape)


@dataclass(frozen=True)
class ThresholdSolution:
    """Stage-1 result: η* and the dual optimum F(η*) on a batch of n base rewards.

    n_beyond: how many of the n rewards lie beyond η* (r > η* right, r < η* left). A right-tail
    η* is decided by these samples; when they are few (< 50) it is noisy and biased low, and an
    error δ in η changes the tilt's odds of landing beyond it by e^{δ/(βλ)}.
    """

    eta: float
    value: float
    n: int
    tail: str
    level: float
    lam: float
    n_beyond: int = 0


class _SortedDual:
    """F(η) for many η at O(log n) each, from prefix/suffix log-sum-exps of sorted rewards.

    With c = βλ, g_η/λ = (r − η)₊/c (right) or −(η − r)₊/c (left), so
    right: n·E e^{g/λ} = #{r ≤ η} + e^{−η/c}·Σ_{r>η} e^{r/c},
    left:  n·E e^{g/λ} = #{r ≥ η} + e^{−η/c}·Σ_{r<η} e^{r/c}.
    """

    def __init__(self, r_sorted: Tensor, beta: float, lam: float, tail: str):
        self.r, self.beta, self.lam, self.tail = r_sorted, beta, lam, tail
        self.c = beta * lam
        z = r_sorted / self.c
        ninf = torch.full((1,), -math.inf, dtype=z.dtype)
        if tail == "right":  # lse[i] = log Σ_{j ≥ i} e^{z_j}
            self.lse = torch.cat([torch.logcumsumexp(z.flip(0), 0).flip(0), ninf])
        else:  # lse[i] = log Σ_{j < i} e^{z_j}
            self.lse = torch.cat([ninf, torch.logcumsumexp(z, 0)])

    def __call__(self, eta: Tensor) -> Tensor:
        n = self.r.numel()
        if self.tail == "right":
            k = torch.searchsorted(self.r, eta, right=True)  # #{r ≤ η}
            flat = k.to(eta.dtype)
        else:
            k = torch.searchsorted(self.r, eta, right=False)  # #{r < η}
            flat = (n - k).to(eta.dtype)
        log_mass = torch.logaddexp(flat.log(), self.lse[k] - eta / self.c) - math.log(n)
        return eta + self.lam * log_mass

    def right_stationary_point(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Minimiser of F_R on the piece [lo, hi] between consecutive distinct rewards.

        F_R'(η) = 0 ⇔ e^{−η/c}·Σ_{r>η} e^{r/c} = β·#{r ≤ η}/(1 − β); clamped to the piece
        (F_R is convex there, so the clamp is the piece's minimiser).
        """
        k = torch.searchsorted(self.r, lo, right=True)  # #{r ≤ η} on the piece, ≥ 1
        # β = 1 gives log 0 = −inf and the left end, as it should (F_R is flat below min r).
        log_ratio = math.log1p(-self.beta) - math.log(self.beta) if self.beta < 1 else -math.inf
        eta = self.c * (self.lse[k] - k.to(lo.dtype).log() + log_ratio)
        return torch.minimum(torch.maximum(eta, lo), hi)


def solve_threshold(rewards: Tensor, level: float, lam: float, tail: str) -> ThresholdSolution:
    """Stage 1 of TFFT: the threshold η* of the KL-regularised CVaR dual, solved globally.

    right: η* = argmin_η F_R(η),  left: η* = argmax_η F_L(η),  with
    F(η) = η + λ·log E exp(g_η(r)/λ), g_η(r) = (r − η)₊/β or −(η − r)₊/β (module docstring).

    Exact for the empirical law of ``rewards`` (candidate enumeration, float64). When F is
    flat at the optimum (β = 1: any η ≤ min r for the right tail, η ≥ max r for the left),
    the end point min r / max r is returned.

    Caveat: the empirical η* always lies in [min r, max r] of the batch, and the batch
    estimates log E exp(g/λ) well only if it covers the tilted law p* ∝ p_base·exp(g/λ),
    roughly KL(p*‖p_base) ≪ log n. Aggressive settings break this for unbounded rewards:
    right tail, r ~ N(0, 1): η* ≈ 1/(2βλ) (25 for β = 0.1, λ = 0.2, far beyond any batch);
    left tail with small λ: p* keeps only {r ≳ η*} with base mass e^{−KL} (η* ≈ 5 for
    λ = 0.2), and the empirical maximum is biased upward.

    rewards: (n,) rewards of base samples (no grad needed).
    """
    r = _check_rewards(rewards).detach().to("cpu", torch.float64)
    beta, lam = _check_level(level), positive(lam, "lam")
    one_of(tail, "tail", _TAILS)
    # F(η; r + s) = F(η − s; r) + s: centre the rewards so r/(βλ) stays small in magnitude.
    centre = 0.5 * (r.max() + r.min())
    r_sorted, _ = torch.sort(r - centre)
    u = torch.unique_consecutive(r_sorted)  # the kinks of F, ascending
    dual = _SortedDual(r_sorted, beta, lam, tail)
    values = dual(u)
    if tail == "left":
        eta = u[values.argmax()]  # F_L is convex between kinks: its maximum is at a kink
    else:
        # F_R is convex: its minimum lies on one of the two pieces next to the best kink.
        j = int(values.argmin())
        i0, i1 = max(j - 1, 0), min(j + 1, u.numel() - 1)
        lo, hi = u[i0:i1], u[i0 + 1 : i1 + 1]  # pieces [u_i, u_{i+1}], i0 ≤ i < i1
        candidates = torch.cat([u[j : j + 1], dual.right_stationary_point(lo, hi)])
        eta = candidates[dual(candidates).argmin()]
    # Final value by direct evaluation (differences r − η, no cancellation of large terms).
    value = _dual(r - centre, eta, beta, lam, tail) + centre
    n_beyond = int((r_sorted > eta).sum() if tail == "right" else (r_sorted < eta).sum())
    return ThresholdSolution(
        eta=float(eta + centre), value=float(value), n=r.numel(), tail=tail, level=beta, lam=lam,
        n_beyond=n_beyond,
    )


# --------------------------------------------------------------------------- objectives


class ExpectedReward:
    """E_p[r]: the tilt is p* ∝ p_base·exp(r/λ), so the pseudo-reward is r itself."""

    name = "expected_reward"
    needs_offline = False  # finetune skips drawing the offline batch

    def __init__(self, reward: Reward):
        if not callable(reward):
            raise ValueError(f"reward must be callable, got {type(reward).__name__}")
        self.reward = reward

    def pseudo_reward(self, x_offline: Tensor | None, lam: float, cond: Any = None) -> Reward:
        """Returns the reward itself (x_offline is not needed; accepted for a common API)."""
        positive(lam, "lam")
        return self.reward

    def value(self, x: Tensor, cond: Any = None) -> float:
        """Mean reward over x: (batch, *dims)."""
        with torch.no_grad():
            return float(_rewards_of(self.reward, x, cond).double().mean())

    def __repr__(self) -> str:
        return f"ExpectedReward({self.reward!r})"


class CVaR:
    """Right- or left-tail CVaR of the reward at tail mass β = ``level`` (TFFT).

    ``pseudo_reward`` runs stage 1 on offline base samples (solution, with the count of offline
    rewards beyond η̂, in ``self.solution``) and returns g_η̂, or with ``track`` (the right-tail
    default) g_{η_k} with η_k the tail quantile of each rollout batch, the self-consistent
    threshold (TrackedCVaRPseudoReward); ``pseudo_reward_at(eta)`` builds g_η for any η.
    ``smoothing = τ`` applies only to the stage-2 pseudo-reward; stage 1 always solves the exact
    hinge dual.

    ``per_prompt=True`` (used by finetune with ``prompts=``): one threshold η*_p per prompt, each
    solved on that prompt's offline samples, instead of one η* over all prompts' pooled rewards;
    prompt p's micro-batches then use g_{η*_p}. Without prompts it changes nothing.
    """

    def __init__(self, reward: Reward, level: float, tail: str = "right", smoothing: float = 0.0,
                 track: bool | None = None, per_prompt: bool = False):
        if not callable(reward):
            raise ValueError(f"reward must be callable, got {type(reward).__name__}")
        self.reward = reward
        self.level = _check_level(level)
        self.tail = one_of(tail, "tail", _TAILS)
        self.smoothing = non_negative(smoothing, "smoothing")
        # Self-consistent threshold in stage 2 (TrackedCVaRPseudoReward: η = the tail quantile of
        # each rollout batch): on by default for the right tail, where the offline η̂ is biased
        # and a fixed threshold stalls or overshoots; the left tail converges with η̂ fixed.
        self.track = (self.tail == "right") if track is None else bool(track)
        if not isinstance(per_prompt, bool):
            raise ValueError(f"per_prompt must be True or False, got {per_prompt!r}")
        self.per_prompt = per_prompt
        self.solution: ThresholdSolution | None = None

    @property
    def name(self) -> str:
        return f"cvar_{self.tail}_{self.level:g}"

    def pseudo_reward(self, x_offline: Tensor | None, lam: float, cond: Any = None, *,
                      rewards: Tensor | None = None) -> CVaRPseudoReward:
        """Stage 1 on x_offline: (n, *dims) base samples; returns g_η*(r(x)) (stage 2).

        rewards: (n,) their rewards r(x_offline, cond), already computed (finetune draws and
        rewards the offline batch a micro-batch at a time); x_offline and cond are then unused.
        """
        lam = positive(lam, "lam")
        if rewards is not None:
            r = rewards
        elif x_offline is None:
            raise ValueError("pseudo_reward needs x_offline (n, *dims) base samples or rewards=(n,) their rewards")
        else:
            with torch.no_grad():
                r = _rewards_of(self.reward, x_offline, cond)
        self.solution = solve_threshold(r, self.level, lam, self.tail)
        if self.solution.n_beyond < _FEW_BEYOND and not self.track:
            s = self.solution
            warnings.warn(
                f"CVaR stage 1: only {s.n_beyond} of {s.n} offline rewards lie beyond the threshold "
                f"η̂ = {s.eta:.4g} ({s.tail} tail, β = {s.level:g}, λ = {s.lam:g}); η̂ rests on them and is "
                f"noisy and biased, and a threshold error δ changes the tilt's odds beyond it by "
                f"e^(δ/(βλ)) = e^(δ·{1 / (s.level * s.lam):.3g}). Raise n_offline"
                + (", or use track=True (the threshold re-estimated from the model's own rollouts)"
                   if s.tail == "right" else ""), stacklevel=2)
        if self.track:
            return TrackedCVaRPseudoReward(self.reward, self.solution.eta, self.level, self.tail, self.smoothing)
        return self.pseudo_reward_at(self.solution.eta)

    def pseudo_reward_at(self, eta: float) -> CVaRPseudoReward:
        """g_η(r(x)) for a given threshold η."""
        return CVaRPseudoReward(
            self.reward, finite(eta, "eta"), self.level, self.tail, self.smoothing
        )

    def value(self, x: Tensor, cond: Any = None) -> float:
        """Empirical CVaR_β of r over x: (batch, *dims) — mean of the top/bottom β fraction."""
        with torch.no_grad():
            r = _rewards_of(self.reward, x, cond)
        return cvar(r, self.level, self.tail)

    def __repr__(self) -> str:
        return (
            f"CVaR({self.reward!r}, level={self.level:g}, tail={self.tail!r}, "
            f"smoothing={self.smoothing:g}, track={self.track}"
            + (", per_prompt=True)" if self.per_prompt else ")")
        )
