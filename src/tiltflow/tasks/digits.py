"""The digits task: scikit-learn's bundled 8×8 handwritten digits, offline and CPU-sized.

    from tiltflow.tasks import digits
    base = digits.pretrain_base(iters=1500)                    # class-conditional U-Net flow
    r = digits.reward()                                        # r(x, cond) = log p_clf(digit | x)
    ft = tilt.finetune(base, tilt.CVaR(r, 0.1, tail="left"), lam=0.1, prompts=digits.prompts())
    x, c = digits.sample(ft, per_digit=8)                      # (80, 1, 8, 8), one-hot (80, 10)

Data: the 1797 images of sklearn.datasets.load_digits (no download; pip install
'tiltflow[digits]'), grey levels 0..16 mapped to [-1, 1] by v/8 − 1, optionally dequantised by
uniform noise of one grey level (2/16) so the flow learns a density rather than 17 atoms.
Conditions are one-hot rows (n, 10); a fine-tuning run takes `prompts()`, the ten one-hot rows.

Reward: a small CNN classifier trained here (seeded, 10-20 s on one thread, label smoothing 0.1,
97-98 % held-out accuracy; cached as safetensors under $TILTFLOW_CACHE/digits or
~/.cache/tiltflow/digits), and

    r(x, c) = log softmax(f(x))[d(c)]          d(c) = the digit requested by the condition c

differentiable in x. Diversity: the mean pairwise Euclidean distance of the classifier's
penultimate features (64-dimensional), within each digit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .. import estimators
from ..metrics import cvar, mean_pairwise_distance
from ..models.flow_model import FlowModel
from ..models.unet import FixedCondVelocity, SmallUNetVelocity
from ..utilities import Entropy

__all__ = ["DigitClassifier", "DigitReward", "RewardEntropy", "accuracy", "bind_digit", "classifier", "dequantize",
           "diversity", "evaluate", "grid_image", "load", "one_hot", "path_kl", "plot_grids", "pretrain_base",
           "prompts", "reward", "sample", "train_classifier", "training_data"]

NUM_CLASSES = 10
SHAPE = (1, 8, 8)
GREY_STEP = 2.0 / 16.0        # one grey level after scaling 0..16 to [-1, 1]
CACHE_VERSION = 2             # bump when the classifier recipe changes, so old caches are not reused
_MISSING = "the digits task needs scikit-learn (its bundled 8×8 digits): pip install 'tiltflow[digits]'"


# --- data ------------------------------------------------------------------------------------

def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return load_digits()


def load(split: str = "all", test_fraction: float = 0.2, seed: int = 0):
    """The digits as (x (n, 1, 8, 8) float32 in [-1, 1], labels (n,) int64).

    split: "all", "train" or "test": a seeded permutation puts `test_fraction` of the images in
    the test split (held out from the classifier and from pretrain_base).
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    d = _load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0   # 0..16 -> [-1, 1]
    y = torch.as_tensor(d.target, dtype=torch.int64)
    if split == "all":
        return x, y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return x[idx], y[idx]


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + U(−½, ½)·(2/16): spreads each grey level over its bin (x: (n, 1, 8, 8))."""
    return x + (torch.rand(x.shape, generator=generator, device=x.device) - 0.5) * GREY_STEP


def one_hot(labels) -> torch.Tensor:
    """labels (n,) of digits 0..9 -> (n, 10) float32 one-hot rows; ValueError outside 0..9."""
    labels = torch.as_tensor(labels)
    if labels.ndim == 0:
        labels = labels[None]
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers of shape (n,), got dtype {labels.dtype}, shape {tuple(labels.shape)}")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.numel():
        raise ValueError(f"digits must be in 0..9, got {int(bad[0])}")
    return nn.functional.one_hot(labels.long(), NUM_CLASSES).float()


def prompts(digits=range(NUM_CLASSES)) -> list[torch.Tensor]:
    """One-row conditions (1, 10), one per digit: finetune(..., prompts=prompts())."""
    return [one_hot([d]) for d in _digits(digits)]


def _digits(digits) -> list[int]:
    ds = [digits] if isinstance(digits, int) else list(digits)
    for d in ds:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < NUM_CLASSES:
            raise ValueError(f"digits must be integers in 0..9, got {d!r}")
    if not ds:
        raise ValueError("digits must not be empty")
    return ds


def training_data(copies: int = 4, seed: int = 0, dequantise: bool = True):
    """Pretraining rows: (x (copies·n, 1, 8, 8), cond (copies·n, 10)) from the train split,
    each copy with its own dequantisation noise (pretrain draws rows of a fixed tensor)."""
    if isinstance(copies, bool) or not isinstance(copies, int) or copies <= 0:
        raise ValueError(f"copies must be a positive integer, got {copies!r}")
    x, y = load("train")
    g = torch.Generator().manual_seed(seed)
    xs = [dequantize(x, g) if dequantise else x for _ in range(copies)]
    return torch.cat(xs), one_hot(y).repeat(copies, 1)


# --- classifier ------------------------------------------------------------------------------

class DigitClassifier(nn.Module):
    """CNN on (batch, 1, 8, 8): 8×8 -> 4×4 -> 2×2 convolutions, a 64-feature layer, 10 logits.

    SiLU activations (smooth: the reward's gradient drives fine-tuning).
    """

    def __init__(self, width: int = 16, features: int = 64):
        super().__init__()
        self.width, self.n_features = width, features
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(8 * w, features), nn.SiLU())
        self.head = nn.Linear(features, NUM_CLASSES)

    def config(self) -> dict:
        return {"width": self.width, "features": self.n_features}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, 1, 8, 8) -> penultimate features (batch, features)."""
        _check_images(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, 1, 8, 8) -> logits (batch, 10)."""
        return self.head(self.features(x))


def _check_images(x):
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != SHAPE or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be digit images of shape (n, 1, 8, 8), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")


def train_classifier(seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3,
                     noise: float = 0.1, label_smoothing: float = 0.1) -> DigitClassifier:
    """Train a DigitClassifier on the train split (deterministic for a seed on one machine).

    Each epoch sees freshly dequantised images plus N(0, noise²) pixel noise: the classifier then
    also ranks the slightly noisy images a flow produces, and its gradient is smoother. Label
    smoothing keeps log p(d | x) off its ceiling 0 for clean digits (a saturated reward has no
    upper tail for right-CVaR to act on; the cap is ≈ log 0.91 at smoothing 0.1).
    """
    x, y = load("train", seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(y) / batch_size))
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            xb = dequantize(x[idx], g) + noise * torch.randn(x[idx].shape, generator=g)
            loss = nn.functional.cross_entropy(clf(xb), y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    clf.eval()
    clf.requires_grad_(False)
    return clf


@torch.no_grad()
def accuracy(clf: DigitClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of x (n, 1, 8, 8) that clf assigns to labels (n,)."""
    return float((clf(x).argmax(1) == labels).double().mean())


def _cache_dir(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("TILTFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tiltflow")
    return Path(root) / "digits"


def classifier(seed: int = 0, cache_dir=None, use_cache: bool = True) -> DigitClassifier:
    """The reward's classifier: loaded from the safetensors cache, or trained (seeded) and cached.

    Returned in eval mode without parameter gradients (rewards differentiate in x only).
    """
    from safetensors.torch import load_file, save_file

    path = _cache_dir(cache_dir) / f"classifier_v{CACHE_VERSION}_seed{seed}.safetensors"
    if use_cache and path.is_file():
        clf = DigitClassifier()
        clf.load_state_dict(load_file(str(path)))
        clf.eval()
        clf.requires_grad_(False)
        return clf
    clf = train_classifier(seed)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        x, y = load("test")
        meta = {"config": json.dumps(clf.config()), "seed": str(seed),
                "test_accuracy": f"{accuracy(clf, x, y):.4f}"}
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    return clf


# --- reward and diversity --------------------------------------------------------------------

def _requested(digit, cond, n: int) -> torch.Tensor:
    """The digit each row asks for, (n,) int64: `digit` if fixed, else read from cond."""
    if digit is not None:
        return torch.full((n,), digit, dtype=torch.int64)
    if cond is None:
        raise ValueError("this reward reads the requested digit from cond (one-hot (n, 10)); got cond=None "
                         "(pass cond, or fix the digit with reward(digit=d))")
    if not isinstance(cond, torch.Tensor):
        raise ValueError(f"cond must be a tensor, one-hot (n, 10) or digits (n,), got {type(cond).__name__}")
    if cond.is_floating_point():
        if cond.ndim != 2 or cond.shape[1] != NUM_CLASSES or cond.shape[0] not in (1, n):
            raise ValueError(f"cond must be one-hot of shape ({n}, 10) or (1, 10), got {tuple(cond.shape)}")
        labels = cond.argmax(1)
    else:
        labels = cond.reshape(-1)
        if labels.shape[0] not in (1, n):
            raise ValueError(f"cond must hold 1 or {n} digits, got shape {tuple(cond.shape)}")
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
        if bad.numel():
            raise ValueError(f"digits must be in 0..9, got {int(bad[0])}")
    return labels.long().expand(n) if labels.shape[0] == 1 else labels.long()


class DigitReward:
    """r(x, cond) = log p_clf(d | x) = log softmax(f(x))_d, d the requested digit; (n,).

    x: (n, 1, 8, 8). d: fixed by `digit`, else from cond (one-hot (n, 10) or (1, 10), or integer
    digits (n,)). Differentiable in x; at most 0 (0 = certain).
    """

    def __init__(self, clf: DigitClassifier, digit: int | None = None):
        if digit is not None:
            _digits([digit])
        self.clf, self.digit = clf, digit

    def __call__(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        _check_images(x)
        d = _requested(self.digit, cond, x.shape[0]).to(x.device)
        logp = torch.log_softmax(self.clf.to(x.device)(x), dim=1)
        return logp.gather(1, d[:, None])[:, 0]

    def __repr__(self) -> str:
        return f"DigitReward(digit={self.digit})" if self.digit is not None else "DigitReward(digit=cond)"


def reward(digit: int | None = None, seed: int = 0, cache_dir=None) -> DigitReward:
    """The digits reward log p_clf(requested digit | x) with the cached classifier of `seed`."""
    return DigitReward(classifier(seed, cache_dir), digit)


@torch.no_grad()
def diversity(x: torch.Tensor, clf: DigitClassifier) -> float:
    """Mean pairwise distance of the classifier's penultimate features of x (n, 1, 8, 8), n >= 2."""
    return mean_pairwise_distance(clf.features(x))


class RewardEntropy:
    """FDC utility F(p) = E_p r + α·H(p), δF/δp(x) = r(x) − α·log p(x) (utilities.Entropy).

    With D = KL and weight λ the optimum is p* ∝ p_pre^{λ/(λ+α)}·exp(r/(λ+α)): a tilt of a
    *tempered* base, more spread than the plain tilt at λ + α. curvature α gives fdc's default
    step γ = 1/(λ + α), which reaches it in one outer iteration (fdc module docstring).
    """

    needs_samples = False

    def __init__(self, reward, alpha: float = 1.0, eps: float = 0.02, steps: int = 50):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.reward, self.alpha, self.curvature = reward, float(alpha), float(alpha)
        self.entropy = Entropy(eps, steps)

    def value(self, samples: torch.Tensor, model) -> float:
        with torch.no_grad():
            r = float(self.reward(samples).double().mean())
        return r + self.alpha * self.entropy.value(samples, model)

    def first_variation(self, x: torch.Tensor, model, samples=None) -> torch.Tensor:
        return self.reward(x) + self.alpha * self.entropy.first_variation(x, model)

    def __repr__(self) -> str:
        return f"RewardEntropy({self.reward!r}, alpha={self.alpha:g})"


# --- models ----------------------------------------------------------------------------------

def pretrain_base(iters: int = 1500, *, channels=(16, 32), batch_size: int = 128, lr: float = 2e-3,
                  copies: int = 4, seed: int = 0, device="auto", out=None, resume: bool = False,
                  progress: bool = True, steps: int | None = None, **kwargs) -> FlowModel:
    """Pretrain the class-conditional U-Net flow on the train split (tilt.pretrain with a ready
    SmallUNetVelocity and one-hot cond) for `iters` optimiser steps. kwargs: other pretrain options
    (ema, lr_warmup, ...). Deprecated: steps= (use iters=)."""
    from ..methods.pretrain import pretrain
    from ..validation import renamed
    if steps is not None:
        iters = renamed("steps", "iters", steps, iters, 1500, "pretrain_base")

    x, c = training_data(copies, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallUNetVelocity(size=8, in_channels=1, channels=tuple(channels), num_classes=NUM_CLASSES)
    return pretrain(x, iters, network=net, cond=c, batch_size=batch_size, lr=lr, seed=seed, device=device,
                    out=out, resume=resume, progress=progress, **kwargs)


def bind_digit(model: FlowModel, digit: int) -> FlowModel:
    """The class-conditional model at one digit as an unconditional FlowModel (copied net), for
    methods that take no condition (fdc)."""
    _digits([digit])
    if isinstance(model.net, FixedCondVelocity):
        raise ValueError("this model already has its digit fixed")
    net = FixedCondVelocity(model.copy().net, one_hot([digit]))
    return FlowModel(net, model.path, model.shape).to(model.device)


def _bound_digit(model: FlowModel) -> int | None:
    return int(model.net.cond.argmax()) if isinstance(model.net, FixedCondVelocity) else None


@torch.no_grad()
def sample(model: FlowModel, per_digit: int = 8, digits=range(NUM_CLASSES), steps: int = 50, seed: int = 0):
    """per_digit ODE samples of each digit: (x (len(digits)·per_digit, 1, 8, 8), cond one-hot rows).

    Rows are grouped by digit. A model bound to one digit (bind_digit) samples only that one.
    """
    bound = _bound_digit(model)
    ds = [bound] if bound is not None else _digits(digits)
    c = one_hot(torch.tensor(ds).repeat_interleave(per_digit)).to(model.device)
    x = model.sample(len(c), steps=steps, seed=seed, cond=None if bound is not None else c)
    return x, c


@torch.no_grad()
def path_kl(model: FlowModel, base: FlowModel, n: int = 256, steps: int = 50, seed: int = 0, cond=None) -> float:
    """KL(Q‖P) of the two models' memoryless chains (exponential steps), Monte Carlo over n paths
    of Q: E_Q[Σ_i log q(X_{i+1}|X_i) − log p(X_{i+1}|X_i)] (estimators.path_rollout). By the data
    processing inequality it bounds KL(q_1‖p_1) of the samples from above; 0 for Q = P."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    xs, log_q = estimators.path_rollout(model, n, grid, gen, cond)
    return float((log_q - estimators.base_log_path(base, xs, grid, cond)).mean())


def evaluate(model: FlowModel, clf: DigitClassifier, base: FlowModel | None = None, per_digit: int = 200,
             digits=range(NUM_CLASSES), steps: int = 50, seed: int = 0, n_kl: int = 100,
             levels=(0.05, 0.1, 0.2)) -> dict:
    """Rewards log p_clf(d | x) of per_digit ODE samples per digit (pooled): mean (and its
    standard error), accuracy
    (argmax = d), right/left CVaR at `levels`; diversity: the mean over digits of the
    within-digit feature distance; kl_path: path KL to `base` per digit (n_kl paths), averaged.

    A model bound to one digit (bind_digit) is evaluated at that digit; `base` may be bound or
    class-conditional.
    """
    bound = _bound_digit(model)
    ds = [bound] if bound is not None else _digits(digits)
    r_all, divs, kls, hits = [], [], [], 0
    r_fn = DigitReward(clf)
    for i, d in enumerate(ds):
        x, c = sample(model, per_digit, [d], steps, seed + i)
        with torch.no_grad():
            r_all.append(r_fn(x, c).cpu())
            hits += int((clf(x).argmax(1) == d).sum())
        divs.append(diversity(x, clf))
        if base is not None and n_kl > 0:
            m_c = None if bound is not None else c[:1]
            b_c = None if _bound_digit(base) is not None else c[:1]
            if (m_c is None) == (b_c is None):
                kls.append(path_kl(model, base, n_kl, steps, seed + 100 + i, m_c))
            else:   # one bound, one conditional: compare through the conditional one bound too
                mm = model if bound is not None else bind_digit(model, d)
                bb = base if b_c is None else bind_digit(base, d)
                kls.append(path_kl(mm, bb, n_kl, steps, seed + 100 + i))
    r = torch.cat(r_all)
    out = {"n": int(r.numel()), "digits": ds, "reward_mean": float(r.double().mean()),
           "reward_se": float(r.double().std() / math.sqrt(r.numel())),   # standard error of the mean
           "accuracy": hits / r.numel(),
           "diversity": sum(divs) / len(divs)}
    for lv in levels:
        key = f"{round(100 * lv):02d}"
        out[f"cvar_right_{key}"] = cvar(r, lv, "right")
        out[f"cvar_left_{key}"] = cvar(r, lv, "left")
    if kls:
        out["kl_path"] = sum(kls) / len(kls)
    return out


# --- pictures --------------------------------------------------------------------------------

def grid_image(x: torch.Tensor, ncols: int, pad: int = 1):
    """Images x (n, 1, 8, 8) tiled row by row into one array (rows·9 − 1, ncols·9 − 1), with
    `pad` pixels of background between them; values clipped to [-1, 1]."""
    import numpy as np

    _check_images(x)
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols <= 0:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
    a = x.detach().cpu().clamp(-1, 1).numpy()[:, 0]
    n, h, w = a.shape
    rows = math.ceil(n / ncols)
    out = np.full((rows * (h + pad) - pad, ncols * (w + pad) - pad), -1.0)
    for i in range(n):
        r, c = divmod(i, ncols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = a[i]
    return out


def plot_grids(path_png, panels: dict, ncols: int, title: str | None = None, captions: dict | None = None) -> Path:
    """Side-by-side image grids, e.g. {"base": x0, "expected": x1, ...}, each (n, 1, 8, 8) tiled
    with `ncols` images a row (rows = digits when x comes from sample()). captions: optional
    name -> text under each panel. Needs matplotlib (pip install 'tiltflow[plot]')."""
    from ..plots import _figure, _save

    if not panels:
        raise ValueError("panels must hold at least one name -> images entry")
    fig, axes = _figure(len(panels), 1, panel=(3.2, 3.5))
    for ax, (name, x) in zip(axes[0], panels.items()):
        ax.imshow(grid_image(x, ncols), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if captions and name in captions:
            ax.set_xlabel(captions[name], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path_png)
