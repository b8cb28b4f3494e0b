"""What does Flow Density Control do to a 2-D model for each utility, at what KL and what cost?

The paper's illustrative setting at 2-D scale (research memo §4): the base is the exact flow of
the 10:1 mixture N(0, I) + N((3, 3), 0.3²I) (GaussianMixtureVelocity, so the base is not under
test), r(x) = x₁ + x₂ for the reward-based utilities. Each utility runs `fdc` with the KL to
the base (and mean-variance also with W2² optimal transport):

  entropy H(p) (λ = 1; optimum p_base^{1/2}) · mean-variance E r − ½·Var r (λ = 1) ·
  left CVaR_0.1 of r, risk-averse (λ = 1; also the one-shot TFFT result, tiltflow.CVaR, scored by the
  same CVaR − λ·KL, and the optimum and FDC's exact path by quadrature on the law of r) ·
  novelty −E log q_ref, q_ref a KDE (h = 1.5) of base samples (λ = 1) · kernel diversity
  −E k(x, x') (h = 1, λ = 0.5, step 1) · D-optimal design log det E xxᵀ (λ = 4, step 1/8).

Inner Adjoint Matching runs: residual MLP (64, 64) on the exact base, 200 iterations, batch
256, 20 memoryless steps, lr 2e-3. Reported per run: the utility value F, KL(p‖p_base) by
log-likelihoods (300 samples) and F − λ·D at every outer iteration k = 0..K on the same 2000
ODE samples' noise, whether F and F − λ·D increased at every k (up to Monte Carlo slack; a
step that lowers F − λ·D by more than fdc's tol is retried at half the step, then rejected),
the base-network calls per reward-gradient evaluation and per outer iteration (the cost must
not grow with k), and the wall time per outer iteration (inner run + evaluation), one thread.

Writes results/fdc_utilities.json (the table) and results/fdc_<run>.png (base vs FDC result
per run, with the reward's contours where there is one).

    python benchmarks/fdc_utilities.py            # full (~6-10 min, one thread)
    python benchmarks/fdc_utilities.py --quick    # smoke test (~1 min)
    python benchmarks/fdc_utilities.py --only mean_variance_renyi   # one run, its row replaced in the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tiltflow as tilt  # noqa: E402
from tiltflow import plots  # noqa: E402
from tiltflow.methods import fdc as fdc_module  # noqa: E402
from tiltflow.divergences import log_ratio  # noqa: E402
from tiltflow.metrics import cvar  # noqa: E402
from tiltflow.objectives import cvar_pseudo_reward  # noqa: E402
from tiltflow.models import analytic  # noqa: E402

NAME = "fdc_utilities"

# Base-network calls: the exact base's forward is counted, whether called as p_pre or inside a
# fine-tuned model (base + residual); per reward gradient by wrapping fdc's pseudo-reward.
CALLS, REWARD_CALLS = [0], []
_forward = analytic.GaussianMixtureVelocity.forward


def _counting_forward(self, *args, **kwargs):
    CALLS[0] += 1
    return _forward(self, *args, **kwargs)


class _Counted(fdc_module._Fixed):
    def pseudo_reward(self, x_offline, lam, cond=None):
        g = super().pseudo_reward(x_offline, lam, cond)

        def counted(x, cond=None):
            c0 = CALLS[0]
            out = g(x, cond)
            REWARD_CALLS.append(CALLS[0] - c0)
            return out
        return counted


analytic.GaussianMixtureVelocity.forward = _counting_forward
fdc_module._Fixed = _Counted


def base_model():
    mix = tilt.toy2d.GaussianMixture.isotropic(weights=(10.0, 1.0), means=((0.0, 0.0), (3.0, 3.0)),
                                               stds=(1.0, 0.3))
    return tilt.FlowModel(tilt.GaussianMixtureVelocity(mix.weights, mix.means, mix.covs))


def _r_components(base, a):
    """Means and variances (k,) of r = aᵀx under the mixture base's components: aᵀμ_i, aᵀΣ_i a."""
    net, a = base.net, a.double()
    return net.means.double() @ a, torch.einsum("i,kij,j->k", a, net.covs.double(), a)


