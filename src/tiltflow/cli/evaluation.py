"""Evaluation of 2-D runs: fresh ODE samples, reward summaries, KL to the base by log-likelihoods,
and the closed-form tilt of a Gaussian mixture to compare with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rewards as rewards_mod
from ..metrics import mean_pairwise_distance, reward_summary
from ..models.flow_model import FlowModel
from ..tasks import toy2d
from ..validation import positive_int
from .runs import EVAL_SEED_OFFSET


@dataclass
class EvalConfig:
    """How fresh samples are drawn to evaluate a model (saved with every evaluation)."""
    n_eval: int = 2000       # ODE samples per model for rewards, diversity, energy distances
    eval_steps: int = 50     # Heun steps of the ODE (and of the log-likelihood integral)
    n_kl: int = 500          # samples for the KL(fine-tuned ‖ base) estimate by log-likelihoods; 0 skips

    def __post_init__(self):
        positive_int(self.n_eval, "n_eval", minimum=2)      # a reward std and diversity need pairs
        positive_int(self.eval_steps, "eval_steps")
        positive_int(self.n_kl, "n_kl", minimum=0)


def exact_tilt(task, reward, lam: float):
    """The exact tilt p ∝ p_task·exp(r/λ) when it has a closed form (GaussianMixture with a
    linear or quadratic reward), else None."""
    if not isinstance(task, toy2d.GaussianMixture):
        return None
    if isinstance(reward, rewards_mod.Linear):
        return task.tilt_linear(reward.a, lam)
    if isinstance(reward, rewards_mod.Quadratic):
        return task.tilt_quadratic(reward.A, lam, reward.b)
    return None


def exact_tilt_kl(task, reward, lam: float) -> float | None:
    """KL(p* ‖ p) = E_p*[r]/λ − log Z with Z = E_p exp(r/λ), for a linear reward on a mixture:
    log Z = log Σ_k π_k exp(a·μ_k/λ + aᵀΣ_k a/(2λ²)) and E_p*[r] = a·E_p*[x]."""
    if not (isinstance(task, toy2d.GaussianMixture) and isinstance(reward, rewards_mod.Linear)):
        return None
    a = reward.a
    w, mu, cov = task.weights.double(), task.means.double(), task.covs.double()
    log_z = torch.logsumexp(w.log() + mu @ a / lam + (cov @ a @ a) / (2 * lam**2), dim=0)
    mean_star = task.tilt_linear(a, lam).mean().double()
    return float(mean_star @ a / lam - log_z)


def evaluate(model: FlowModel, reward, ev: EvalConfig, seed: int, base: FlowModel | None = None):
    """Reward summary and diversity of fresh ODE samples; with `base`, also the estimate
    KL(p_model ‖ p_base) ≈ mean over n_kl model samples of log p_model(x) − log p_base(x).

    Returns (stats dict, samples (n, *shape), rewards (n,)).
    """
    x = model.sample(ev.n_eval, steps=ev.eval_steps, seed=seed + EVAL_SEED_OFFSET)
    with torch.no_grad():
        r = reward(x) if reward is not None else None
    stats = {"n": ev.n_eval, "ode_steps": ev.eval_steps,
             "diversity": mean_pairwise_distance(x[:2000].cpu())}
    if r is not None:
        stats.update({f"reward_{k}": v for k, v in reward_summary(r.float().cpu()).items()})
    if base is not None and ev.n_kl > 0:
        xk = x[: ev.n_kl]
        kl = (model.log_prob(xk, steps=ev.eval_steps) - base.log_prob(xk, steps=ev.eval_steps)).mean()
        stats["kl"] = float(kl)
        stats["kl_n"] = xk.shape[0]
    return stats, x.cpu(), (None if r is None else r.cpu())


# the printed table of 2-D evaluations: (stats key, column header)
TABLE_COLUMNS = [("reward_mean", "reward mean"), ("reward_cvar_left_10", "CVaR₁₀ left"),
                 ("reward_cvar_right_10", "CVaR₁₀ right"), ("kl", "KL"), ("diversity", "diversity")]


def print_exact_tilt(e: dict, label: str) -> None:
    """The energy distances of an exact_tilt evaluation (`label`: the fine-tuned model's name)."""
    print(f"energy distance to the exact tilt: {label} {e['energy_distance_finetuned']:.4f}, "
          f"base {e['energy_distance_base']:.4f} (noise floor {e['energy_distance_noise_floor']:.4f})")


def print_eval_table(rows: dict, columns=TABLE_COLUMNS) -> None:
    """rows: {model: stats}; columns: (stats key, header) pairs."""
    width = max(len(k) for k in rows) + 2
    print("model".ljust(width) + "".join(h.rjust(14) for _, h in columns))
    for name, stats in rows.items():
        cells = []
        for k, _ in columns:
            v = stats.get(k)
            cells.append(("—" if v is None else f"{v:.3f}").rjust(14))
        print(name.ljust(width) + "".join(cells))
