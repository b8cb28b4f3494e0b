"""Figures of a run: 2-D samples side by side, training curves, reward histograms.

matplotlib is optional (the [plot] extra) and imported only when a figure is drawn. Figures are
rendered with the Agg canvas directly (no pyplot), so drawing never changes the caller's
matplotlib backend or global figure state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .metrics import cvar

_MISSING = "plotting needs matplotlib: pip install 'tiltflow[plot]'"
_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")


def _figure(ncols: int, nrows: int = 1, panel=(4.0, 3.6), **kw):
    """A Figure with an Agg canvas and its axes array (nrows, ncols)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_MISSING) from e
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig, path_png) -> Path:
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)
    return path


def _points(x, name: str) -> np.ndarray:
    """A finite (n, 2) float64 array from a tensor or array; ValueError naming the panel."""
    a = torch.as_tensor(x).detach().cpu().to(torch.float64).numpy()
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] == 0:
        raise ValueError(f"panel {name!r} must be a non-empty array of shape (n, 2), got {a.shape}")
    return a[np.isfinite(a).all(axis=1)]


def _values(r, name: str) -> np.ndarray:
    a = torch.as_tensor(r).detach().cpu().to(torch.float64).numpy()
    if a.ndim != 1 or a.shape[0] < 2:
        raise ValueError(f"rewards {name!r} must have shape (n,) with n >= 2, got {a.shape}")
    a = a[np.isfinite(a)]
    if a.shape[0] < 2:
        raise ValueError(f"rewards {name!r} have fewer than 2 finite values")
    return a


def _limits(arrays) -> tuple[tuple[float, float], tuple[float, float]]:
    """Shared square-ish limits from the 0.5–99.5 % quantiles of all panels, so a few stray
    samples do not squash the picture."""
    allp = np.concatenate(arrays)
    lo = np.quantile(allp, 0.005, axis=0)
    hi = np.quantile(allp, 0.995, axis=0)
    pad = 0.08 * (hi - lo).max() + 1e-6
    return (lo[0] - pad, hi[0] + pad), (lo[1] - pad, hi[1] + pad)


def plot_samples(path_png, panels: dict, title: str | None = None, density=None,
                 density_label: str = "reward", kind: str = "scatter", max_points: int = 5000) -> Path:
    """Side-by-side 2-D sample panels on shared axes, e.g. {"data": x, "pretrained": y, ...}.

    panels: name -> samples (n, 2) (tensor or array). density: optional callable
      f(xy: tensor (m, 2)) -> (m,) (a reward or a log-density) drawn as contour lines on every
      panel. kind: "scatter" (at most `max_points` points per panel) or "hexbin".
    Returns the path of the PNG.
    """
    if not panels:
        raise ValueError("panels must name at least one sample, e.g. {'data': x}")
    if kind not in ("scatter", "hexbin"):
        raise ValueError(f"kind must be 'scatter' or 'hexbin', got {kind!r}")
    pts = {name: _points(x, name) for name, x in panels.items()}
    xlim, ylim = _limits(list(pts.values()))
    fig, axes = _figure(len(pts), sharex=True, sharey=True)

    grid = None
    if density is not None:
        gx, gy = np.meshgrid(np.linspace(*xlim, 120), np.linspace(*ylim, 120))
        xy = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=torch.float32)
        with torch.no_grad():
            z = torch.as_tensor(density(xy)).detach().cpu().to(torch.float64).numpy()
        if z.shape != (xy.shape[0],):
            raise ValueError(f"density must return shape ({xy.shape[0]},) on a grid of points, got {z.shape}")
        grid = (gx, gy, z.reshape(gx.shape))

    for i, (ax, (name, a)) in enumerate(zip(axes[0], pts.items())):
        if kind == "hexbin":
            ax.hexbin(a[:, 0], a[:, 1], gridsize=45, extent=(*xlim, *ylim), cmap="Blues", mincnt=1)
        else:
            shown = a[:max_points]
            ax.scatter(shown[:, 0], shown[:, 1], s=3, alpha=0.35, color=_COLORS[i % len(_COLORS)],
                       linewidths=0, rasterized=True)
        if grid is not None:
            cs = ax.contour(*grid, levels=10, colors="k", linewidths=0.6, alpha=0.5)
            if i == 0:
                ax.clabel(cs, fontsize=6, fmt="%.2g")
        ax.set_title(f"{name} (n={a.shape[0]})", fontsize=10)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("x₁")
    axes[0][0].set_ylabel("x₂")
    if title or grid is not None:
        suffix = f"  (contours: {density_label})" if grid is not None else ""
        fig.suptitle((title or "") + suffix, fontsize=11)
    return _save(fig, path_png)


def read_log(log_jsonl_path) -> list[dict]:
    """The records of a log.jsonl file (one JSON object per line)."""
    from .training import read_log as read_records
    path = Path(log_jsonl_path)
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    records = read_records(path)
    if not records:
        raise ValueError(f"training log {path} has no records")
    return records