def law_of_r(base, a, r) -> torch.Tensor:
    """Log node masses (normalised) of the law of r = aᵀx under the mixture base at the nodes r."""
    mean, var = _r_components(base, a)
    log_q = torch.logsumexp(base.net.weights.double().log()[:, None] - (r - mean[:, None]) ** 2 / (2 * var[:, None])
                            - 0.5 * var[:, None].log(), 0)
    return log_q - torch.logsumexp(log_q, 0)


def renyi_reference(base, utility, divergence, lam, K, gamma) -> dict:
    """Mean-variance + λ·Rényi-α (α < 1) by quadrature on the law of r = aᵀx under the mixture base,
    q_r = Σ w_i N(aᵀμ_i, aᵀΣ_i a): F, D_α and the tilts see x only through r (data processing is an
    equality for p = q·h(r)), so these 1-D numbers are the 2-D ones.

    objective_optimum: the local maximum next to the minor mode, the fixed point m = E_p r of the step
    that keeps D exact, p ← argmax ⟨r − κ(r − m)², p⟩ − λ·D_α(p‖q) (Renyi.best_response), from the base.
    No global maximum exists (Renyi docstring): objective_unbounded_example is (1 − ε)·N(R, ¼) + ε·q_r,
    ε = R⁻². objective_exact_tilts_per_outer: this row's mirror steps (γ, capped weight) with exact tilts.
    """
    r = torch.linspace(-25.0, 35.0, 24001, dtype=torch.float64)
    log_q = law_of_r(base, utility.reward.a, r)
    kappa, alpha, cap = utility.kappa, divergence.alpha, divergence.max_log_weight

    def normed(log_p):     # node masses
        return log_p - torch.logsumexp(log_p, 0)

    def scores(log_p):     # F, D_α, F − λD_α, KL(p‖q), E r
        p = log_p.exp()
        m = (p * r).sum()
        d = torch.logsumexp(alpha * log_p + (1 - alpha) * log_q, 0) / (alpha - 1)
        f = m - kappa * (p * (r - m) ** 2).sum()
        return [float(v) for v in (f, d, f - lam * d, (p * (log_p - log_q)).sum(), m)]

    m = float((log_q.exp() * r).sum())
    for _ in range(500):   # contracts by ~0.5 per step near the fixed point
        u = r - kappa * (r - m) ** 2
        c = divergence.best_response(u, lam, log_q, sup_u=m + 1 / (4 * kappa))
        log_p = normed(log_q - torch.log(c - u) / (1 - alpha))
        m_prev, m = m, scores(log_p)[4]
        if abs(m - m_prev) < 1e-10:
            break
    f, d, obj, kl, m = scores(log_p)
    log_pk, path = log_q, [scores(log_q)[2]]
    for k in range(K):     # log p ← log p + γ·(δF − λ·δD), Renyi.first_variation's capped weight, no D at k = 0
        mk = scores(log_pk)[4]
        g = r - kappa * (r - mk) ** 2
        if k > 0:
            lw = (alpha - 1) * (log_pk - log_q)
            lw = lw - torch.logsumexp(lw + log_pk, 0)
            g = g + lam * alpha / (1 - alpha) * lw.clamp(-cap, cap).exp()
        log_pk = normed(log_pk + gamma * g)
        path.append(scores(log_pk)[2])
    R = 20.0
    eps = R ** -2
    far = torch.logaddexp(normed(-2 * (r - R) ** 2) + torch.tensor(1 - eps).log(), log_q + torch.tensor(eps).log())
    return {"objective_optimum": obj, "optimum_utility": f, "optimum_divergence": d, "optimum_kl": kl,
            "optimum_mean_r": m, "objective_exact_tilts_per_outer": path,
            "objective_unbounded_example": {"R": R, "eps": eps, "objective": scores(far)[2], "kl": scores(far)[3]}}


