#!/usr/bin/env bash
# Run bench/run.py on a lent GPU machine (see bench/RESULTS.md). The host tree and the few wheels the
# machine lacks travel in .host/ and .whl/ (both git-excluded; see the comment at the end).
#   bash bench/device.sh "--family sd1" "--family sdxl --steps 10" "overhead --family sdxl" "@0.28.0 dynamic --steps 20"
# (an argument starting with "overhead" runs bench/overhead.py, "dynamic" bench/dynamic_vram.py, any other
# bench/run.py; a leading "@VERSION" runs it on .host/comfyui-VERSION, else on ComfyUI 0.3.75). BENCH_BUDGET_S (default
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
  host=comfyui  # "@0.28.0 ..." runs on .host/comfyui-0.28.0
  case "$a" in
    @*) host=comfyui-${a%% *}; host=${host/@/}; a=${a#* } ;;
  esac
  case "$a" in
    overhead*) script=bench/overhead.py; a=${a#overhead} ;;
    dynamic*) script=bench/dynamic_vram.py; a=${a#dynamic} ;;
    *) script=bench/run.py ;;
  esac
  echo "=== $host: $script $a"
  # shellcheck disable=SC2086
  COMFYUI_PATH=$PWD/.host/$host timeout "$left" python3 "$script" $a 2>&1 | tee -a "$OUT/log.txt"
  cp bench/RESULTS.md "$OUT/RESULTS.md"
done
cp bench/RESULTS.md "$OUT/RESULTS.md"
# Preparing the two folders (on the workstation, once the test environment is built): bash bench/prepare_device.sh
# (ComfyUI 0.3.75 and 0.28.0, pruned, and the wheels; it prints the size against the device tool's 64 MiB). Then e.g.
#   bash bench/device.sh "--family sd1 --steps 8 --identities 1,4,8" "@0.28.0 --family sd1 --steps 8 --identities 1,4,8" \
#     "@0.28.0 dynamic --steps 20"
