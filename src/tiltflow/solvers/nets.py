"""NETS adapted to the tilt: a PINN loss on the continuity equation of an annealed tilted path.

NETS (Albergo & Vanden-Eijnden 2024, arXiv 2410.02711) learns a drift b̂_t that transports the
path ρ_t = e^{−U_t + F_t} (F_t = −log ∫e^{−U_t}), i.e. solves ∂_tρ_t + ∇·(b̂_t ρ_t) = 0, by the
off-policy PINN loss (its "PINN objective")

    L = ∫_0^1 E_{x ~ μ_t} | ∇·b̂_t − ∇U_t·b̂_t − ∂_tU_t + ∂_tF̂_t |² dt        (any μ_t with full support)

Tilting adaptation (our reconstruction; the unified paper's text was not available): anneal the
tilt on top of the base's own marginals p^base_t (t = 0 noise, t = 1 data),

    U_t = −log p^base_t − ψ_t,   ψ_t = t·g/λ     (ρ_0 = N(0, I), ρ_1 = p* ∝ p_base e^{g/λ}),

and write b̂ = v_base + δ with δ = v_θ − v_base. The base velocity solves the base's continuity
equation, ∇·v_base + v_base·∇log p^base_t = −∂_t log p^base_t, which cancels the unknown base
density, leaving a residual that needs only the base velocity and its score:

    R_0(x, t) = ∇·δ + δ·(s^base_t + ∇ψ_t) + v_base·∇ψ_t + ∂_tψ_t,    L = mean_t Var_x R_0(·, t).

R ≡ R_0 + ∂_tF = 0 (NETS) ⇔ R_0(·, t) is constant in x: we eliminate the free-energy network F̂
by its optimum ∂_tF̂_t = −E_x R_0 at each time (per-time centring, exact), so the loss is the
per-time batch variance. Points x are the states X_{t_i} of fresh memoryless rollouts of the
current model at `n_times` random interior grid times (no gradient through the paths).
∫_0^1 E R_0 dt → log Z at the optimum (NETS's free-energy estimate), reported by `log_Z`.

Deviations, all deliberate: (1) the trained v_θ is a *transport* (ODE) velocity of the annealed
path ρ_t, not the memoryless tilted path of the other losses: sample the result with the ODE
(`sample(sde=False)`, the default); its memoryless SDE ends at a different law (the reweighting
of estimators.jarzynski stays exact for any sampler, with a lower ESS); (2) the reward and its
gradient are evaluated at intermediate states x_t, so g must be defined off the data manifold;
(3) no Langevin term (ε = 0) and no Jarzynski weights during training; (4) the divergence is
exact (one backward pass per dimension) unless `divergence="hutchinson"` (one Rademacher probe:
unbiased for R_0, but its noise inflates the variance loss by a θ-dependent amount, so its
minimiser is biased; use it only for large dimensions).
"""

from __future__ import annotations

import torch

from .adjoint_matching import terminal_adjoint
from .reciprocal import EndpointBatch, _repeat_cond, endpoint_batch


