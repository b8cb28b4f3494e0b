"""fdc: Flow Density Control — maximise F(p) − λ·D(p‖p_pre) by a sequence of tilts.

De Santi et al., "Flow Density Control" (NeurIPS 2025, arXiv 2511.22640). F is a utility of
the whole distribution (utilities.py), D a divergence to the pretrained model p_pre
(divergences.py). With G(p) = F(p) − λ·D(p‖p_pre), FDC runs mirror descent in the space of
densities with the KL geometry: outer iteration k solves

    p_{k+1} = argmax_p ⟨δG/δp(p_k), p⟩ − (1/γ)·KL(p‖p_k)  ⇔  p_{k+1} ∝ p_k · exp(γ·g_k),
    g_k(x) = δF/δp(p_k)(x) − λ·δD/δp(p_k‖p_pre)(x),

i.e. ONE Adjoint Matching run (methods/finetune.py) whose base is the current model p_k, whose
reward is g_k and whose KL weight is 1/γ. A fixed point has δG/δp(p*) = const on the support,
the first-order condition of the regularised problem, so the iteration stops exactly at the
regularised optimum (for concave G it is the maximiser; convergence by mirror-flow arguments
in the paper). The authors' code does the same: reference of each Adjoint Matching run = the
previous iterate, reward gradient γ·∇g_k, KL weight 1 (research memo §3).

Closed loop. g_k is the first variation at the model the last inner run actually produced:
utility statistics (means, quantiles, moments, the Rényi normaliser) from its own samples, ∇log p_k
(entropy, KL, Rényi) from its own ODE log-likelihood, log p_k − log p_pre (Rényi weights) from
both models' log_prob. So an inner run that fell short is corrected by the next step, and one
reward gradient costs the same at every k: measured (entropy + KL, 2-D) 21 base-network calls
from k = 1 on (2·score_steps for ∇log p_k, memoised between utility and divergence, + 1 for
p_pre; 3 with the velocity read-out, score_steps = 0); Rényi adds both models' log_prob
(4·Renyi.steps calls). The open loop (density="tilts": log p_k tracked as log p_pre + Σ γ_j g_j)
is kept for comparison; each level is memoised, so its cost is linear in k (1, 3, 4, 5, 6
calls at k = 0..4; it was 1, 5, 15, 45, 135).

The step. With D = KL, p_{k+1} ∝ p_k^{1−γλ}·p_pre^{γλ}·exp(γ·δF(p_k)): γ = 1/λ replaces p_k
by p_pre and makes one outer iteration on a linear F (expected reward) exactly the plain
KL-regularised fine-tuning; for entropy (δH = −log p) γ = 1/(1 + λ) gives p_pre^{λ/(1+λ)},
the exact optimum, in one step. The default γ = 1/(λ + c), c = ``utility.curvature`` (1 for
entropy, 0 otherwise), is this full (Picard) step: exact in one step for these cases, and in
the closed loop it re-aims at the optimum from wherever the last run ended. The authors' code
uses a small constant γ = 0.1 (research memo §3), which needs ~10× the outer steps for the
same cases. Where the full step overshoots (nonlinear F, Rényi, OT), a safeguard: each outer
step is evaluated (F, D, F − λD on fixed-noise samples) and a step that lowers F − λD by more
than ``tol`` is retried from p_k with γ/2, up to ``backtrack`` times, then rejected (p_{k+1} =
p_k); the halved γ is kept. Pass ``step`` for smaller steps from the start (for a Gaussian
the precision error contracts by |1 − γ(1 + λ)| per step under entropy).

Step schedule. A concave utility that is not smooth (the right-tail CVaR, whose first variation
jumps with the quantile of p_k) makes constant steps cycle around the optimum without lowering
F − λD, which backtracking cannot see (utilities.CVaRUtility.step_schedule). ``step_schedule=
"harmonic"`` (the default for a utility whose ``step_schedule`` asks for it) caps step k at
γ/(k + 1), the step of subgradient mirror descent on a λ-strongly concave objective: with
γ = 1/λ, log p_K − log p_pre is the average of the tilts g_j/λ. Backtracking halves below the cap.

At k = 0 the model is p_pre itself, where every divergence is stationary (its first variation
is constant), so the divergence term is skipped there; it is evaluated from k = 1 on.

Run folder (``out``): config.json, log.jsonl (one record per outer iteration k = 0..K: utility
value F, divergence D, objective F − λD, KL(p_k‖p_pre) by log-likelihoods, times, γ, whether
the step was accepted and the (γ, F − λD) of every try), metrics.json, model.safetensors (the
last iterate) and one finetune run folder per outer iteration, outer_01/ … outer_K/ (retries
at half steps in outer_KK_try1/, …; outer_KK/model.safetensors is the iterate kept).
``resume=True`` continues from the last finished outer iteration (and inside an unfinished one
from its newest checkpoint).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint as ckpt
from .. import distributed as dist
from ..divergences import KL, log_ratio
from ..models.flow_model import FlowModel
from ..tracking import REPORT_TO, Tracker, get_logger, tracked
from ..utilities import as_utility, model_score
from ..validation import one_of
from .. import validation as val
from .finetune import _OPTIONAL_KEYS, FinetuneConfig, _validate as _validate_inner, finetune, resolve_init

__all__ = ["FDCConfig", "fdc"]

EVAL_SEED_OFFSET = 1000   # evaluation samples: the same noise at every k (less noise in F_k − F_{k−1})
REF_SEED_OFFSET = 2000    # samples of p_pre for divergences that need them (OT)
SCHEDULES = ("constant", "harmonic")


@dataclass
class FDCConfig:
    """Outer-loop settings of Flow Density Control (inner settings: FinetuneConfig)."""
    lam: float = 1.0              # divergence weight λ in F(p) − λ·D(p‖p_pre)
    iters_outer: int = 3          # K: outer (mirror-descent) iterations, one Adjoint Matching run each
    step: float | None = None     # mirror step γ (inner KL weight 1/γ); None: 1/(λ + utility.curvature)
    n_eval: int = 1000            # ODE samples per outer iteration for the logged utility value
    eval_steps: int = 50          # ODE steps of those samples and of the log-likelihoods
    n_kl: int = 300               # samples for D and KL(p_k‖p_pre) by log-likelihoods; 0 skips them
    density: str = "model"        # p_k in first variations: "model" (the current model: closed loop) or "tilts"
    score_eps: float | None = None  # scores are read at t = 1 − score_eps; None: the inner runs' last grid time
    score_steps: int = 10         # density="model": ∇log p_k by its ODE log-likelihood (steps); 0: velocity read-out
    backtrack: int = 2            # halvings of γ tried when a step lowers F − λD by more than tol; 0: accept all
    tol: float = 0.02             # Monte Carlo slack of that test (the objective is estimated on n_kl samples)
    step_schedule: str = "auto"   # "constant", "harmonic" (step k ≤ γ/(k + 1)) or "auto": the utility's choice

    def __post_init__(self):
        _validate(self)


def _validate(cfg: FDCConfig):
    val.non_negative(cfg.lam, "lam")
    val.positive_int(cfg.iters_outer, "iters_outer")
    val.optional(val.positive, cfg.step, "step")
    for name in ("n_eval", "eval_steps"):
        val.positive_int(getattr(cfg, name), name, minimum=2)
    val.one_of(cfg.density, "density", ("tilts", "model"))
    val.one_of(cfg.step_schedule, "step_schedule", ("auto",) + SCHEDULES)
    val.optional(val.in_interval, cfg.score_eps, "score_eps", 0.0, 0.5, True, True)
    val.positive_int(cfg.score_steps, "score_steps (0: velocity read-out)", minimum=0)
    val.positive_int(cfg.backtrack, "backtrack", minimum=0)
    val.non_negative(cfg.tol, "tol")
    if val.positive_int(cfg.n_kl, "n_kl", minimum=0) == 1:
        raise ValueError(f"n_kl must be 0 (skip) or an integer >= 2, got {cfg.n_kl!r}")


def _checked(values, x: torch.Tensor, who: str) -> torch.Tensor:
    """A first variation's output, checked: (batch,) and finite, else ValueError naming `who`."""
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (x.shape[0],):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{who} must return one value per sample, shape ({x.shape[0]},); got {shape}")
    bad = int((~torch.isfinite(values.detach())).sum())
    if bad:
        raise ValueError(f"{who} returned {bad} NaN or inf values out of {x.shape[0]}; "
                         "check the utility (and the scale of the model's samples)")
    return values


