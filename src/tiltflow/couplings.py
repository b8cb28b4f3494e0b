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

import itertools
import math
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


def _kabsch(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Proper rotations rot (b, c, c) maximising tr(rotᵀ pᵀ y): p @ rot ≈ y; p, y: (b, nodes, c)."""
    u, _, vt = torch.linalg.svd(p.transpose(1, 2) @ y)
    flip = torch.ones(p.shape[0], p.shape[2], dtype=p.dtype)
    flip[:, -1] = torch.sign(torch.linalg.det(u @ vt))
    return (u * flip[:, None]) @ vt


def _principal_starts(p: torch.Tensor, y: torch.Tensor) -> list:
    """Starting rotations (b, c, c) mapping p's principal axes onto y's, one per sign pattern with
    det +1, plus the identity: the alternation below can stall in a local minimum from one start."""
    b, _, c = p.shape
    _, ep = torch.linalg.eigh(p.transpose(1, 2) @ p)
    _, ey = torch.linalg.eigh(y.transpose(1, 2) @ y)
    starts = [torch.eye(c, dtype=p.dtype).expand(b, c, c)]
    for signs in itertools.product((1.0, -1.0), repeat=c - 1):
        s = torch.tensor([*signs, 1.0], dtype=p.dtype)
        r = ep @ torch.diag(s) @ ey.transpose(1, 2)
        # where this sign pattern gives a reflection, its twin with the last axis flipped is proper
        twin = ep @ torch.diag(s * torch.tensor([1.0] * (c - 1) + [-1.0], dtype=p.dtype)) @ ey.transpose(1, 2)
        starts.append(torch.where((torch.linalg.det(r) < 0)[:, None, None], twin, r))
    return starts


def equivariant_pairing(x0: torch.Tensor, x1: torch.Tensor, nodes: int, coords: int = 3, permute: bool = True,
                        rounds: int = 3) -> torch.Tensor:
    """Align each x0 to its x1 by the symmetry group of an equivariant model (equivariant flow
    matching, Klein, Krämer & Noé 2023, §4):

        x0 ← g*·x0,   g* = argmin_{g ∈ G} ‖g·x0 − x1‖²,   G = S_nodes × SO(coords),

    a permutation of whole nodes (rows) and a proper rotation of the first `coords` columns of
    every node about x0's centroid. The minimum is approached, from the identity and from each
    proper map of x0's principal axes onto x1's, by `rounds` alternations of the optimal
    permutation for the current rotation (Hungarian: SciPy's linear_sum_assignment) and the
    optimal proper rotation for the current permutation (Kabsch, det +1), each of which can only
    lower the cost; the lowest result is kept. permute=False keeps node order (a fixed molecular
    graph) and only rotates: one Kabsch step from the identity is then the exact minimum.
    Rotations are proper, so a chiral x1 is never matched by its mirror.

    Valid for flow matching when p0 is G-invariant (N(0, I) is) and the network G-equivariant:
    the trajectory from an unaligned x0 is then g⁻¹ applied to the one from g·x0, so samples keep
    the law of the data up to G (orbits), while the conditional paths get shorter.

    x0, x1: (batch, nodes · width) or (batch, nodes, width), width ≥ coords. Returns x0's
    aligned copy, same shape, dtype and device. Runs on the CPU (SciPy), b · rounds · (1 + 2^(coords−1))
    assignments of nodes × nodes when permuting.
    """
    try:
        from scipy.optimize import linear_sum_assignment   # SciPy comes with POT ([ot]) and with [mol]
    except ImportError as e:
        raise ImportError("the equivariant coupling needs SciPy: pip install 'tiltflow[mol]' (or scipy)") from e

    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    b = x0.shape[0]
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or x0[0].numel() % nodes:
        raise ValueError(f"nodes must be a positive integer dividing a row's {x0[0].numel()} entries, got {nodes!r}")
    width = x0[0].numel() // nodes
    if isinstance(coords, bool) or not isinstance(coords, int) or not 1 <= coords <= width:
        raise ValueError(f"coords must be an integer in [1, {width}] (a node's width), got {coords!r}")
    a0 = x0.detach().reshape(b, nodes, width).to("cpu", torch.float64)
    y = x1.detach().reshape(b, nodes, width).to("cpu", torch.float64)[..., :coords]
    y = y - y.mean(1, keepdim=True)
    centre = a0[..., :coords].mean(1, keepdim=True)                     # (b, 1, coords), kept
    p0 = a0[..., :coords] - centre
    rows = torch.arange(b)[:, None]
    best, best_cost = a0.clone(), torch.full((b,), math.inf, dtype=torch.float64)
    # without permutations the rotation alone is solved in closed form: no restarts, no alternation
    starts = _principal_starts(p0, y) if permute else [torch.eye(coords, dtype=p0.dtype)]
    for rot in starts:
        a, p = a0, p0 @ rot
        for _ in range(rounds if permute else 1):
            if permute:
                cost = torch.cdist(p, y).pow(2).numpy()                   # (b, nodes of x0, nodes of x1)
                order = torch.from_numpy(np.stack([linear_sum_assignment(c.T)[1] for c in cost]))
                a, p = a[rows, order], p[rows, order]                     # x0's node order[k] faces x1's node k
            p = p @ _kabsch(p, y)
        # p is x0's permuted nodes under one proper rotation: write them back with the centroid
        a = a.clone()
        a[..., :coords] = p + centre
        c = (p - y).pow(2).sum((1, 2))
        better = c < best_cost
        best[better], best_cost[better] = a[better], c[better]
    return best.to(x0.dtype).to(x0.device).reshape(x0.shape)