class NETS:
    name = "nets"

    def __init__(self, n_times: int = 8, divergence: str = "exact"):
        if not isinstance(n_times, int) or n_times < 1:
            raise ValueError(f"n_times must be a positive integer, got {n_times!r}")
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
        self.n_times, self.divergence = n_times, divergence

    def __repr__(self) -> str:
        return f"NETS(n_times={self.n_times}, divergence={self.divergence!r})"

    def check_base(self, base):
        pass

    def batch(self, ft, base, reward, lam, n, grid, generator, cond=None) -> EndpointBatch:
        b = endpoint_batch(ft, base, reward, lam, n, grid, generator, cond, weights=False)
        b.reward, b.lam = reward, lam
        return b

    def residual(self, ft, base, x, t, reward, lam, cond=None, generator=None):
        """R_0(x, t) (rows,) with graph in the parameters of ft; x: (rows, *dims), t: (rows,)."""
        a, g = terminal_adjoint(reward, x, lam, cond)                 # a = −∇g/λ at x_t
        t_b = t.to(x).reshape(-1, *([1] * (x.ndim - 1)))
        grad_psi = -t_b * a                                            # ∇ψ_t = t ∇g/λ
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v_b = base.velocity(x, t, cond)
            delta = ft.velocity(x, t, cond) - v_b
            div = self._div(delta, x, generator)
        with torch.no_grad():
            s_b = base.path.velocity_to_score(v_b, x, t)
        flat = lambda y: y.reshape(len(y), -1)  # noqa: E731
        return (div + (flat(delta) * flat(s_b + grad_psi)).sum(1)
                + (flat(v_b.detach()) * flat(grad_psi)).sum(1) + g.to(x) / lam)

    def _div(self, f, x, generator):
        """∇·f (rows,), differentiable in the parameters; exact or one Hutchinson probe."""
        ff, n = f.reshape(len(f), -1), x[0].numel()
        if self.divergence == "hutchinson":
            z = torch.randint(0, 2, ff.shape, generator=generator, device=f.device).to(f) * 2 - 1
            (jz,) = torch.autograd.grad((ff * z).sum(), x, create_graph=True)
            return (jz.reshape(len(f), -1) * z).sum(1)
        out = 0.0
        for j in range(n):
            (gj,) = torch.autograd.grad(ff[:, j].sum(), x, create_graph=True)
            out = out + gj.reshape(len(f), -1)[:, j]
        return out

    def rows(self, batch: EndpointBatch, n_times, generator):
        """k interior grid indices and the states there: (x (k·B, *dims), t (k·B,), k)."""
        steps, B = len(batch.grid) - 1, batch.xs.shape[1]
        k = min(n_times or self.n_times, steps - 1)
        idx = 1 + torch.randperm(steps - 1, generator=generator, device=batch.xs.device)[:k]
        x = batch.xs[idx].reshape(k * B, *batch.xs.shape[2:]).to(torch.get_default_dtype())
        t = batch.grid[idx].to(torch.get_default_dtype()).repeat_interleave(B)
        return x, t, k

    def loss(self, ft, base, batch: EndpointBatch, n_times=None, generator=None, cond=None):
        x, t, k = self.rows(batch, n_times, generator)
        c = _repeat_cond(cond, k)
        R = self.residual(ft, base, x, t, batch.reward, batch.lam, c, generator).reshape(k, -1)
        loss = R.var(dim=1).mean()
        with torch.no_grad():   # ½E‖u‖², u = 2δ/σ: the same diagnostic as the other losses
            sigma = ft.path.sigma(t).to(x).reshape(-1, *([1] * (x.ndim - 1)))
            u = 2.0 * (ft.velocity(x, t, c) - base.velocity(x, t, c)) / sigma
            kl = float(0.5 * u.pow(2).reshape(len(u), -1).sum(1).mean())
        return loss, kl

    @torch.no_grad()
    def log_Z(self, ft, base, reward, lam: float = 1.0, n: int = 1024, steps: int = 50, seed: int = 0, cond=None):
        """NETS's free-energy estimate log Z ≈ ∫_0^1 E R_0 dt: batch means of R_0 on n memoryless
        rollouts of ft at the interior grid times (end intervals use their neighbour's value).
        Exact only at the optimum, where R_0(·, t) is constant in x; otherwise it depends on the
        sampling law (prefer estimators.jarzynski for an unbiased estimate)."""
        from .. import estimators
        gen = torch.Generator(device=ft.device).manual_seed(seed)
        grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=ft.device)
        xs, _ = estimators.path_rollout(ft, n, grid, gen, cond)
        means = []
        for i in range(1, steps):
            x = xs[i].to(torch.get_default_dtype())
            t = torch.full((n,), float(grid[i]), device=ft.device)
            with torch.enable_grad():
                means.append(float(self.residual(ft, base, x, t, reward, lam, cond, gen).detach().mean()))
        # interior midpoints: the end intervals reuse their neighbour's value
        return float(sum(means) / steps + (means[0] + means[-1]) / (2 * steps))