def _memoised(memo: dict, kind: str, x: torch.Tensor, fn):
    """fn(x), remembered for the last x per kind: the utility and the divergence of one g_k
    (and every level of the open loop) ask for the same score at the same points."""
    key = (x.data_ptr(), tuple(x.shape), x.dtype, x._version)
    hit = memo.get(kind)
    if hit is not None and hit[0] == key:
        return hit[2]
    val = fn(x)
    memo[kind] = (key, x, val)     # x kept alive: its storage cannot be reused under the key
    return val


class _ModelDensity:
    """p_k in first variations, closed loop: the current model itself (the linearisation is at
    the iterate the last inner run actually produced, so a run that fell short of its tilt is
    corrected by the next one).

    score(x): ∇log p_k(x). score_steps > 0: the gradient of the model's own ODE log-likelihood
    (FlowModel.log_prob(..., create_graph=True), 2·score_steps velocity calls and their derivatives
    per call, whatever k);
    score_steps = 0: the velocity read-out at t = 1 − eps (utilities.model_score, one call).
    The read-out is right only for a well-trained model: after one full Adjoint Matching run
    (2-D Gaussian, 20 steps, 150 iterations) it was within 2 % at t = 0.95, the last trained
    grid time (300 % off at the untrained t = 0.98), but after a 30-iteration run it read a
    density the model did not have and the next outer step undid the first (variance 0.76 →
    0.50, target 1.0); the ODE gradient is the density of the samples actually drawn.
    log_ratio(x, steps): log p_k − log p_pre by both models' log_prob (values, for Rényi).
    """

    def __init__(self, model: FlowModel, reference: FlowModel, eps: float, score_steps: int = 0):
        self.model, self.reference, self.eps, self.score_steps = model, reference, eps, score_steps
        self._memo = {}

    def score(self, x: torch.Tensor) -> torch.Tensor:
        if self.score_steps == 0 or self.model is self.reference:
            return model_score(self.model, x, self.eps)

        def compute(x):
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.model.log_prob(xx, steps=self.score_steps, create_graph=True).sum(), xx)
            return grad.detach()
        return _memoised(self._memo, "score", x.detach(), compute)

    @torch.no_grad()
    def log_ratio(self, x: torch.Tensor, steps: int = 50) -> torch.Tensor:
        if self.model is self.reference:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self.model.log_prob(x, steps=steps) - self.reference.log_prob(x, steps=steps)


