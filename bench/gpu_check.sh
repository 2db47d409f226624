#!/usr/bin/env bash
# One prepared check for a CUDA machine, within 8 minutes: the test suite, then every method's step
# time on ViT-B/16 (random weights, generated 224 px images) at batch 128 under bf16 autocast, written
# into bench/RESULTS.md's "Step time" section as the GPU table (key step-ViT-B-16-cuda).
#   bash bench/gpu_check.sh            # on the GPU box, from a checkout with requirements.txt installed
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA device"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
start=$(date +%s)
timeout 300 python -m pytest -q -x tests 2>&1 | tail -n 5
echo "tests: $(( $(date +%s) - start )) s"
timeout 170 python bench/step_time.py --model ViT-B-16 --fake-data 224 --batch-size 128 --device cuda --rounds 3 --steps 3
echo "total: $(( $(date +%s) - start )) s"
