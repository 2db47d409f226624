#!/usr/bin/env bash
# One prepared check for a CUDA machine, within 10 minutes: the CUDA-relevant tests, every method's step
# time on ViT-B/16 (random weights, generated 224 px images) at batch 128 under bf16 autocast
# (bench/RESULTS.md, "Step time", key step-ViT-B-16-cuda), ViT-L/14's FT step with and without
# --grad-checkpointing: time and peak memory ("Gradient checkpointing", key ckpt-ViT-L-14-cuda), and
# the data path: decode + transform per worker on this host's cores and the WiSE sweep on ViT-B/16
# decoded once vs once per α ("Data throughput").
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
timeout 200 python -m pytest -q -x tests/test_common.py tests/test_towers.py 2>&1 | tail -n 5
echo "tests: $(( $(date +%s) - start )) s"
timeout 170 python bench/step_time.py --model ViT-B-16 --fake-data 224 --batch-size 128 --device cuda --rounds 3 --steps 3
timeout 150 python bench/grad_checkpointing.py --model ViT-L-14 --batch-size 64 --device cuda --rounds 2 --steps 2
timeout 120 python bench/data_speed.py --model ViT-B-16 --device cuda --images 256 --batch-size 128 --rounds 2
echo "total: $(( $(date +%s) - start )) s"
