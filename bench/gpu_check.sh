#!/usr/bin/env bash
# One prepared check for a CUDA machine, within 9 minutes: the test suite, every method's step time on
# ViT-B/16 (random weights, generated 224 px images) at batch 128 under bf16 autocast (bench/RESULTS.md,
# "Step time", key step-ViT-B-16-cuda), and ViT-L/14's FT step with and without --grad-checkpointing:
# time and peak memory ("Gradient checkpointing", key ckpt-ViT-L-14-cuda).
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
timeout 150 python bench/grad_checkpointing.py --model ViT-L-14 --batch-size 64 --device cuda --rounds 2 --steps 2
echo "total: $(( $(date +%s) - start )) s"