def _series(records, key):
    return np.array([float(r.get(key, math.nan)) for r in records], dtype=np.float64)


def plot_training(path_png, log_jsonl_path, title: str | None = None) -> Path:
    """Training curves from a log.jsonl: loss, reward mean with its q05–q95 band, left/right
    CVaR_10, KL estimate and diversity against the iteration (or step for pretraining logs).

    Panels whose keys the log lacks are left out. Returns the path of the PNG.
    """
    records = read_log(log_jsonl_path)
    xkey = "iter" if "iter" in records[0] else "step"
    it = _series(records, xkey) if xkey in records[0] else np.arange(1, len(records) + 1, dtype=float)
    has = lambda k: any(k in r for r in records)  # noqa: E731

    specs = []   # (title, [(key, label)], band keys or None, log scale)
    if has("loss"):
        specs.append(("loss", [("loss", "loss")], None, True))
    if has("reward_mean"):
        band = ("reward_q05", "reward_q95") if has("reward_q05") and has("reward_q95") else None
        specs.append(("reward", [("reward_mean", "mean")], band, False))
    cv = [(k, lab) for k, lab in (("reward_cvar_left_10", "left CVaR₀.₁"),
                                   ("reward_cvar_right_10", "right CVaR₀.₁")) if has(k)]
    if cv:
        specs.append(("reward tails", cv, None, False))
    if has("kl"):
        specs.append(("KL estimate (path)", [("kl", "KL")], None, False))
    if has("diversity"):
        specs.append(("diversity (mean pairwise distance)", [("diversity", "diversity")], None, False))
    if not specs:
        raise ValueError(f"training log {log_jsonl_path} has none of loss, reward_mean, kl, diversity")

    ncols = min(3, len(specs))
    nrows = math.ceil(len(specs) / ncols)
    fig, axes = _figure(ncols, nrows, panel=(4.2, 3.0))
    window = max(1, len(records) // 50)   # light smoothing of noisy per-iteration values
    for ax, (name, keys, band, logy) in zip(axes.ravel(), specs):
        for j, (k, label) in enumerate(keys):
            y = _series(records, k)
            color = _COLORS[j % len(_COLORS)]
            ax.plot(it, y, color=color, alpha=0.3 if window > 1 else 1.0, lw=0.8)
            if window > 1:
                ax.plot(it, _smooth(y, window), color=color, lw=1.6, label=f"{label} (moving avg {window})")
            else:
                ax.plot([], [], color=color, label=label)
        if band is not None:
            ax.fill_between(it, _series(records, band[0]), _series(records, band[1]),
                            color=_COLORS[0], alpha=0.15, lw=0, label="q05–q95")
        if logy and np.nanmin(_series(records, keys[0][0])) > 0:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xkey)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(specs):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path_png)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average that ignores NaN (same length as y)."""
    ok = np.isfinite(y)
    c = np.cumsum(np.where(ok, y, 0.0))
    n = np.cumsum(ok)
    c = np.concatenate([[0.0], c])
    n = np.concatenate([[0], n])
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    cnt = n[idx] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (c[idx] - c[lo]) / np.maximum(cnt, 1), np.nan)


def plot_reward_hist(path_png, rewards: dict, level: float = 0.1, title: str | None = None) -> Path:
    """Overlaid reward histograms, one per model, on shared bins, with dashed lines at each
    model's left and right CVaR at tail mass `level` and a solid line at its mean.

    rewards: name -> (n,) rewards (tensor or array). Returns the path of the PNG.
    """
    if not rewards:
        raise ValueError("rewards must name at least one sample, e.g. {'base': r}")
    vals = {name: _values(r, name) for name, r in rewards.items()}
    allv = np.concatenate(list(vals.values()))
    edges = np.linspace(np.quantile(allv, 0.001), np.quantile(allv, 0.999), 61)
    fig, axes = _figure(1, panel=(7.0, 4.0))
    ax = axes[0][0]
    pct = f"{100 * level:g}"
    for i, (name, r) in enumerate(vals.items()):
        c = _COLORS[i % len(_COLORS)]
        left = cvar(torch.as_tensor(r), level, "left")
        right = cvar(torch.as_tensor(r), level, "right")
        ax.hist(r, bins=edges, density=True, histtype="stepfilled", alpha=0.25, color=c)
        ax.hist(r, bins=edges, density=True, histtype="step", lw=1.2, color=c,
                label=f"{name}: mean {r.mean():.3g}, CVaR{pct}% left {left:.3g} / right {right:.3g}")
        ax.axvline(r.mean(), color=c, lw=1.2)
        ax.axvline(left, color=c, lw=1.0, ls="--")
        ax.axvline(right, color=c, lw=1.0, ls=":")
    ax.set_xlabel("reward")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"reward distributions (solid: mean, dashed: left CVaR, dotted: right CVaR, "
                          f"β = {level:g})", fontsize=9)
    return _save(fig, path_png)