def cvar_reference(base, reward, level, tail, lam, K, n_path=100) -> dict:
    """max CVaR_β(p) − λ·KL(p‖p_base) by quadrature on the law of r = aᵀx, a Gaussian mixture under the
    base (component i: N(aᵀμ_i, aᵀΣ_i a)); CVaR, KL and FDC's tilts see x only through r, so these 1-D
    numbers are the 2-D ones.

    For a threshold η the best law is p_η ∝ p_base·exp(g_η(r)/λ) (objectives.cvar_pseudo_reward), of
    value F(η) = η + λ·log E_base exp(g_η/λ) (objectives.threshold_dual, on a grid instead of samples):
    optimum = max_η F_L (left) or min_η F_R (right) at eta_star, the VaR of p* = p_eta_star; the
    stationary points of the left problem (η = VaR_β(p_η)) are the local maxima of F_L, counted on the
    grid. objective_mirror_path: FDC's exact iteration at its default steps, without backtracking, for
    k = 0..K: left, the full step 1/λ, p_{k+1} = p_base·exp(g_{η_k}/λ) with η_k the tail quantile of p_k
    (a Picard iteration on the threshold); right, steps 1/(λ(k + 1)) (CVaRUtility.step_schedule).
    mirror_steps_to_optimum: the first k (≤ n_path) at which it is within 0.05 of the optimum.
    """
    mean, var = _r_components(base, reward.a)
    sd = var.sqrt()
    r = torch.linspace(float((mean - 10 * sd).min()), float((mean + 10 * sd).max()), 40001, dtype=torch.float64)
    log_q = law_of_r(base, reward.a, r)

    def tilt_at(eta):
        log_p = log_q + cvar_pseudo_reward(r, eta, level, tail) / lam
        return log_p - torch.logsumexp(log_p, 0)

    def law(log_p):     # VaR, CVaR (Rockafellar–Uryasev at the quantile), KL, CVaR − λ·KL, E r
        p = log_p.exp()
        q = torch.tensor(level if tail == "left" else 1 - level, dtype=torch.float64)
        eta = float(r[min(int(torch.searchsorted(torch.cumsum(p, 0), q)), r.numel() - 1)])
        value = eta + float((p * cvar_pseudo_reward(r, eta, level, tail)).sum())
        kl = float((p * (log_p - log_q)).sum())
        return {"var": eta, "cvar": value, "kl": kl, "objective": value - lam * kl, "mean_r": float((p * r).sum())}

    etas = r[::10]
    F = torch.cat([e + lam * torch.logsumexp(log_q + cvar_pseudo_reward(r[None, :], e[:, None], level, tail) / lam, 1)
                   for e in etas.split(200)])
    sign = 1.0 if tail == "left" else -1.0              # left: maxima of F_L; right: minima of F_R
    inner = sign * F[1:-1]
    stationary = int(((inner > sign * F[:-2]) & (inner >= sign * F[2:])).sum())
    i = int((sign * F).argmax())
    best = law(tilt_at(float(etas[i])))
    log_p, path, reached = log_q, [], None
    for k in range(n_path + 1):
        cur = law(log_p)
        path.append(cur["objective"])
        if reached is None and cur["objective"] > float(F[i]) - 0.05:
            reached = k
        gamma = 1 / lam if tail == "left" else 1 / (lam * (k + 1))
        # log p ← log p + γ·(g_η − λ·(log p − log p_base)); γ = 1/λ gives tilt_at(η)
        log_p = log_p + gamma * (cvar_pseudo_reward(r, cur["var"], level, tail) - lam * (log_p - log_q))
        log_p = log_p - torch.logsumexp(log_p, 0)
    return {"eta_star": float(etas[i]), "optimum": float(F[i]), "cvar_star": best["cvar"], "kl_star": best["kl"],
            "mean_r_star": best["mean_r"], "stationary_points": stationary, "objective_mirror_path": path[:K + 1],
            "mirror_steps_to_optimum": reached, "n_path": n_path}