class _TiltedDensity:
    """Open loop: the iterate as the mirror steps intend it, log p_k = log p_pre + Σ_{j<k} γ_j g_j.

    Exact only when every inner run reaches its tilt (a shortfall is never corrected); kept
    for comparison. Built step by step, p_{k+1} = (p_k, γ_k, g_k): score(x) = score_k(x) +
    γ_k ∇g_k(x), log_ratio(x) = log_ratio_k(x) + γ_k g_k(x). g_k reads p_k itself, so each
    level memoises its last result per input tensor: one call evaluates every g_j once, O(k).
    """

    def __init__(self, reference, prev: "_TiltedDensity | None" = None, gamma: float = 0.0, g=None):
        self.reference, self.prev, self.gamma, self.g = reference, prev, gamma, g
        self._memo = {}

    def score(self, x: torch.Tensor) -> torch.Tensor:
        if self.prev is None:
            return self.reference.score(x)

        def compute(x):
            with torch.enable_grad():
                xx = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.g(xx).sum(), xx)
            return self.prev.score(x) + self.gamma * grad
        return _memoised(self._memo, "score", x.detach(), compute)

    def log_ratio(self, x: torch.Tensor, steps: int = 50) -> torch.Tensor:
        if self.prev is None:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return _memoised(self._memo, "log_ratio", x.detach(),
                            lambda x: self.prev.log_ratio(x) + self.gamma * self.g(x).detach())


