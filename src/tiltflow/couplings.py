"""couplings: minibatch couplings of two sample sets, for flow matching and OT divergences.

A coupling of the uniform empirical measures of x0 (n, *dims) and x1 (m, *dims) is a plan
π (n, m) ≥ 0 with rows summing to 1/n and columns to 1/m, on the cost c_ij = ‖x0_i − x1_j‖²:

- "independent": π = 1/(nm), the product coupling;
- "ot": exact OT, argmin_π Σ π_ij c_ij (network simplex, POT's ``ot.emd``). With n = m and
  uniform weights the optimum is a vertex of the Birkhoff polytope: a permutation / n;
- "sinkhorn": entropic OT, argmin_π Σ π_ij c_ij/c̄ − reg·H(π) with c̄ the mean cost (so `reg`
  does not depend on the data's scale; POT's ``ot.sinkhorn``).

POT is an optional dependency (``pip install 'tiltflow[ot]'``); `require_ot` imports it with a
message naming what needed it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

COUPLINGS = ("independent", "ot", "sinkhorn")


def require_ot(what: str):
    """The POT module; ImportError naming `what` needed it and how to install it."""
    try:
        import ot
    except ImportError as e:
        raise ImportError(f"{what} needs POT: pip install 'tiltflow[ot]'") from e
    return ot


def _flat64(x: torch.Tensor) -> np.ndarray:
    """x: (n, *dims) -> (n, d) float64 NumPy on the host."""
    return x.detach().reshape(x.shape[0], -1).double().cpu().numpy()


def plan(x0: torch.Tensor, x1: torch.Tensor, coupling: str = "ot", reg: float = 0.05) -> np.ndarray:
    """The transport plan (n, m) between the uniform empirical measures of x0 (n, *dims) and x1 (m, *dims).

    independent: 1/(nm); ot: exact OT on ‖x0_i − x1_j‖² (ot.emd); sinkhorn: entropic OT with
    regularisation `reg` times the mean cost (ot.sinkhorn). Rows sum to 1/n and
    columns to 1/m (sinkhorn up to its convergence tolerance).
    """
    n, m = x0.shape[0], x1.shape[0]
    if coupling == "independent":
        return np.full((n, m), 1.0 / (n * m))
    if coupling not in ("ot", "sinkhorn"):
        raise ValueError(f"coupling must be 'independent', 'ot' or 'sinkhorn', got {coupling!r}")
    ot = require_ot(f"coupling={coupling!r}")
    cost = ot.dist(_flat64(x0), _flat64(x1), metric="sqeuclidean")
    wa, wb = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    if coupling == "ot":
        return ot.emd(wa, wb, cost)
    return ot.sinkhorn(wa, wb, cost / cost.mean(), reg, numItermax=1000, stopThr=1e-6)


def pair(x0: torch.Tensor, x1: torch.Tensor, coupling: str, generator: torch.Generator,
         reg: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (x0_i, x1_{j(i)}) drawn from the coupling's plan: j(i) ~ plan[i] / plan[i].sum().

    x0, x1: (batch, *dims). The x0 marginal is kept exactly; for "ot" the plan is a permutation
    (uniform weights, a vertex of the Birkhoff polytope) so x1 is kept exactly too, for
    "sinkhorn" in expectation; "independent" keeps the given order.
    """
    if coupling == "independent":
        return x0, x1
    p = torch.as_tensor(plan(x0, x1, coupling, reg))
    if coupling == "ot":
        j = p.argmax(dim=1)
        if torch.unique(j).numel() != x1.shape[0]:      # emd stopped before a vertex
            j = torch.multinomial(p / p.sum(1, keepdim=True), 1, generator=generator)[:, 0]
    else:
        j = torch.multinomial(p / p.sum(1, keepdim=True), 1, generator=generator)[:, 0]
    return x0, x1[j.to(x1.device)]


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Exact minibatch OT matching of x0 to x1 on the cost ‖x0_i − x1_j‖².

    x0, x1: (batch, *dims). Returns perm (batch,) long such that (x0[perm], x1) are the optimal
    pairs. With uniform weights 1/n on both sides the network simplex returns a vertex of the
    Birkhoff polytope, a permutation matrix, so the argmax of each row of the plan is a
    permutation and both marginals are preserved exactly.
    """
    ot = require_ot("coupling='ot'")
    n = x0.shape[0]
    w = [1.0 / n] * n
    p = ot.emd(w, w, ot.dist(_flat64(x0), _flat64(x1), metric="sqeuclidean"))
    col = torch.as_tensor(p.argmax(axis=1))              # x0_i is sent to x1_col[i]
    perm = torch.empty(n, dtype=torch.long)
    if torch.unique(col).numel() != n:                   # emd stopped early: not a vertex
        warnings.warn("ot.emd did not return a permutation; using the independent pairing for this batch")
        return torch.arange(n, device=x0.device)
    perm[col] = torch.arange(n)
    return perm.to(x0.device)


def ot_dual(cost: np.ndarray, what: str = "exact OT") -> tuple[float, np.ndarray, np.ndarray]:
    """Exact OT between uniform weights on the rows and columns of `cost` (n, m), float64.

    Returns (optimal cost Σ π_ij c_ij, row potentials u (n,), column potentials v (m,)) of the
    dual max Σ u_i/n + Σ v_j/m subject to u_i + v_j ≤ c_ij (ot.emd with log=True).
    """
    ot = require_ot(what)
    n, m = cost.shape
    _, log = ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cost, log=True)
    return float(log["cost"]), np.asarray(log["u"]), np.asarray(log["v"])
