#!/usr/bin/env bash
# One device call: install the carried FlashInfer, check and time the ragged decode kernel.
# Prepare on the dev machine (git-ignored, carried):  ../shared/tools/flashinfer-for-device.sh .device/flashinfer
# Run through the device tool with carry [".device"], e.g. command "bash kernels/bench_device.sh", timeout 480.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device/flashinfer/apache_tvm_ffi-*.whl
tar -xJf .device/flashinfer/flashinfer-trim.tar.xz -C "$SITE"
export PYTHONPATH="$SITE:${PYTHONPATH:-}" MAX_JOBS=16
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 60 python3 kernels/check_pool_device.py 2>&1 | tee "$OUT/pool_check.log"
timeout 420 python3 kernels/bench_ragged_device.py 2>&1 | tee "$OUT/bench.log"
