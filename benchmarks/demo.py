"""What do expected-reward, left-CVaR and right-CVaR fine-tuning do to the 2-D mixture at λ = 3,
against the exact tilt?

Runs `tiltflow demo --out benchmarks/results/demo` with the demo's default settings (pretrain an
MLP flow on the `mixture` task, then fine-tune it by expected reward, left CVaR and right CVaR of
r(x) = x₁ + 0.5·x₂ at β = 0.1, 300 Adjoint Matching iterations each) on one torch thread. The
demo writes its own folder there; the docs read its summary directly:

  results/demo/summary.json   per model (base, expected, cvar-left, cvar-right, exact tilt) reward
                              mean, CVaR₁₀ left and right, KL to the base, diversity and the energy
                              distance to the exact tilt where it is the model's target; the
                              command, the settings, timings and the environment;
  results/demo/samples.png    samples of every model over the reward's contours;
  results/demo/reward_hist.png
  results/demo/pre/, expected/, …   the run folders (checkpoints; not tracked by git).

A previous results/demo/ is replaced. The same command with `--out runs/demo` (the README's) is
a user's own run with the same files.

    python benchmarks/demo.py          # about 1–2 min on one thread
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, setup_torch  # noqa: E402

from tiltflow import cli  # noqa: E402


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    setup_torch(1)
    out = RESULTS / "demo"
    if out.exists():
        shutil.rmtree(out)
    os.chdir(RESULTS.parent.parent)     # the repository root: the summary's command is the one to rerun
    code = cli.main(["demo", "--out", str(out.relative_to(Path.cwd())), "--no-progress"])
    if code != 0:
        return code
    summary = json.loads((out / "summary.json").read_text())
    header = ["model", "reward mean", "CVaR₁₀ left", "CVaR₁₀ right", "KL", "diversity", "energy distance"]
    keys = ["reward_mean", "cvar_left", "cvar_right", "kl", "diversity", "energy_distance"]
    print_table([[m, *(("—" if s[k] is None else s[k]) for k in keys)] for m, s in summary["models"].items()], header)
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