def _linearisation(utility, divergence, lam: float, density, reference, samples, reference_samples,
                   k: int, prior: FlowModel):
    """g_k(x) = δF/δp(p_k)(x) − λ·δD/δp(p_k‖p_pre)(x), checked; `density` / `reference` stand
    for p_k / p_pre in first variations, `samples` are samples of the current model p_k (or
    None); `prior` draws the probe points."""
    use_div = lam > 0 and k > 0
    who_u, who_d = f"{utility!r}.first_variation", f"{divergence!r}.first_variation"

    def g(x, cond=None):
        val = _checked(utility.first_variation(x, density, samples), x, who_u)
        if use_div:
            dv = _checked(divergence.first_variation(x, density, reference, samples, reference_samples), x, who_d)
            val = val - lam * dv
        return val

    # Probe on a few prior draws, so that a broken utility fails before any training.
    gen = torch.Generator(device=prior.device).manual_seed(0)
    probe = prior.prior(4, gen).requires_grad_(True)
    (grad,) = torch.autograd.grad(g(probe).sum(), probe, allow_unused=True)
    if grad is None:
        raise ValueError(f"{who_u} is not differentiable in x; FDC needs its gradient")
    if not torch.isfinite(grad).all():
        raise ValueError(f"the gradient of {who_u} (− λ·{who_d}) has NaN or inf entries")
    g.description = f"FDC step {k + 1}: δF/δp of {utility!r}" + (
        f" − {lam:g}·δD/δp of {divergence!r}" if use_div else "")
    return g


class _Fixed:
    """A finetune objective whose pseudo-reward is the prebuilt g_k."""

    needs_offline = False

    def __init__(self, g):
        self.g = g

    def pseudo_reward(self, x_offline, lam, cond=None):
        if cond is not None:
            raise ValueError("fdc does not support conditional models (cond)")
        return self.g

    def __repr__(self) -> str:
        return self.g.description


def _evaluate(model: FlowModel, reference: FlowModel, utility, divergence, lam: float,
              cfg: FDCConfig, seed: int, reference_samples, is_reference: bool) -> dict:
    """F, D, F − λD and KL(p‖p_pre) of `model` on fresh ODE samples (the same seed every k)."""
    t0 = time.perf_counter()
    x = model.sample(cfg.n_eval, steps=cfg.eval_steps, seed=seed + EVAL_SEED_OFFSET)
    rec = {"utility": float(utility.value(x, model))}
    if cfg.n_kl > 0:
        xk = x[: cfg.n_kl]
        if is_reference:
            kl = d = 0.0
        else:
            kl = float(log_ratio(model, reference, xk, cfg.eval_steps).double().mean())
            d = kl if isinstance(divergence, KL) else float(divergence.value(xk, model, reference, reference_samples))
        rec.update(divergence=d, objective=rec["utility"] - lam * d, kl=kl)
    rec["time_eval"] = time.perf_counter() - t0
    return rec


def _load_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break          # a half-written last line of a killed run
    return out


