#!/usr/bin/env bash
# Run bench/run.py on a lent GPU machine (see bench/RESULTS.md). The host tree and the few wheels the
# machine lacks travel in .host/ and .whl/ (both git-excluded; see the comment at the end).
#   bash bench/device.sh "--family sd1" "--family sdxl --steps 10" "overhead --family sdxl"
# (an argument starting with "overhead" runs bench/overhead.py, any other bench/run.py). BENCH_BUDGET_S (default
# 540) bounds the whole script: each run gets the seconds left, so a slow one cannot eat the lease's output.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.host/comfyui PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)"
deadline=$((SECONDS + ${BENCH_BUDGET_S:-540}))
for a in "$@"; do
  left=$((deadline - SECONDS))
  if [ "$left" -lt 30 ]; then echo "=== skipped (budget spent): $a" | tee -a "$OUT/log.txt"; continue; fi
  case "$a" in
    overhead*) script=bench/overhead.py; a=${a#overhead} ;;
    *) script=bench/run.py ;;
  esac
  echo "=== $script $a"
  # shellcheck disable=SC2086
  timeout "$left" python3 "$script" $a 2>&1 | tee -a "$OUT/log.txt"
  cp bench/RESULTS.md "$OUT/RESULTS.md"
done
cp bench/RESULTS.md "$OUT/RESULTS.md"
# Preparing the two folders (on the workstation, once):
#   cp -r "$SEFI_CACHE/comfyui" .host/comfyui
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#     kornia==0.9.0 kornia_rs==0.2.0 torchsde==0.2.6 trampoline==0.1.2