def runs(base, reward):
    ref = base.sample(2000, steps=50, seed=123)
    return [  # name, utility, divergence, λ, K, mirror step γ (None: the default 1/(λ + c))
        ("entropy", tilt.Entropy(), tilt.KL(), 1.0, 2, None),
        ("mean_variance", tilt.MeanVariance(reward, kappa=0.5), tilt.KL(), 1.0, 3, None),
        ("mean_variance_ot", tilt.MeanVariance(reward, kappa=0.5), tilt.OT(p=2), 1.0, 3, None),
        # at the default step 1/λ the Rényi-½ run jumps far out at outer iteration 2 (KL 7): half steps
        ("mean_variance_renyi", tilt.MeanVariance(reward, kappa=0.5), tilt.Renyi(alpha=0.5), 1.0, 4, 0.5),
        ("cvar_left", tilt.CVaRUtility(reward, level=0.1, tail="left"), tilt.KL(), 1.0, 3, None),
        # −log KDE grows like ‖x‖²/(2h²): the tilt is normalisable only for h²λ > 1
        ("novelty", tilt.Novelty(ref, bandwidth=1.5), tilt.KL(), 1.0, 2, None),
        # these two overshoot and oscillate at the default step 1/λ: half steps
        ("diversity", tilt.KernelDiversity(bandwidth=1.0), tilt.KL(), 0.5, 3, 1.0),
        ("design", tilt.ExperimentDesign(reg=1e-3), tilt.KL(), 4.0, 3, 0.125),
        # the authors' code uses a small constant step γ = 0.1: the same K at that step, to compare
        # with the default full step 1/(λ + c) above
        ("entropy_step0.1", tilt.Entropy(), tilt.KL(), 1.0, 2, 0.1),
        ("mean_variance_step0.1", tilt.MeanVariance(reward, kappa=0.5), tilt.KL(), 1.0, 3, 0.1),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", metavar="RUN", help="run only these (names as in runs()); their rows "
                   "replace the same rows of an existing results JSON of the same mode, the others are kept")
    args = p.parse_args(argv)
    _common.setup_torch(1)
    inner = dict(iters=200, batch_size=256, steps=20, lr=2e-3, residual_hidden=(64, 64), seed=0)
    if args.quick:
        inner.update(iters=20, batch_size=64, steps=10)
    base, reward = base_model(), tilt.rewards.Linear([1.0, 1.0])
    x_base = base.sample(2000, steps=50, seed=7)
    table, rows = {}, []
    todo = runs(base, reward)
    if args.only:
        unknown = set(args.only) - {r[0] for r in todo}
        if unknown:
            p.error(f"unknown run(s) {sorted(unknown)}; choose from {[r[0] for r in todo]}")
        todo = [r for r in todo if r[0] in args.only]
    for name, utility, divergence, lam, K, step in todo:
        if args.quick:
            K = min(K, 2)
        t0 = time.perf_counter()
        logs, mark = [], [CALLS[0], 0]

        def callback(k, rec):
            rec["base_calls"] = CALLS[0] - mark[0]          # inner run(s) + evaluation of this outer step
            per = REWARD_CALLS[mark[1]:]
            rec["base_calls_per_reward_gradient"] = sum(per) / len(per) if per else 0
            mark[:] = [CALLS[0], len(REWARD_CALLS)]
            logs.append(rec)

        try:
            ft = tilt.fdc(base, utility, divergence, lam=lam, iters_outer=K, step=step, progress=False, n_eval=2000,
                          n_kl=300, callback=callback, **inner)
        except FloatingPointError as e:   # recorded, not hidden: the table says which run broke and where
            table[name] = {"utility": repr(utility), "divergence": repr(divergence), "lam": lam, "K": K,
                           "error": str(e), "per_outer": logs}
            print(f"{name}: FAILED after {len(logs) - 1} outer steps: {e}", flush=True)
            continue
        total = time.perf_counter() - t0
        F = [r["utility"] for r in logs]
        J = [r["objective"] for r in logs]
        slack = 0.02 * (abs(F[-1] - F[0]) + 1e-3) + 0.01
        entry = {"utility": repr(utility), "divergence": repr(divergence), "lam": lam, "K": K,
                 "gamma": logs[-1]["gamma"], "per_outer": logs,
                 "utility_base": F[0], "utility_final": F[-1], "kl_final": logs[-1]["kl"],
                 "divergence_final": logs[-1]["divergence"], "objective_final": logs[-1]["objective"],
                 "utility_increasing": all(b > a - slack for a, b in zip(F, F[1:])),
                 "objective_per_outer": J, "objective_increasing": all(b > a - 0.02 for a, b in zip(J, J[1:])),
                 "rejected_steps": sum(not r.get("accepted", True) for r in logs),
                 "base_calls_per_reward_gradient": [r["base_calls_per_reward_gradient"] for r in logs[1:]],
                 "base_calls_per_outer": [r["base_calls"] for r in logs[1:]],
                 "time_per_outer_s": sum(r["time_inner"] + r["time_eval"] for r in logs[1:]) / K,
                 "time_total_s": total}
        x_ft = ft.sample(2000, steps=50, seed=7)
        if name == "mean_variance_renyi":   # its optimum and its exact-tilt path, by quadrature
            entry.update(renyi_reference(base, utility, divergence, lam, K, step))
        if name == "cvar_left":   # the one-shot TFFT solution of the same problem, scored the same way
            t1 = time.perf_counter()
            objective = tilt.CVaR(reward, level=0.1, tail="left")
            tfft = tilt.finetune(base, objective, lam=lam, progress=False, **inner)
            x_tfft = tfft.sample(2000, steps=50, seed=7)
            value = cvar(reward(x_tfft), 0.1, "left")
            kl = float(log_ratio(tfft, base, x_tfft[:300], 50).double().mean())   # as fdc's n_kl = 300
            entry["tfft_one_shot"] = {"cvar_left_10": value, "kl": kl, "objective": value - lam * kl,
                                      "eta": objective.solution.eta, "time_s": time.perf_counter() - t1}
            entry["fdc_cvar_left_10"] = cvar(reward(x_ft), 0.1, "left")
            entry["quadrature"] = cvar_reference(base, reward, 0.1, "left", lam, K)
        table[name] = entry
        density = reward if name in ("mean_variance", "mean_variance_ot", "cvar_left") else None
        plots.plot_samples(_common.RESULTS / f"fdc_{name}.png", {"base": x_base, f"FDC, K = {K}": x_ft},
                           title=f"{utility!r} − {lam:g}·{divergence!r}", density=density)
        rows.append([name, K, F[0], F[-1], logs[-1]["kl"], logs[-1]["objective"], entry["utility_increasing"],
                     entry["objective_increasing"], entry["base_calls_per_reward_gradient"], entry["time_per_outer_s"]])
        print(f"{name}: done in {total:.0f} s; F − λD per k {[round(j, 3) for j in J]}; rejected "
              f"{entry['rejected_steps']}; base calls per ∇g per k {entry['base_calls_per_reward_gradient']}",
              flush=True)
    _common.print_table(rows, ["run", "K", "F base", "F final", "KL", "F − λD", "F up", "F − λD up",
                               "calls/∇g per k", "s/outer"])
    if "cvar_left" in table:
        c, t, q = table["cvar_left"], table["cvar_left"]["tfft_one_shot"], table["cvar_left"]["quadrature"]
        print(f"left CVaR_0.1 − λ·KL: FDC {c['objective_final']:.3f} after K = {c['K']} (exact path "
              f"{q['objective_mirror_path'][-1]:.3f}, reaches the optimum after {q['mirror_steps_to_optimum']} "
              f"outer steps), one-shot TFFT {t['objective']:.3f} (CVaR {t['cvar_left_10']:.3f}, KL {t['kl']:.3f}), "
              f"optimum {q['optimum']:.3f} (CVaR {q['cvar_star']:.3f}, KL {q['kl_star']:.3f}, "
              f"{q['stationary_points']} stationary point(s))")
    old = _common.RESULTS / f"{NAME}.json"
    if args.only and old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("quick") == args.quick and prev.get("inner") == json.loads(json.dumps(inner)):
            table = {**prev["runs"], **table}
    _common.write_json(NAME, {"question": __doc__.splitlines()[0], "inner": inner, "quick": args.quick,
                              "runs": table})


if __name__ == "__main__":
    main()