def fdc(model: FlowModel, utility, divergence=None, lam: float = 1.0, iters_outer: int = 3, *,
        step: float | None = None, n_eval: int = 1000, eval_steps: int = 50, n_kl: int = 300,
        density: str = "model", score_eps: float | None = None, score_steps: int = 10, backtrack: int = 2,
        tol: float = 0.02, step_schedule: str = "auto",
        out=None, resume: bool = False, progress: bool = True, callback: Callable | None = None,
        report_to: str = "none", config: FDCConfig | None = None, inner_config: FinetuneConfig | None = None,
        **kwargs) -> FlowModel:
    """Flow Density Control: fine-tune `model` toward argmax_p F(p) − λ·D(p‖p_model).

    utility: a utility (tiltflow.utilities), an objective (ExpectedReward, CVaR) or a reward.
    divergence: KL() (default), Renyi(alpha) or OT(p).
    step: mirror step γ; None picks 1/(λ + utility.curvature) (module docstring).
    density: what stands for p_k inside first variations that need its density (entropy, KL,
    Rényi): "model" (default, closed loop) is the current model, its score read from its
    velocity at t = 1 − score_eps and its log-ratio to p_pre (Rényi) from both models' log_prob;
    "tilts" (open loop, for comparison) tracks log p_k = log p_pre + Σ_{j<k} γ_j g_j, exact only
    if every inner run reaches its tilt. Utility statistics (means, quantiles, moments) always
    come from samples of the current model.
    score_eps: None reads scores at the last interior time of the inner runs' grid (p_pre's, and
    p_k's when score_steps = 0). score_steps: ∇log p_k by the gradient of its ODE log-likelihood
    with this many Heun steps (default 10; cost independent of k); 0 reads it from the velocity.
    backtrack / tol: a step whose F − λD falls by more than tol below the previous iterate's is
    retried from p_k with γ/2, up to `backtrack` times, then rejected (p_{k+1} = p_k); the
    halved γ is kept for the later steps. Needs n_kl > 0 (without D there is no objective).
    step_schedule: "constant", "harmonic" (step k at most γ/(k + 1)) or "auto" (default): the
    utility's ``step_schedule`` attribute, "harmonic" for the right-tail CVaR (module docstring).
    kwargs: FinetuneConfig fields of every inner Adjoint Matching run (iters, batch_size, steps,
    lr, init, seed, ...); outer iteration k uses seed + k. config: an FDCConfig instead of the
    outer arguments (lam, iters_outer, step, ...); inner_config: a FinetuneConfig of the inner
    runs (its lam is unused), which kwargs override.
    out / resume: run folder and continuation (module docstring). callback(k, record) after
    each outer iteration's evaluation. report_to: "none", "tensorboard" or "wandb": each outer
    iteration's record (the log.jsonl line) is also sent there, at step k, by rank 0 (tracking.Tracker;
    the inner runs are not tracked); or an open Tracker, which fdc logs to and leaves open.
    Returns the last iterate p_K (the input is untouched).
    """
    if not isinstance(model, FlowModel):
        raise ValueError(f"model must be a tiltflow FlowModel, got {type(model).__name__}")
    utility = as_utility(utility)
    divergence = KL() if divergence is None else divergence
    if not (hasattr(divergence, "first_variation") and hasattr(divergence, "value")):
        raise ValueError(f"divergence must be KL(), Renyi(alpha) or OT(p) (value and first_variation), "
                         f"got {type(divergence).__name__}")
    given = dict(lam=lam, iters_outer=iters_outer, step=step, n_eval=n_eval, eval_steps=eval_steps, n_kl=n_kl,
                 density=density, score_eps=score_eps, score_steps=score_steps, backtrack=backtrack, tol=tol,
                 step_schedule=step_schedule)
    if config is None:
        cfg = FDCConfig(**given)
    elif not isinstance(config, FDCConfig):
        raise ValueError(f"config must be an FDCConfig, got {type(config).__name__}")
    else:   # the config's outer settings; an argument also set away from its default would be ambiguous
        clash = [k for k, v in given.items() if v != FDCConfig.__dataclass_fields__[k].default
                 and v != getattr(config, k)]
        if clash:
            raise ValueError(f"fdc: {clash} set both in config and as arguments; set them in one place")
        cfg = config
    if isinstance(inner_config, FinetuneConfig):      # inner settings as an object; kwargs override it
        kwargs = {**{k: v for k, v in asdict(inner_config).items() if k != "lam"}, **kwargs}
    elif inner_config is not None:
        raise ValueError(f"inner_config must be a FinetuneConfig, got {type(inner_config).__name__}")
    if not isinstance(report_to, Tracker):
        one_of(report_to, "report_to", REPORT_TO)
    if cfg.density == "tilts" and float(getattr(utility, "curvature", 0.0)) > 0 and getattr(
            divergence, "needs_samples", False) and cfg.lam > 0:
        raise ValueError(f"density='tilts' cannot give {divergence!r} the log-ratio of an iterate tilted by "
                         f"{utility!r} (its first variation is known by its gradient only): use density='model'")
    inner_fields = set(FinetuneConfig.__dataclass_fields__) - {"lam"}
    unknown = set(kwargs) - inner_fields
    if unknown:
        raise ValueError(f"unknown fdc options {sorted(unknown)}; valid inner options: {sorted(inner_fields)}")
    inner = FinetuneConfig(**kwargs)
    _validate_inner(inner)
    if inner.lora_rank is not None:
        raise ValueError("fdc does not take lora_rank yet (each outer round copies the previous model); "
                         "train a LoRA with finetune(..., lora_rank=) instead")
    curvature = float(getattr(utility, "curvature", 0.0))
    if cfg.step is None and cfg.lam + curvature <= 0:
        raise ValueError("with lam = 0 and a utility of curvature 0 there is no default step: pass step=γ > 0")
    gamma = cfg.step if cfg.step is not None else 1.0 / (cfg.lam + curvature)
    schedule = cfg.step_schedule if cfg.step_schedule != "auto" else getattr(utility, "step_schedule", "constant")
    one_of(schedule, f"{utility!r}.step_schedule", SCHEDULES)
    seed = inner.seed
    if cfg.score_eps is not None:
        eps = float(cfg.score_eps)
    else:   # the last interior time of the inner runs' grid, the latest time they train
        eps = float(1.0 - model.time_grid(inner.steps, inner.grid)[-2].item())

    device = dist.device(inner.device, model)
    inner.device = dist.device_name(device)   # the inner runs and the run folder use the resolved device
    reference = model.copy().to(device).eval()
    reference.requires_grad_(False)
    # The inner runs warm-start from p_k: the first one builds the trainable model the way
    # finetune would; later ones train a copy of p_k with the same parameters trainable.
    init0 = resolve_init(inner.init, model)      # as finetune resolves "auto"
    trainable_later = (lambda n, p: n.startswith("net.residual.")) if init0 == "residual" else None
    ref_samples = None
    if cfg.lam > 0 and getattr(divergence, "needs_reference_samples", False):
        ref_samples = reference.sample(inner.n_offline, steps=inner.steps, sde=True,
                                       seed=seed + REF_SEED_OFFSET)

    inner_record = {k: v for k, v in asdict(inner).items() if not (k in _OPTIONAL_KEYS and v == _OPTIONAL_KEYS[k])}
    # the resolved schedule is recorded only when it is not constant, so earlier run folders still resume
    config_record = {**{k: v for k, v in asdict(cfg).items() if k != "step_schedule"},
                     **({"step_schedule": schedule} if schedule != "constant" else {}),
                     "gamma": gamma, "inner": inner_record, "utility": repr(utility),
                     "divergence": repr(divergence), "base": reference.config()}
    run = None
    current, start, records = reference, 0, []
    dist.setup()
    main = dist.is_main()   # under torchrun: every process runs the loop, rank 0 alone writes
    progress = progress and main
    if out is not None:
        run = Path(out)
        if main:
            ckpt.prepare_run(out, config_record, resume, resumable_keys=("iters_outer",))
        if resume:
            logged = _load_log(run / "log.jsonl")
            done = {r.get("outer") for r in logged}
            for k in range(1, cfg.iters_outer + 1):   # an outer step is done once its decision is logged
                if k in done and (run / f"outer_{k:02d}" / "model.safetensors").is_file():
                    start = k
            records = [r for r in logged if r.get("outer", 1e9) <= start]
        if main:
            ckpt.atomic_write_text(run / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    # the logger is fetched at run time, so its default handler follows the user's logging setup then
    logger = get_logger("fdc")
    if progress:
        logger.info(f"tiltflow fdc: {config_record['utility']} − {cfg.lam:g}·{config_record['divergence']}  "
                    + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()) + f" gamma={gamma:.4g}  inner: "
                    + " ".join(f"{k}={v}" for k, v in asdict(inner).items()))

    def evaluate(model_k: FlowModel) -> dict:
        return _evaluate(model_k, reference, utility, divergence, cfg.lam, cfg, seed, ref_samples,
                         is_reference=model_k is reference)

    def log(k: int, rec: dict):
        rec = {"outer": k, **rec}
        records.append(rec)
        if run is not None and main:
            ckpt.append_jsonl(run / "log.jsonl", rec)
        tracker.log(rec, step=k)
        if progress:
            shown = " ".join(f"{key}={rec[key]:.4g}" for key in ("utility", "divergence", "objective", "kl", "gamma")
                             if rec.get(key) is not None)
            logger.info(f"fdc outer {k}/{cfg.iters_outer}: {shown}"
                        + ("" if rec.get("accepted", True) else " (rejected)"))
        if callback is not None:
            callback(k, rec)

    reference_density = _ModelDensity(reference, reference, eps)
    tilted = _TiltedDensity(reference_density)   # density="tilts": p_pre tilted by the accepted steps

    def linearise(k: int, model_k: FlowModel):
        # Samples of p_k drawn as finetune would draw its offline batch (seed + k), so that a
        # resumed run rebuilds exactly the same g_k.
        needs = utility.needs_samples or (cfg.lam > 0 and k > 0 and getattr(divergence, "needs_samples", False))
        samples = None
        if needs:
            gen = torch.Generator(device=device).manual_seed(seed + k)
            samples = model_k.sample(inner.n_offline, steps=inner.steps, sde=True, generator=gen)
        if cfg.density == "tilts":
            density_k = tilted
        else:
            density_k = _ModelDensity(model_k, reference, eps, cfg.score_steps)
        return _linearisation(utility, divergence, cfg.lam, density_k, reference_density, samples, ref_samples, k,
                              reference)

    # rank 0 tracks the log.jsonl records; closed however the loop ends
    with tracked(report_to, run_dir=run, name=run.name if run is not None else "fdc", config=config_record,
                 enabled=main) as tracker:
        if start > 0:
            current = FlowModel.load(run / f"outer_{start:02d}" / "model.safetensors", device=device)
            current.requires_grad_(False)
            if cfg.density == "tilts":      # resume: rebuild the tilts of the accepted iterations
                for j in range(start):
                    rec = next(r for r in records if r.get("outer") == j + 1)
                    if rec.get("accepted", True):
                        model_j = reference if j == 0 else FlowModel.load(
                            run / f"outer_{j:02d}" / "model.safetensors", device=device)
                        tilted = _TiltedDensity(reference_density, tilted, rec["gamma"], linearise(j, model_j))
        if not any(r.get("outer") == start for r in records):
            log(start, evaluate(current))
        gamma_k = records[-1].get("gamma_next", gamma)
        inner_kwargs = {k: v for k, v in asdict(inner).items() if k not in ("lam", "seed", "init", "iters")}
        for k in range(start, cfg.iters_outer):
            t0 = time.perf_counter()
            g = linearise(k, current)
            prev = records[-1].get("objective")
            # p_k is still the base (k = 0, or every step so far rejected): build the trainable model anew
            first = current is reference or (trainable_later is not None and not any(
                trainable_later(n, q) for n, q in current.named_parameters()))
            tried = []
            for attempt in range(cfg.backtrack + 1):
                step_k = min(gamma_k, gamma / (k + 1)) if schedule == "harmonic" else gamma_k
                sub = None if run is None else run / (f"outer_{k + 1:02d}" + (f"_try{attempt}" if attempt else ""))
                cand = finetune(current, _Fixed(g), lam=1.0 / step_k, iters=inner.iters, out=sub,
                                resume=bool(resume and sub is not None and (sub / "config.json").is_file()),
                                progress=progress, seed=seed + k, init=init0 if first else "copy",
                                trainable=None if first else trainable_later, **inner_kwargs)
                rec = evaluate(cand)
                tried.append({"gamma": step_k, "objective": rec.get("objective")})
                # Keep a step only if the objective did not fall (beyond Monte Carlo slack tol).
                accepted = (cfg.backtrack == 0 or prev is None or rec.get("objective") is None
                            or rec["objective"] >= prev - cfg.tol)
                if accepted or attempt == cfg.backtrack:
                    break
                if progress:
                    logger.info(f"fdc outer {k + 1}: F − λD {rec['objective']:.4g} < {prev:.4g} − tol at "
                                f"γ = {step_k:.4g}; retrying with γ = {step_k / 2:.4g}")
                gamma_k = step_k / 2
            step_gamma = step_k
            if accepted:
                current = cand
                tilted = _TiltedDensity(reference_density, tilted, step_gamma, g)
            else:
                rec = {key: records[-1][key] for key in ("utility", "divergence", "objective", "kl", "time_eval")
                       if key in records[-1]}
                gamma_k = step_k / 2
            if run is not None and main and (not accepted or len(tried) > 1):
                current.save(run / f"outer_{k + 1:02d}" / "model.safetensors")   # the iterate kept
            log(k + 1, {**rec, "time_inner": time.perf_counter() - t0, "gamma": step_gamma, "accepted": accepted,
                        "tried": tried, "gamma_next": gamma_k})

        if run is not None and main:
            current.save(run / "model.safetensors")
            ckpt.write_json(run / "metrics.json", {"final": records[-1], "outer": records, "gamma": gamma})
    return current
