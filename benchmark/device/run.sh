#!/usr/bin/env bash
# One device call (make device-check, at most 9 minutes): check the pool + page-table decode kernel
# against the torch path and time decode steps (no FlashInfer needed), install the carried FlashInfer and
# time the split-KV kernel against FlashInfer's and SGLang's Triton decode (batch 1/64/256 x context
# 1k-128k) plus a batched 32k-token prefill, then serve stock SGLang vs fairkv on real servers (benchmark/device/serve.py:
# greedy tokens compared, graphs on / off, one throughput table). Every part reports even if an earlier
# one fails; the exit status says whether any did.
# Prepare on the dev machine (git-ignored, carried):  ../shared/tools/flashinfer-for-device.sh .device/flashinfer
#   ../shared/tools/sglang-for-device/build.sh .device/sglang  (+ SmolLM2's config/tokenizer in .device/sglang/model)
# Run through the device tool with carry [".device"], command "make device-check", timeout 560.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT"
rc=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 60 python3 benchmark/device/check_pool.py 2>&1 | tee "$OUT/pool_check.log" || rc=1
SITE=$(mktemp -d)
if python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device/flashinfer/apache_tvm_ffi-*.whl \
   && tar -xJf .device/flashinfer/flashinfer-trim.tar.xz -C "$SITE"; then
  export PYTHONPATH="$SITE:${PYTHONPATH:-}" MAX_JOBS=16
else
  echo "FlashInfer not installed (.device/flashinfer missing?): the benchmark runs our kernel alone"; rc=1
fi
(timeout 160 python3 benchmark/device/bench_kernel.py 2>&1 | tee "$OUT/bench.log") || rc=1
if [ -f .device/sglang/site.tar.xz ]; then  # the servers use the bundle's SGLang, not this PYTHONPATH
  (PYTHONPATH= timeout 270 python3 benchmark/device/serve.py 2>&1 | tee "$OUT/serve.log") || rc=1
else
  echo "no .device/sglang bundle: the server part did not run"; rc=1
fi
exit $rc
