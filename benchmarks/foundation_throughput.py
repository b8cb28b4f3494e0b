"""How fast are pretraining and sampling for the 2-D MLP on CPU, and what does log_prob cost
relative to sampling?

Model: the default MLPVelocity (hidden (256, 256, 256), 32-d time embedding) on the rectified
path, pretrained on toy2d "mixture" by `tiltflow.pretrain` (batch 256; the timed runs include the
EMA update and everything else `pretrain` does per step). Then, at a few batch sizes n:

  ODE sampling      FlowModel.sample(n, steps=100)             Heun: 200 velocity evaluations
  SDE sampling      FlowModel.sample(n, steps=100, sde=True)   memoryless SDE: 100 evaluations
  log_prob          FlowModel.log_prob(x, steps=100)           exact divergence, backward Heun:
                                                               200 evaluations + 2 input-VJPs each

Throughput is samples per second of wall clock (median over repeats); the headline ratio is
time(log_prob) / time(ODE sampling) for the same n. One intra-op thread (see _common).

Writes results/foundation_throughput.json and results/foundation_throughput.png: bars of
samples/s (log axis) for pretraining, ODE and SDE sampling and log_prob, grouped by batch size,
annotated with the log_prob / ODE-sampling time ratio.

    python benchmarks/foundation_throughput.py            # full (~2 min)
    python benchmarks/foundation_throughput.py --quick    # smoke test (~20 s)
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

NAME = "foundation_throughput"


@dataclass
class Config:
    pretrain_steps: int = 400          # steps per timed pretraining run
    pretrain_repeats: int = 3
    batch_size: int = 256              # pretraining minibatch
    hidden: tuple = (256, 256, 256)
    sample_sizes: tuple = (256, 2048)  # n for sampling and log_prob
    steps: int = 100                   # integration steps of sampling and log_prob
    repeats: int = 5                   # timed calls per (quantity, n)
    seed: int = 0


def quick() -> Config:
    return Config(pretrain_steps=60, pretrain_repeats=2, sample_sizes=(256,), repeats=2)


def run(cfg: Config) -> dict:
    _common.setup_torch(1)
    task = tilt.toy2d.get_task("mixture")

    pre_times, model = [], None
    for r in range(cfg.pretrain_repeats + 1):           # the first run is a warm-up
        t0 = time.perf_counter()
        model = tilt.pretrain(task, iters=cfg.pretrain_steps, batch_size=cfg.batch_size,
                              hidden=cfg.hidden, seed=cfg.seed, progress=False)
        if r:
            pre_times.append(time.perf_counter() - t0)
    pre = _common.summary(pre_times)
    pretrain = {**pre, "steps": cfg.pretrain_steps, "batch_size": cfg.batch_size,
                "steps_per_s": cfg.pretrain_steps / pre["median_s"],
                "samples_per_s": cfg.pretrain_steps * cfg.batch_size / pre["median_s"]}

    per_n = []
    for n in cfg.sample_sizes:
        x = model.sample(n, steps=cfg.steps, seed=cfg.seed + 1)   # points to evaluate log_prob at
        ode = _common.summary(_common.time_call(lambda: model.sample(n, steps=cfg.steps), cfg.repeats))
        sde = _common.summary(_common.time_call(lambda: model.sample(n, steps=cfg.steps, sde=True), cfg.repeats))
        lp = _common.summary(_common.time_call(lambda: model.log_prob(x, steps=cfg.steps, exact=True),
                                               cfg.repeats))
        rows = {"ode": ode, "sde": sde, "log_prob": lp}
        for v in rows.values():
            v["samples_per_s"] = n / v["median_s"]
        per_n.append({"n": n, **rows,
                      "nfe": {"ode": 2 * cfg.steps, "sde": cfg.steps, "log_prob": 2 * cfg.steps},
                      "ratio_log_prob_over_ode": lp["median_s"] / ode["median_s"],
                      "ratio_log_prob_over_sde": lp["median_s"] / sde["median_s"],
                      "ratio_ode_over_sde": ode["median_s"] / sde["median_s"]})
    return {"config": asdict(cfg), "pretrain": pretrain, "sampling": per_n}


def plot(res: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pre, rows = res["pretrain"], res["sampling"]
    labels = ["pretrain\n(batch %d)" % pre["batch_size"], "ODE sample\nHeun 100", "SDE sample\n100 steps",
              "log_prob exact\nHeun 100"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(rows)
    colors = plt.cm.viridis(np.linspace(0.2, 0.8, len(rows)))
    ax.bar(0, pre["samples_per_s"], width=0.5, color="0.5")
    ax.text(0, pre["samples_per_s"], f"{pre['samples_per_s']:,.0f}", ha="center", va="bottom", fontsize=8)
    for j, (r, c) in enumerate(zip(rows, colors)):
        xs = np.arange(1, 4) + (j - (len(rows) - 1) / 2) * width
        vals = [r["ode"]["samples_per_s"], r["sde"]["samples_per_s"], r["log_prob"]["samples_per_s"]]
        ax.bar(xs, vals, width=width, color=c, label=f"n = {r['n']}")
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(4), labels)
    ax.set_ylabel("samples / s (median, 1 thread)")
    ratio = ", ".join(f"n={r['n']}: {r['ratio_log_prob_over_ode']:.2f}×" for r in rows)
    ax.set_title(f"2-D MLP {tuple(res['config']['hidden'])}: throughput on CPU\n"
                 f"time log_prob / time ODE sampling — {ratio}", fontsize=10)
    ax.legend(title="sampling batch", fontsize=8)
    ax.set_ylim(10, ax.get_ylim()[1] * 2)   # log bars need a stated base
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-size run")
    args = p.parse_args(argv)
    cfg = quick() if args.quick else Config()
    print(f"{NAME}: {cfg}")
    res = {"quick": args.quick, **run(cfg)}
    path = _common.write_json(NAME, res)
    png = _common.save_figure(plot(res), NAME)
    pre = res["pretrain"]
    print(f"\npretraining: {pre['samples_per_s']:.4g} samples/s ({pre['steps_per_s']:.4g} steps/s, "
          f"batch {pre['batch_size']})")
    _common.print_table(
        [[r["n"], r["ode"]["samples_per_s"], r["sde"]["samples_per_s"], r["log_prob"]["samples_per_s"],
          r["ratio_log_prob_over_ode"], r["ratio_ode_over_sde"]] for r in res["sampling"]],
        ["n", "ODE samp/s", "SDE samp/s", "log_prob samp/s", "logp/ODE time", "ODE/SDE time"])
    print(f"\nwrote {path}\nwrote {png}")
    return res


if __name__ == "__main__":
    main()
