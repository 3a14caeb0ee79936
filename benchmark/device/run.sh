#!/usr/bin/env bash
# One device call (make device-check): benchmark/device/run.py runs the phases (gpu, pool + kernel
# check, kernel vs FlashInfer / SGLang decode + prefill, servers fairkv vs stock) each with a deadline in a
# session of its own, and leaves three files in $OUT (summary.md, results.json, logs.tar.gz), rewritten
# after every phase. Its phases add to 400 s: with the machine's start a call of at most 540 s.
# Prepare on the dev machine (git-ignored, carried):  ../shared/tools/flashinfer-for-device.sh .device/flashinfer
#   ../shared/tools/sglang-for-device/build.sh .device/sglang  (+ SmolLM2's config/tokenizer in .device/sglang/model)
# Run through the device tool with carry [".device"], command "make device-check", timeout_s 480.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-out}
exec timeout -k 5 450 python3 benchmark/device/run.py "$@"
