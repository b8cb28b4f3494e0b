"""What do expected-reward, left-CVaR and right-CVaR fine-tuning do to the 2-D mixture at λ = 3,
against the exact tilt?

Runs `tiltflow demo` with its default settings (pretrain an MLP flow on the `mixture` task, then
fine-tune it by expected reward, left CVaR and right CVaR of r(x) = x₁ + 0.5·x₂ at β = 0.1, 300
Adjoint Matching iterations each) in a temporary folder, and writes

  results/demo.json   the demo's summary.json: per model (base, expected, cvar-left, cvar-right,
                      exact tilt) reward mean, CVaR₁₀ left and right, KL to the base, diversity and
                      the energy distance to the exact tilt where it is the model's target; the
                      command, the settings, timings and the environment;
  results/demo.png    the demo's samples.png: samples of every model over the reward's contours.

The docs' demo table is generated from results/demo.json.

    python benchmarks/demo.py          # about 1–2 min on one thread
    python benchmarks/demo.py --fast   # `demo --fast` (~20 s): results/demo_fast.json, demo_fast.png
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, setup_torch, write_json  # noqa: E402

from tiltflow import cli  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fast", action="store_true", help="the demo's --fast settings; writes demo_fast.json")
    args = p.parse_args(argv)
    setup_torch(1)
    name = "demo_fast" if args.fast else "demo"
    options = ["--fast"] if args.fast else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        code = cli.main(["demo", *options, "--out", str(out), "--no-progress"])
        if code != 0:
            return code
        summary = json.loads((out / "summary.json").read_text())
        # the run folder is temporary: the command that reproduces the numbers is the plain one
        summary["command"] = shlex.join(["tiltflow", "demo", *options])
        path = write_json(name, {"question": " ".join(__doc__.split("\n\n")[0].split()), **summary})
        if (out / "samples.png").is_file():
            shutil.copyfile(out / "samples.png", RESULTS / f"{name}.png")
    header = ["model", "reward mean", "CVaR₁₀ left", "CVaR₁₀ right", "KL", "diversity", "energy distance"]
    keys = ["reward_mean", "cvar_left", "cvar_right", "kl", "diversity", "energy_distance"]
    print_table([[m, *(("—" if s[k] is None else s[k]) for k in keys)] for m, s in summary["models"].items()], header)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
