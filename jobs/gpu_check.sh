#!/usr/bin/env bash
# One prepared run of every GPU benchmark on the product's own path, for a session lent an H200 (the library's
# device/METHOD.md): each training case builds the stage exactly as a Ray Train worker does (TokenizerStage /
# ARStage on the DeepSpeed engine at world size 1, NCCL) and times the loop's step (train_step + EMA).
#
# The device image has torch, timm and pyarrow but not DeepSpeed (nor its hjson / pydantic), open_clip_torch or
# lpips: their wheels travel in .whl (git-ignored; `bash jobs/gpu_check.sh --prepare` fills it here on the CPU
# machine), and third_party/LlamaGen (git-ignored checkout) for the sampling comparison:
#   run(command="bash jobs/gpu_check.sh", carry=[".whl", "third_party"], timeout_s=570)
# Cases run in order of importance, each under its own time limit, so a slow or failing case costs only itself;
# every table is printed again at the end (the device tool returns the last 12,000 characters); the full log is
# $OUT/bench.log. DEADLINE=<s> bounds all cases together (default 550), SKIP_SAMPLE=1 leaves sampling out.
#
# Before spending device time: `bash jobs/gpu_check.sh --cpu` runs the same cases here, each shrunk to the tiny
# presets on the CPU (batch 2, one timed step, no profile; ~2 minutes on 2 cores) with the checkout's .venv: every
# case must end with its table (a renamed flag, lever or preset shows up as "exit 2" in the summary).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then  # on the CPU machine: the wheels the device image lacks, for Python 3.12
  PIP=${PIP:-.venv/bin/pip}
  mkdir -p .whl && grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  $PIP download -q --no-deps -d .whl hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    open_clip_torch==3.3.0 lpips==0.1.4 ftfy==6.3.1 timm==1.0.31 typing_extensions==4.16.0
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic-core==2.50.5 wcwidth==0.9.4
  DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
  ls -la .whl
  exit 0
fi

CPU=""
[ "${1:-}" = "--cpu" ] && CPU=1
PY=python3
if [ -n "$CPU" ]; then
  [ -x .venv/bin/python ] && PY=.venv/bin/python
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
LOG="$OUT/bench.log"; : > "$LOG"
START=$(date +%s)
{
  [ -n "$CPU" ] || nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  $PY -c "import torch, deepspeed, timm, open_clip; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)"
} 2>&1 | grep -v -i warn | tee -a "$LOG"

DEADLINE=${DEADLINE:-550}  # seconds for all cases together: the call itself is limited (timeout_s=570)
# tiny ARGS...: a case's arguments for the --cpu check: tiny presets, batch 2, one step, no profile, on the CPU
tiny() {
  local out=() a
  while [ $# -gt 0 ]; do
    a=$1; shift
    case "$a" in
      --preset) out+=(--preset tiny); shift ;;
      --batch) out+=(--batch 2); shift ;;
      --steps|--iters) out+=("$a" 1); shift ;;
      --warmup) out+=(--warmup 0); shift ;;
      --probe) out+=(--probe 3); shift ;;
      --profile) shift ;;
      *) out+=("$a") ;;
    esac
  done
  echo "${out[@]}" --device cpu
}

# run LIMIT_S ARGS...: one benchmark case, its output appended to the log; the limit shrinks to what is left
run() {
  local limit=$1; shift
  [ -n "$CPU" ] && set -- $(tiny "$@")
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 25 ]; then echo "== SKIPPED (no time left): bench.py $*" | tee -a "$LOG"; return 0; fi
  echo "== [$(( $(date +%s) - START )) s] bench.py $* (limit ${limit} s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" $PY jobs/bench.py "$@" >> "$LOG" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "   TIMED OUT after ${limit} s" | tee -a "$LOG"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && { echo "   exit $rc; last lines:"; grep -v -i warn "$LOG" | tail -6; } | tee -a "$LOG"
  return 0
}

# 1. the targets, every lever on and every lever off ("all" vs "default" = every lever but compile)
run 160 tokenizer --preset paper --batch 32 --steps 10 --warmup 4 --variants base,all --profile 30
run 80 ar-train --preset B --batch 64 --steps 10 --warmup 4 --variants base,default,all --profile 20
[ -n "${SKIP_SAMPLE:-}" ] || run 150 sample --preset B --batch 64 --cfg-scale 1.75 --iters 3 --warmup 1 --variants full,bounded,compiled --llamagen-dir third_party/LlamaGen
# 2. bf16 vs fp32, one step each (activation dropout off), with the default levers
run 50 precision tokenizer --preset paper --batch 4
run 25 precision ar --preset B --batch 16
# 3. each remaining lever alone, the largest batch that fits, the other AR sizes
run 150 tokenizer --preset paper --batch 32 --steps 10 --warmup 3 --variants frozen_bf16,channels_last,nan_after,default,compile --probe 48,64,96,128
run 50 ar-train --preset L --batch 64 --steps 10 --warmup 3 --variants all
run 40 ar-train --preset B --batch 256 --steps 10 --warmup 3 --variants all
run 50 ar-train --preset B --batch 64 --steps 10 --warmup 4 --variants cudagraphs

echo
echo "=================== summary ($(( $(date +%s) - START )) s) ==================="
grep -E '^(== |\| |tokenizer step|GPT-|FLOPs/seq|precision check|largest batch|profile:|speedup|same weights|same seeds|repeat check|  full:|  bounded:|   TIMED|   exit|torch |NVIDIA|name,|Traceback|[A-Za-z]*Error)' "$LOG" | cut -c1-400
