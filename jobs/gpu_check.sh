#!/usr/bin/env bash
# One prepared run of every GPU benchmark, for a session lent an H200 (see the library's device/METHOD.md).
# The device image has torch/timm but not open_clip_torch or lpips: carry their wheels (.whl, git-ignored) and
# install them first, as the device README says; carry third_party/LlamaGen for the sampling comparison.
#   run(command="bash jobs/gpu_check.sh", carry=[".whl", "third_party"], timeout_s=540)
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
run() { echo "== $*"; timeout "$T" python3 jobs/bench.py "$@" 2>&1 | tee -a "$OUT/bench.log" | tail -9; }
T=150 run extract --preset paper --views llamagen --batch 640 --iters 5 --warmup 2 --decode-images 48
T=120 run tokenizer --preset paper --batch 32 --steps 10 --warmup 3
T=90 run ar-train --preset B --batch 64 --steps 10 --warmup 3
T=150 run sample --preset B --batch 64 --cfg-scale 1.75 --iters 3 --warmup 1 --llamagen-dir third_party/LlamaGen
