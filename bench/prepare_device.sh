#!/usr/bin/env bash
# Fills .host/ and .whl/ (git-excluded) for bench/device.sh on a lent GPU machine, whose Python (3.12, torch 2.11
# with torchaudio) lacks ComfyUI and reaches no registry: the ComfyUI trees .ci/setup_env.sh built (0.3.75 and, where
# built, 0.28.0), pruned to what an SD1/SDXL run imports and reads, and the wheels the machine lacks. The device tool
# carries at most 64 MiB with the working tree: the script prints the total.
#   bash bench/prepare_device.sh        then a device run with carry [".host", ".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${SEFI_CACHE:-$HOME/.cache/sefi-ide}"
rm -rf .host .whl
mkdir -p .host .whl
for tree in comfyui comfyui-0.28.0; do
  [ -d "$CACHE/$tree" ] || { echo "skipped: $CACHE/$tree (not built)"; continue; }
  cp -r "$CACHE/$tree" ".host/$tree"
  # not imported or read by an SD1/SDXL run in-process: tests, API nodes, blueprints, other models' tokenizers
  rm -rf ".host/$tree"/{tests,tests-unit,blueprints,comfy_api_nodes,script_examples,.git}
  find ".host/$tree/comfy/text_encoders" -mindepth 1 -maxdepth 1 -type d -name '*tokenizer*' -exec rm -rf {} +
  find ".host/$tree" -name __pycache__ -type d -exec rm -rf {} +
done
# comfy-kitchen: the pure-Python wheel (the CUDA one is 29 MB); av: comfy_api (imported by nodes.py) needs it
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 -d .whl kornia==0.9.0 kornia_rs==0.2.0 torchsde==0.2.6 trampoline==0.1.2 \
  comfy-aimdo==0.4.10 simpleeval==1.0.8 blake3==1.0.11 av==18.1.0
python3 -m pip download -q --no-deps --python-version 3.12 --platform any -d .whl "comfy-kitchen==0.2.22" \
  --only-binary=:all: --implementation py
grep -qx '/.host/' .git/info/exclude 2>/dev/null || printf '/.host/\n/.whl/\n' >> .git/info/exclude
du -sh .host/* .whl
echo "working tree + carried: $(( ($(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) \
  + $(du -sb .host .whl | awk "{s += \$1} END {print s}")) / 1048576 )) MiB of 64"
