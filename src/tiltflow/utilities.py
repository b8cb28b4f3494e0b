"""Utilities F(p) of a whole distribution, for Flow Density Control (methods/fdc.py).

FDC (De Santi et al., arXiv 2511.22640) maximises F(p) − λ·D(p‖p_pre) by a sequence of
exponential tilts, each with the *first variation* δF/δp at the current model p_k as its
reward. A utility is a small object with

    value(samples, model) -> float              F(p) estimated from samples (n, *dims) of p = model
    first_variation(x, model, samples) -> (batch,)
                                                δF/δp(p)(x), differentiable in x: (batch, *dims);
                                                `samples` are samples of p (None unless the
                                                utility sets needs_samples = True)

and two class attributes: ``needs_samples`` (does the first variation need samples of p_k?)
and ``curvature`` c, the weight of log p in its first variation (entropy: −log p, so c = 1;
0 for the others); FDC's default mirror step 1/(λ + c) is exact in one step for entropy with KL
and for every linear utility. Optionally ``step_schedule``: "harmonic" asks FDC for steps
γ_k ≤ γ/(k + 1) (a concave utility that is not smooth, the right-tail CVaR); absent, "constant".
First variations are defined up to an additive constant, which a tilt ignores; the constants
(e.g. the −1 of the entropy) are dropped.

| utility | F(p) | δF/δp(p)(x) |
|---|---|---|
| ExpectedRewardUtility | E_p r | r(x) |
| CVaRUtility | right: mean of the top β of r; left: of the bottom β | (r − η_p)₊/β or −(η_p − r)₊/β, η_p the β-tail quantile of r under p |
| MeanVariance | E_p r − κ·Var_p r | r(x) − κ·(r(x) − E_p r)² |
| Novelty | E_p[−log q_ref] (q_ref: Gaussian KDE of a reference set, or a log-density) | −log q_ref(x) |
| Entropy | H(p) = −E_p log p | −log p(x) (its gradient −∇log p from the model's velocity) |
| KernelDiversity | −E_{p⊗p} k(x, x'), k(x, x') = exp(−‖x − x'‖²/(2h²)) | −2·E_{x'~p} k(x, x') |
| ExperimentDesign | log det(E_p φφᵀ + εI) | φ(x)ᵀ (E_p φφᵀ + εI)⁻¹ φ(x) |

The CVaR first variation follows from the dual CVaR_β = min/max_η {...} and the envelope
theorem (η at its optimum for p, i.e. the quantile). MeanVariance: δ(E r)² /δp = 2·E_p r·r(x).
ExperimentDesign: δ log det M = tr(M⁻¹ δM) with δM/δp(x) = φ(x)φ(x)ᵀ (D-optimal design;
the non-centred moment matrix as in the memo). KernelDiversity is the density-free diversity
measure that needs only samples (an MMD-type quadratic functional, concave in p for a
positive-definite kernel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .metrics import cvar as empirical_cvar
from .objectives import CVaR, ExpectedReward, cvar_pseudo_reward
from .validation import finite, in_interval, non_negative, one_of, positive, positive_int

__all__ = [
    "CVaRUtility", "Entropy", "ExpectedRewardUtility", "ExperimentDesign", "KernelDiversity",
    "MeanVariance", "Novelty", "as_utility", "model_score", "value_with_grad",
]

Reward = Callable[..., Tensor]


# --------------------------------------------------------------------------- helpers


def _callable(f, name: str):
    if not callable(f):
        raise ValueError(f"{name} must be callable, got {type(f).__name__}")
    return f


def _rewards(reward: Reward, x: Tensor) -> Tensor:
    r = reward(x)
    if not isinstance(r, Tensor) or tuple(r.shape) != (x.shape[0],):
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"reward must return shape ({x.shape[0]},), got {shape}")
    return r


def _need_samples(samples, who: str) -> Tensor:
    if not isinstance(samples, Tensor) or samples.ndim < 2 or samples.shape[0] < 2:
        raise ValueError(f"{who}.first_variation needs samples (n >= 2, *dims) of the current model")
    return samples


class _ValueWithGrad(torch.autograd.Function):
    """y = value (batch,) with ∂y_i/∂x_i = grad_i: a first variation known by its gradient."""

    @staticmethod
    def forward(ctx, x, value, grad):
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, g_out):
        (grad,) = ctx.saved_tensors
        return g_out.reshape(-1, *([1] * (grad.ndim - 1))) * grad, None, None


def value_with_grad(x: Tensor, value: Tensor, grad: Tensor) -> Tensor:
    """A (batch,) tensor equal to `value` whose gradient with respect to x is `grad` (like x).

    For first variations whose gradient is cheap and whose value is not (−log p: the score
    comes from one velocity evaluation, log p needs an ODE). Adjoint Matching uses only ∇g.
    """
    return _ValueWithGrad.apply(x, value.detach().to(x.dtype), grad.detach().to(x.dtype))


@torch.no_grad()
def model_score(model, x: Tensor, eps: float = 0.02) -> Tensor:
    """∇_x log p_1(x) of a FlowModel, from its velocity at t = 1 − ε; x: (batch, *dims) -> like x.

    `model` may also be any object with a method score(x) (and no `path`), which is used as is.

    The score of p_t is s_t = −E[x0 | x_t]/β_t (paths.velocity_to_score); it is singular at
    t = 1, so it is read at t = 1 − ε, where p_t is the law of α_t X1 + β_t X0 and
    ∇log p_1(x) ≈ α_t·s_t(α_t x) (undoing the shrink by α_t; β_t² = ε² is the variance of the
    noise left, 4e-4 for ε = 0.02). The FDC authors' code reads the score the same way at
    ε = 0.005; we default to 0.02, the last interior time of a 50-step Adjoint Matching grid,
    because a fine-tuned velocity's error δv becomes a score error ≈ δv/ε. Measured: after one
    Adjoint Matching run (2-D Gaussian, 20 steps) the read-out is off by 300 % at ε = 0.02 (a
    time the run never trained) and within ~2-5 % at ε = 0.05-0.1, while an exact base is right
    to 0.1 %; after a short, unconverged run it is wrong at every ε. fdc therefore reads p_pre
    at the inner runs' last grid time and takes ∇log p_k from the gradient of the current model's
    ODE log-likelihood (methods/fdc.py, score_steps).
    """
    if not hasattr(model, "path") and hasattr(model, "score"):
        return model.score(x)      # a density known otherwise (fdc's tracked iterate)
    t = torch.tensor(1.0 - eps, dtype=x.dtype, device=x.device)
    a = model.path.alpha(t)
    y = a * x
    v = model.velocity(y, t)
    return a * model.path.velocity_to_score(v, y, t)


# --------------------------------------------------------------------------- linear utilities


class ExpectedRewardUtility:
    """F(p) = E_p r; δF/δp = r. FDC with it is plain Adjoint Matching (one outer iteration)."""

    needs_samples = False
    curvature = 0.0

    def __init__(self, reward: Reward):
        self.reward = _callable(reward, "reward")

    def value(self, samples: Tensor, model=None) -> float:
        with torch.no_grad():
            return float(_rewards(self.reward, samples).double().mean())

    def first_variation(self, x: Tensor, model=None, samples=None) -> Tensor:
        return _rewards(self.reward, x)

    def __repr__(self) -> str:
        return f"ExpectedRewardUtility({self.reward!r})"


class Novelty:
    """F(p) = E_p[−log q_ref(x)]: mass where the reference is unlikely (novelty-seeking).

    reference: samples (m, *dims) of a reference set, smoothed into a Gaussian kernel density
    with bandwidth h (q_ref(x) = mean_j N(x; y_j, h²I)), or a callable log q_ref(x) -> (batch,).
    F is linear in p, so FDC needs one outer iteration (at the default step); the KL to the
    pretrained model keeps the result a reweighting of what the model can generate. For
    novelty in the reward's upper tail (the paper's superquantile) use CVaRUtility(tail="right").
    """

    needs_samples = False
    curvature = 0.0

    def __init__(self, reference, bandwidth: float = 0.3):
        self.bandwidth = positive(bandwidth, "bandwidth")
        if isinstance(reference, Tensor):
            if reference.ndim < 2 or reference.shape[0] < 1 or not torch.isfinite(reference).all():
                raise ValueError("reference must be finite samples (m, *dims) or a log-density callable")
            self.reference, self.log_density = reference.detach().reshape(reference.shape[0], -1), None
        else:
            self.reference, self.log_density = None, _callable(reference, "reference")

    def log_q(self, x: Tensor) -> Tensor:
        """log q_ref(x): (batch,)."""
        if self.log_density is not None:
            return _rewards(self.log_density, x)
        xf = x.reshape(x.shape[0], -1)
        y = self.reference.to(xf)
        d2 = torch.cdist(xf, y).pow(2)
        h2, d = self.bandwidth**2, xf.shape[1]
        return (torch.logsumexp(-d2 / (2 * h2), dim=1) - math.log(y.shape[0])
                - 0.5 * d * math.log(2 * math.pi * h2))

    def value(self, samples: Tensor, model=None) -> float:
        with torch.no_grad():
            return float(-self.log_q(samples).double().mean())

    def first_variation(self, x: Tensor, model=None, samples=None) -> Tensor:
        return -self.log_q(x)

    def __repr__(self) -> str:
        ref = f"{self.reference.shape[0]} points" if self.reference is not None else repr(self.log_density)
        return f"Novelty({ref}, bandwidth={self.bandwidth:g})"


# --------------------------------------------------------------------------- risk


class CVaRUtility:
    """CVaR_β of the reward under p (β = level, tail mass); right: novelty / superquantile,
    left: risk-averse. δF/δp(x) = (r − η_p)₊/β (right) or −(η_p − r)₊/β (left), η_p the
    (1 − β)- or β-quantile of r under p (samples of p_k). Compare the one-shot TFFT
    (objectives.CVaR), which finds the optimal η of max CVaR − λKL from the base alone.
    smoothing τ > 0: softplus hinge (objectives.cvar_pseudo_reward).
    """

    needs_samples = True
    curvature = 0.0

    def __init__(self, reward: Reward, level: float = 0.1, tail: str = "right", smoothing: float = 0.0):
        self.reward = _callable(reward, "reward")
        self.level = in_interval(level, "level", 0.0, 1.0)   # β, the tail mass: (0, 1]
        self.tail = one_of(tail, "tail", ("right", "left"))
        self.smoothing = non_negative(smoothing, "smoothing")

    def value(self, samples: Tensor, model=None) -> float:
        with torch.no_grad():
            return empirical_cvar(_rewards(self.reward, samples).double(), self.level, self.tail)

    def quantile(self, samples: Tensor) -> float:
        """η_p: the threshold of the tail, from samples of p."""
        with torch.no_grad():
            r = _rewards(self.reward, samples).double()
        return float(torch.quantile(r, 1.0 - self.level if self.tail == "right" else self.level))

    def first_variation(self, x: Tensor, model=None, samples=None) -> Tensor:
        eta = self.quantile(_need_samples(samples, "CVaRUtility"))
        return cvar_pseudo_reward(_rewards(self.reward, x), eta, self.level, self.tail, self.smoothing)

    @property
    def step_schedule(self) -> str:
        """FDC's mirror steps: "harmonic" (γ_k ≤ γ/(k + 1)) for the right tail, "constant" for the left.

        Right-CVaR is concave in p but piecewise linear: at the full step γ = 1/λ the iterate is
        p_{k+1} = p_pre·exp(g_{η_k}/λ), η_k = Q_{1−β}(p_k), and the threshold map η ↦ Q_{1−β}(p_η)
        is decreasing and steeper than −1 at η*, so the iterates cycle between two tilts on either
        side of the optimum (exact mirror steps by quadrature on N(0, 1), r = x, β = ½, λ = 1: slope −3.3,
        F − λKL 0.99 in both tilts, optimum 1.52; the objective does not fall, so backtracking
        cannot see it). With γ_k = 1/(λ(k + 1)), log p_K − log p_pre is the average of the tilts
        g_{η_j}/λ, j < K: subgradient mirror descent on a λ-strongly concave objective, which
        converges (1.50 after three steps). Left-CVaR is convex in p: its linearisation is a lower
        bound, the full step is a minorise-maximise step that never lowers F − λKL, and constant
        steps are kept.
        """
        return "harmonic" if self.tail == "right" else "constant"

    def __repr__(self) -> str:
        return f"CVaRUtility({self.reward!r}, level={self.level:g}, tail={self.tail!r})"


class MeanVariance:
    """F(p) = E_p r − κ·Var_p r; δF/δp(x) = r(x) − κ·(r(x) − E_p r)² (κ > 0: risk-averse)."""

    needs_samples = True
    curvature = 0.0

    def __init__(self, reward: Reward, kappa: float = 1.0):
        self.reward = _callable(reward, "reward")
        self.kappa = finite(kappa, "kappa")

    def value(self, samples: Tensor, model=None) -> float:
        with torch.no_grad():
            r = _rewards(self.reward, samples).double()
        return float(r.mean() - self.kappa * r.var(unbiased=False))

    def first_variation(self, x: Tensor, model=None, samples=None) -> Tensor:
        with torch.no_grad():
            m = _rewards(self.reward, _need_samples(samples, "MeanVariance")).mean()
        r = _rewards(self.reward, x)
        return r - self.kappa * (r - m) ** 2

    def __repr__(self) -> str:
        return f"MeanVariance({self.reward!r}, kappa={self.kappa:g})"


# --------------------------------------------------------------------------- diversity


class Entropy:
    """Differential entropy H(p) = −E_p log p; δH/δp(x) = −log p(x) (− 1, dropped).

    The first variation is handed over by its gradient −∇log p_k(x) (``model_score``: fdc hands
    in the current model's density, whose score is the gradient of its ODE log-likelihood); its
    value is reported as 0 (Adjoint Matching uses only the gradient; a divergence that needs
    log p_k − log p_pre, Rényi, reads it from the models, never from these values). ``value`` estimates H from the model's
    ``log_prob`` (exact divergence up to 16 dimensions, Hutchinson above), `steps` Heun steps.
    With KL(p‖p_pre) the optimum is p ∝ p_pre^{λ/(1+λ)}; the default step 1/(1 + λ) reaches it
    in one outer iteration.
    """

    needs_samples = False
    curvature = 1.0

    def __init__(self, eps: float = 0.02, steps: int = 50):
        self.eps = in_interval(eps, "eps", 0.0, 0.5, hi_open=True)
        self.steps = positive_int(steps, "steps")

    def value(self, samples: Tensor, model) -> float:
        return float(-model.log_prob(samples, steps=self.steps).double().mean())

    def first_variation(self, x: Tensor, model, samples=None) -> Tensor:
        s = model_score(model, x.detach(), self.eps)
        return value_with_grad(x, torch.zeros(x.shape[0], device=x.device), -s)

    def __repr__(self) -> str:
        return f"Entropy(eps={self.eps:g})"


class KernelDiversity:
    """F(p) = −E_{x,x'~p} k(x, x'), Gaussian kernel of bandwidth h: high when samples are far
    apart. δF/δp(x) = −2·E_{x'~p} k(x, x'), estimated on samples of p_k. Needs no density."""

    needs_samples = True
    curvature = 0.0

    def __init__(self, bandwidth: float = 0.5):
        self.bandwidth = positive(bandwidth, "bandwidth")

    def _k(self, x: Tensor, y: Tensor) -> Tensor:
        d2 = torch.cdist(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1).to(x)).pow(2)
        return torch.exp(-d2 / (2 * self.bandwidth**2))

    def value(self, samples: Tensor, model=None) -> float:
        with torch.no_grad():
            k = self._k(samples, samples)
            n = samples.shape[0]
            return float(-(k.sum() - k.diagonal().sum()) / (n * (n - 1)))

    def first_variation(self, x: Tensor, model=None, samples=None) -> Tensor:
        return -2.0 * self._k(x, _need_samples(samples, "KernelDiversity").detach()).mean(1)

    def __repr__(self) -> str:
        return f"KernelDiversity(bandwidth={self.bandwidth:g})"


# --------------------------------------------------------------------------- experiment design


class ExperimentDesign:
    """D-optimal design: F(p) = log det M(p), M(p) = E_p φ(x)φ(x)ᵀ + εI;
    δF/δp(x) = φ(x)ᵀ M(p_k)⁻¹ φ(x). φ: callable (batch, *dims) -> (batch, m), identity if None.

    For φ = identity on Gaussian-tailed data the tilt exp(xᵀM⁻¹x/λ) is normalisable only if
    M⁻¹/λ is below half the base's precision: take λ large enough (or bounded features).
    """

    needs_samples = True
    curvature = 0.0

    def __init__(self, features: Callable | None = None, reg: float = 1e-3):
        self.features = None if features is None else _callable(features, "features")
        self.reg = non_negative(reg, "reg")

    def phi(self, x: Tensor) -> Tensor:
        f = x.reshape(x.shape[0], -1) if self.features is None else self.features(x)
        if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"features must return shape (batch, m), got "
                             f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
        return f

    def moment(self, samples: Tensor) -> Tensor:
        """M = E φφᵀ + εI over samples, float64: (m, m)."""
        with torch.no_grad():
            f = self.phi(samples).double()
        return f.T @ f / f.shape[0] + self.reg * torch.eye(f.shape[1], dtype=torch.float64, device=f.device)

    def value(self, samples: Tensor, model=None) -> float:
        return float(torch.linalg.slogdet(self.moment(samples))[1])

    def first_variation(self, x: Tensor, model=None, samples=None) -> Tensor:
        m_inv = torch.linalg.inv(self.moment(_need_samples(samples, "ExperimentDesign")))
        f = self.phi(x)
        return ((f @ m_inv.to(f)) * f).sum(1)

    def __repr__(self) -> str:
        return f"ExperimentDesign(features={self.features!r}, reg={self.reg:g})"


# --------------------------------------------------------------------------- conversion


def as_utility(obj: Any):
    """A utility for FDC: utilities pass through; objectives.ExpectedReward / objectives.CVaR
    become ExpectedRewardUtility / CVaRUtility; a plain reward callable becomes
    ExpectedRewardUtility. Raises ValueError for anything else."""
    if hasattr(obj, "first_variation") and hasattr(obj, "value"):
        return obj
    if isinstance(obj, ExpectedReward):
        return ExpectedRewardUtility(obj.reward)
    if isinstance(obj, CVaR):
        return CVaRUtility(obj.reward, obj.level, obj.tail, obj.smoothing)
    if callable(obj):
        return ExpectedRewardUtility(obj)
    raise ValueError(f"utility must have value() and first_variation() (see tiltflow.utilities), "
                     f"or be an objective or reward callable; got {type(obj).__name__}")
