"""What does one Adjoint Matching iteration cost relative to one memoryless-SDE rollout of the
same batch *with gradients* (backpropagating the reward through the rollout, as reward-backprop
methods such as DRaFT/ReFL do)?

Model: MLPVelocity (256, 256, 256) pretrained on toy2d "mixture" (1500 steps); the fine-tuned
model is a full copy (finetune's init "copy"), the frozen base is the pretrained model. Reward
r(x) = (1, 0.5)·x, λ = 1, batch 256, 100 memoryless-SDE steps (exponential scheme). Timed, on
the same model, interleaved repeat by repeat so that load on the shared machine hits all alike:

  (a) reward backprop: rollout of the fine-tuned model with the autograd graph kept
      (integrators.memoryless_solve), then −mean r(X_1) backward through all 100 steps,
      gradient clipping and an Adam step;  split into "rollout with graph" and "backward + step".
  (b) one AM iteration, the calls of methods/finetune.py's loop timed directly:
      rollout (no grad, am.rollout) | terminal + loss times + lean adjoint (100 VJPs of the base,
      which hand over the base velocity at the loss times) | adjoint_matching_loss (the fine-tuned
      forward only) + backward + clipping + Adam step;
      for n_loss_times = None (all 99 interior times) and 25.

The headline is time(b) / time(a) (target ≤ 3), as the median over repeats of the per-repeat
ratio. As a cross-check, `tiltflow.finetune` itself is run for a few iterations and the medians
of its callback timings (time_rollout / time_adjoint / time_loss) are reported too, with
init="copy" (the same model as (b)) and with the default init="auto" (which trains whatever
`make_finetune_model` picks; the JSON records the network class it built). The loop is not
interleaved with (a), so its ratios carry the machine's load drift.

Writes results/am_cost.json and results/am_cost.png: a stacked bar of where the time of one
iteration goes, for (a), (b) at both n_loss_times, and the finetune loop's own timings.

    python benchmarks/am_cost.py            # full (~2-3 min)
    python benchmarks/am_cost.py --quick    # smoke test (~30 s)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import tiltflow as tilt  # noqa: E402
from tiltflow import integrators  # noqa: E402
from tiltflow.methods.finetune import make_finetune_model  # noqa: E402
from tiltflow.solvers import adjoint_matching as am  # noqa: E402

NAME = "am_cost"


@dataclass
class Config:
    pretrain_steps: int = 1500
    hidden: tuple = (256, 256, 256)
    batch_size: int = 256
    steps: int = 100
    lam: float = 1.0
    a: tuple = (1.0, 0.5)
    lr: float = 1e-3
    grad_clip: float = 1.0
    n_loss_times: tuple = (None, 25)
    repeats: int = 15
    warmup: int = 2
    finetune_iters: int = 15          # iterations of the library loop for the cross-check
    finetune_inits: tuple = ("copy", "auto")
    seed: int = 0


def quick() -> Config:
    return Config(pretrain_steps=200, repeats=3, warmup=1, finetune_iters=4)


def _step(opt, params, clip):
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def time_backprop(ft, reward, grid, gen, opt, params, cfg) -> dict:
    """(a): rollout with the graph, backward of −mean r(X_1) through it, clip, Adam step."""
    t0 = time.perf_counter()
    x = integrators.memoryless_solve(ft.path, lambda z, t: ft.velocity(z, t), ft.prior(cfg.batch_size, gen),
                                     grid, gen)
    loss = -reward(x).mean()
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _step(opt, params, cfg.grad_clip)
    t2 = time.perf_counter()
    return {"rollout_graph": t1 - t0, "backward_step": t2 - t1, "total": t2 - t0}


def time_am(ft, base, reward, grid, gen, opt, params, cfg, n_loss_times) -> dict:
    """(b): one iteration of the finetune loop (methods/finetune.py), phase by phase."""
    t0 = time.perf_counter()
    ft.eval()
    ro = am.rollout(ft, cfg.batch_size, grid, gen)
    t1 = time.perf_counter()
    a1, _ = am.terminal_adjoint(reward, ro.xs[-1], cfg.lam)
    idx, w = am.loss_times(cfg.steps, n_loss_times, gen)
    adj, v_base = am.lean_adjoint(base, ro, a1, idx=idx)
    t2 = time.perf_counter()
    ft.train()
    loss, _ = am.adjoint_matching_loss(ft, base, ro, adj, idx, w, v_base)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _step(opt, params, cfg.grad_clip)
    t3 = time.perf_counter()
    return {"rollout": t1 - t0, "adjoint": t2 - t1, "loss_backward_step": t3 - t2, "total": t3 - t0,
            "n_times": len(idx)}


def _med(rows, key):
    return statistics.median(r[key] for r in rows)


def run(cfg: Config) -> dict:
    _common.setup_torch(1)
    task = tilt.toy2d.get_task("mixture")
    t0 = time.perf_counter()
    base = tilt.pretrain(task, iters=cfg.pretrain_steps, hidden=cfg.hidden, seed=cfg.seed, progress=False)
    pretrain_s = time.perf_counter() - t0
    base.requires_grad_(False)
    reward = tilt.rewards.Linear(list(cfg.a))
    grid = integrators.time_grid(cfg.steps)

    # Separate model/optimiser per method so one method's updates do not change the other's work.
    def fresh():
        ft = make_finetune_model(base, "copy")
        params = [p for p in ft.parameters() if p.requires_grad]
        return ft, params, torch.optim.Adam(params, lr=cfg.lr)

    gen = torch.Generator().manual_seed(cfg.seed)
    bp_model = fresh()
    am_models = {n: fresh() for n in cfg.n_loss_times}
    key = lambda n: "all" if n is None else str(n)  # noqa: E731
    rows = {"backprop": [], **{key(n): [] for n in cfg.n_loss_times}}
    for rep in range(cfg.warmup + cfg.repeats):
        r_bp = time_backprop(*bp_model[:1], reward, grid, gen, bp_model[2], bp_model[1], cfg)
        r_am = {key(n): time_am(m[0], base, reward, grid, gen, m[2], m[1], cfg, n) for n, m in am_models.items()}
        if rep >= cfg.warmup:
            rows["backprop"].append(r_bp)
            for k, v in r_am.items():
                v["ratio_to_backprop"] = v["total"] / r_bp["total"]
                rows[k].append(v)

    bp = {k: _med(rows["backprop"], k) for k in ("rollout_graph", "backward_step", "total")}
    am_res = {}
    for n in cfg.n_loss_times:
        rs = rows[key(n)]
        am_res[key(n)] = {"n_loss_times": n, "n_times": rs[0]["n_times"],
                          **{k: _med(rs, k) for k in ("rollout", "adjoint", "loss_backward_step", "total")},
                          "ratio_to_backprop_median": _med(rs, "ratio_to_backprop"),
                          "ratio_of_medians": _med(rs, "total") / bp["total"],
                          "ratio_to_backprop_range": [min(r["ratio_to_backprop"] for r in rs),
                                                      max(r["ratio_to_backprop"] for r in rs)]}

    # Cross-check with the library loop: its own per-phase timings from the callback, with the
    # same full-copy model as above (init="copy") and with finetune's default init="auto".
    loop = {}
    for init in cfg.finetune_inits:
        for n in cfg.n_loss_times:
            recs = []
            ft = tilt.finetune(base, tilt.ExpectedReward(reward), lam=cfg.lam, iters=cfg.finetune_iters + 1,
                               batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, n_loss_times=n,
                               seed=cfg.seed, init=init, progress=False,
                               callback=lambda it, rec: recs.append(rec))
            recs = recs[1:]                       # the first iteration warms up
            total = statistics.median(r["time_rollout"] + r["time_adjoint"] + r["time_loss"] for r in recs)
            loop[f"{init}/{key(n)}"] = {
                "init": init, "net": type(ft.net).__name__, "n_loss_times": n,
                "trained_params": sum(p.numel() for p in (ft.net.residual if isinstance(
                    ft.net, tilt.ResidualVelocity) else ft.net).parameters()),
                "rollout": _med(recs, "time_rollout"), "adjoint": _med(recs, "time_adjoint"),
                "loss_backward_step": _med(recs, "time_loss"), "total": total,
                "ratio_to_median_backprop": total / bp["total"]}
    return {"config": asdict(cfg), "pretrain_s": pretrain_s, "backprop": bp, "am": am_res,
            "finetune_loop": loop, "repeats": rows}


def plot(res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bp, amr, loop = res["backprop"], res["am"], res["finetune_loop"]
    # (name, stacked (label, seconds, colour) parts, headline total, headline ratio to (a))
    bars = [("(a) reward backprop\nthrough rollout", [("rollout with graph", bp["rollout_graph"], "#9ecae1"),
                                                    ("backward + step", bp["backward_step"], "#3182bd")],
             bp["total"], 1.0)]
    am_colors = {"rollout": "#fdae6b", "adjoint": "#e6550d", "loss_backward_step": "#74c476"}
    am_labels = {"rollout": "AM rollout (no grad)", "adjoint": "lean adjoint (100 VJPs)",
                 "loss_backward_step": "AM loss + backward + step"}
    for src, tag, rkey in ((amr, "(b) AM, timed", "ratio_to_backprop_median"),
                           (loop, "finetune loop", "ratio_to_median_backprop")):
        for v in src.values():
            times = "all 99" if v["n_loss_times"] is None else str(v["n_loss_times"])
            name = tag if "init" not in v else \
                f"{tag}\ninit={v['init']} ({'residual' if v['net'] == 'ResidualVelocity' else 'copy'})"
            bars.append((f"{name}\n{times} loss times",
                         [(am_labels[p], v[p], am_colors[p]) for p in ("rollout", "adjoint", "loss_backward_step")],
                         v["total"], v[rkey]))
    fig, ax = plt.subplots(figsize=(12, 5))
    seen = set()
    for i, (name, parts, total, ratio) in enumerate(bars):
        bottom = 0.0
        for lab, val, col in parts:   # medians of the phases: their sum is close to, not equal to, the total
            ax.bar(i, val, bottom=bottom, color=col, label=None if lab in seen else lab,
                   hatch="//" if name.startswith("finetune") else None, edgecolor="white")
            seen.add(lab)
            bottom += val
        ax.text(i, bottom, f"{total * 1e3:.0f} ms\n{ratio:.2f}× (a)", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("seconds per iteration (median)")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.15)
    c = res["config"]
    ax.set_title(f"One AM iteration vs reward backprop through the rollout — MLP {tuple(c['hidden'])}, "
                 f"batch {c['batch_size']}, {c['steps']} steps, 1 thread", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-size run")
    args = p.parse_args(argv)
    cfg = quick() if args.quick else Config()
    print(f"{NAME}: {cfg}", flush=True)
    res = {"quick": args.quick, **run(cfg)}
    path = _common.write_json(NAME, res)
    png = _common.save_figure(plot(res), NAME)
    bp = res["backprop"]
    print(f"\n(a) reward backprop: {bp['total'] * 1e3:.1f} ms  (rollout with graph "
          f"{bp['rollout_graph'] * 1e3:.1f}, backward + step {bp['backward_step'] * 1e3:.1f})")
    rows = [["(b) timed", v["n_times"], v["rollout"] * 1e3, v["adjoint"] * 1e3, v["loss_backward_step"] * 1e3,
             v["total"] * 1e3, v["ratio_to_backprop_median"]] for v in res["am"].values()]
    rows += [[f"loop init={v['init']}", 99 if v["n_loss_times"] is None else v["n_loss_times"], v["rollout"] * 1e3,
              v["adjoint"] * 1e3, v["loss_backward_step"] * 1e3, v["total"] * 1e3,
              v["ratio_to_median_backprop"]] for v in res["finetune_loop"].values()]
    _common.print_table(rows, ["AM", "loss times", "rollout ms", "adjoint ms", "loss+bwd ms", "total ms",
                               "(b)/(a)"])
    print(f"\nwrote {path}\nwrote {png}")
    return res


if __name__ == "__main__":
    main()
