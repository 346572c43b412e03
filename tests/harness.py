"""Finding the ComfyUI host and importing this pack under a fixed name, for the tests.

Host search order (CONTRIBUTING.md): $COMFYUI_PATH; the ComfyUI whose custom_nodes/ holds this pack;
the cached copy that `.ci/setup_env.sh` makes.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def _load_bootstrap():
    spec = importlib.util.spec_from_file_location("sefi_bootstrap", PACK_ROOT / "cli" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bootstrap = _load_bootstrap()


def cache_root() -> Path:
    return Path(os.environ.get("SEFI_CACHE", Path.home() / ".cache" / "sefi-ide"))


def find_comfyui() -> Path:
    return _bootstrap.find_comfyui(fallbacks=(cache_root() / "comfyui",))


register_pack_namespace = _bootstrap.register_pack_namespace


def import_comfy_in_process() -> Path:
    """Put the host on sys.path in CPU mode so `comfy.*` imports work inside the test process."""
    host = find_comfyui()
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from comfy.cli_args import args

    args.cpu = True
    return host


def load_pack_entry_point(name: str = "sefi_ide_entry"):
    """Execute the pack's __init__.py as ComfyUI would (package with submodule search path)."""
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
