#!/usr/bin/env bash
# Load benchmark on the GPU machine, from the repo root:   OUT=/path/to/results bash bench/run_gpu.sh
# Writes $OUT/env.txt and, per model, $OUT/<model>/{make_checkpoint.log,bench.log,results.json,results.md}.
# Measured on one H100 (2026-11-25): env 14 s, checkpoint 40-46 s, bench 108-126 s; about 3.5 min in all.
# Knobs (env): MODELS (names under CONFIG_ROOT=bench/configs, default qwen1.5-moe-a2.7b), MODES, SCHEMES, DEVICE,
# CKPT_ROOT (default /dev/shm when it has room, else /tmp), KEEP_CKPT=1 to keep the checkpoint.
set -euo pipefail
: "${OUT:?set OUT to the results directory}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODELS=${MODELS:-qwen1.5-moe-a2.7b}
MODES=${MODES:-fp8stream,hf_fp8,hf_bf16,safetensors}
SCHEMES=${SCHEMES:-fp8_per_channel}
DEVICE=${DEVICE:-cuda}  # cpu: smoke test of this script with a tiny config (CONFIG_ROOT)
CONFIG_ROOT=${CONFIG_ROOT:-bench/configs}
mkdir -p "$OUT"

# tmpfs is the page cache itself: no disk writeback while writing ~27 GiB, and reads are warm by construction.
if [ -z "${CKPT_ROOT:-}" ]; then
  if [ "$(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1)" -gt $((40 * 2**30)) ] 2>/dev/null; then
    CKPT_ROOT=/dev/shm; else CKPT_ROOT=/tmp; fi
fi

since() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN { printf "%.1f", a - b }'; }
t_all=$(date +%s.%N)
phase_start() { t_phase=$(date +%s.%N); echo "=== $1 ($(date -u +%H:%M:%S))"; }
phase_end() { echo "=== $1: $(since "$t_phase") s"; }

phase_start env
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c 'import sys, torch, transformers, safetensors; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "safetensors", safetensors.__version__)'
  "$PY" -c 'import accelerate; print("accelerate", accelerate.__version__)' 2>/dev/null \
    || echo "accelerate: MISSING (transformers needs it for device_map: hf_bf16 / hf_fp8 will be recorded as failed)"
  echo "nproc $(nproc)"; free -g | head -2; df -h /dev/shm /tmp | tail -n +2
  echo "checkpoint root: $CKPT_ROOT"
} 2>&1 | tee "$OUT/env.txt"
phase_end env

rc=0
for model in $MODELS; do
  ckpt="$CKPT_ROOT/fp8stream-bench/$model"
  res="$OUT/$model"
  mkdir -p "$res"
  phase_start "make checkpoint $model -> $ckpt"
  if [ -f "$ckpt/model.safetensors.index.json" ]; then
    echo "reusing $ckpt"
  else
    rm -rf "$ckpt"
    "$PY" bench/make_checkpoint.py "$CONFIG_ROOT/$model" "$ckpt" --shard-gib 4 --jobs 8 2>&1 | tee "$res/make_checkpoint.log"
  fi
  phase_end "make checkpoint $model"

  phase_start "bench $model"
  "$PY" bench/bench_load.py "$ckpt" --modes "$MODES" --schemes "$SCHEMES" --device "$DEVICE" --check-bound-mib 256 \
    --out "$res/results.json" --markdown "$res/results.md" 2>&1 | tee "$res/bench.log" || rc=1
  phase_end "bench $model"
  [ "${KEEP_CKPT:-0}" = 1 ] || rm -rf "$ckpt"
done

echo "=== total: $(since "$t_all") s; exit code $rc (1 = a bench failed or the fp8stream bound check failed)"
for model in $MODELS; do echo; cat "$OUT/$model/results.md" 2>/dev/null || echo "($model: no results.md)"; done
exit $rc
