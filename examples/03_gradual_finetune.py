"""Move a pretrained model toward samples of a new target by Gradual Fine-Tuning (GFT).

GFT regresses on the mixture of the target and the pretrained model, (p_tgt + τ p_pre)/(1 + τ),
and cools the temperature τ toward 0 over a few stages, so the model travels from p_pre to the
target through intermediate laws instead of jumping (Thorkelsdottir & Banerjee, arXiv 2601.22495).
Here the target is the 2-D mixture shifted toward x₁ + 0.5·x₂, known only through samples.

    python examples/03_gradual_finetune.py        # about 15 s on one CPU thread
"""

import os

import torch

import tiltflow as tilt

FAST = os.environ.get("TILTFLOW_EXAMPLE_FAST") == "1"   # a smaller run, for the test suite

task = tilt.toy2d.get_task("mixture")
base = tilt.pretrain(task, iters=200 if FAST else 1000, progress=False)
target = task.tilt_linear(torch.tensor([1.0, 0.5]), 1.0)            # any law known by its samples
y = target.sample(4000, torch.Generator().manual_seed(0))

# coupling="ot" (minibatch optimal transport) straightens the paths; it needs pip install 'tiltflow[ot]'
ft = tilt.gradual_finetune(base, y, schedule="geometric", coupling="independent", stages=4,
                           iters_per_stage=25 if FAST else 150, batch_size=128, progress=False)

# energy distance: 0 for equal laws; the estimate is unbiased, so ±noise (even < 0) near 0
n = 500 if FAST else 2000
y_eval = target.sample(n, torch.Generator().manual_seed(1))
print("energy distance to the target")
for name, x in [("pretrained", base.sample(n, steps=50, seed=1)), ("GFT", ft.sample(n, steps=50, seed=1)),
                ("exact", target.sample(n, torch.Generator().manual_seed(2)))]:
    print(f"  {name:10s} {tilt.metrics.energy_distance(x, y_eval):8.4f}")
