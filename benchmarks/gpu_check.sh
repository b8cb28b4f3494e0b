#!/usr/bin/env bash
# The GPU checks in one command: the `cuda` test tier, then benchmarks/gpu_am.py; logs and
# gpu_am.json go to $OUT (default ./gpu_out) and the JSON also to benchmarks/results/.
#
# For a machine with CUDA torch, transformers, peft and accelerate but no diffusers and no network:
# diffusers comes from the git-ignored folder wheels/, filled where pip reaches PyPI with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d wheels diffusers==0.42.1 importlib_metadata==8.7.0
# (its other needs: huggingface_hub>=1.32, safetensors>=0.8, regex, requests, filelock, Pillow, numpy).
# With the device tool: run(command="bash benchmarks/gpu_check.sh", carry=["wheels"]).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" wheels/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available(), 'diffusers', diffusers.__version__)" || exit 1
python3 -m pytest -m cuda -n 0 -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu_am.py --out "$OUT/gpu_am.json" 2>&1 | tee "$OUT/gpu_am.log"
bench=${PIPESTATUS[0]}
cp "$OUT/gpu_am.json" benchmarks/results/gpu_am.json 2>/dev/null
echo "pytest -m cuda: exit $tests; gpu_am.py: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
