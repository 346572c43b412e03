"""Finding the ComfyUI host and importing this pack under a fixed name, for the tests.

Host search order (DESIGN §5): $COMFYUI_PATH; the ComfyUI whose custom_nodes/ holds this pack;
the cached copy that `.ci/setup_env.sh` makes.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "sefi_ide"


def cache_root() -> Path:
    return Path(os.environ.get("SEFI_CACHE", Path.home() / ".cache" / "sefi-ide"))


def find_comfyui() -> Path:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    candidates.append(cache_root() / "comfyui")
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    raise RuntimeError(f"No ComfyUI found (looked in {[str(c) for c in candidates]}). Run `bash .ci/setup_env.sh` "
                       f"or set COMFYUI_PATH.")


def register_pack_namespace() -> types.ModuleType:
    """Make `sefi_ide.<subpackage>` importable without running the pack's ComfyUI entry point."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    module = types.ModuleType(PACK_NAME)
    module.__path__ = [str(PACK_ROOT)]
    module.__package__ = PACK_NAME
    sys.modules[PACK_NAME] = module
    return module


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
