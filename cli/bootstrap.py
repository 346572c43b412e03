"""Make ComfyUI importable as a library and this pack importable as `sefi_ide`, in any process (the CLI, a Ray
worker, the tests). Standard library only: it runs before anything else is importable."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

PACK_NAME = "sefi_ide"
PACK_ROOT = Path(__file__).resolve().parents[1]


def register_pack_namespace(root: Path = PACK_ROOT) -> types.ModuleType:
    """`sefi_ide.<subpackage>` importable without running the pack's ComfyUI entry point (its __init__.py)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    module = types.ModuleType(PACK_NAME)
    module.__path__ = [str(root)]
    module.__package__ = PACK_NAME
    sys.modules[PACK_NAME] = module
    return module


def find_comfyui(explicit: str | None = None, fallbacks: tuple[Path, ...] = ()) -> Path:
    """`explicit` (--comfyui), else $COMFYUI_PATH, else the ComfyUI whose custom_nodes/ holds this pack, else
    `fallbacks`."""
    candidates = [Path(p) for p in (explicit, os.environ.get("COMFYUI_PATH")) if p]
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    candidates += fallbacks
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    raise FileNotFoundError(f"No ComfyUI found (looked in {[str(c) for c in candidates] or 'nothing'}). Pass "
                            f"--comfyui PATH or set COMFYUI_PATH to the ComfyUI folder.")


def use_comfyui(path: Path, cpu: bool | None = None) -> None:
    """ComfyUI as a library: on sys.path, offline, on the CPU when asked or when there is no GPU."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from comfy.cli_args import args

    if cpu or (cpu is None and not torch.cuda.is_available()):
        args.cpu = True
    register_pack_namespace()
