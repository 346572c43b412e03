"""Learning on hosts with DynamicVRAM (ComfyUI 0.16+, comfy-aimdo; on by default on NVIDIA GPUs with torch >= 2.8).

A dynamic model keeps its weights in host memory and each op casts its weight into a VRAM buffer that is released
(and may be reused) right after the op. A gradient pass needs the weights it multiplied by until backward: autograd
would hold views of buffers that are overwritten meanwhile (wrong gradients), and `grad_scope`'s weight aliasing
never sees the cast copies. So learning runs on a non-dynamic copy of the same checkpoint, made by the host's own
`clone(disable_dynamic=True)` (its loader reads the checkpoint once more, the MODEL's and the CLIP's patches are
kept), with `comfy.model_management.in_training` set as core's LoRA trainer sets it. The copy belongs to one learning
run and goes when the run releases it (`ComfyTrainingBackend.release`): it is not cached on the user's patcher the
way `get_non_dynamic_delegate` caches it, where it would stay in host memory for as long as ComfyUI keeps that MODEL,
and every clone of it (a LoRA strength change, any patch node) would load and keep one more. Forward-only work (the
heat map) runs on the user's own dynamic MODEL and CLIP. The user's MODEL and CLIP are not touched: sampling stays
dynamic. Hosts without DynamicVRAM (before 0.16, or off: a CPU, --highvram, --gpu-only, --novram,
--disable-dynamic-vram) learn on the objects they are given, as before.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from ..core.errors import SeFiError

log = logging.getLogger(__name__)

_FIX = ("Load the checkpoint with ComfyUI's Load Checkpoint (its loaders can make the copy), or start ComfyUI with "
        "--disable-dynamic-vram.")


def is_dynamic(patcher) -> bool:
    """Whether a ModelPatcher streams its weights (DynamicVRAM); False on hosts that predate it."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def _non_dynamic(patcher, what: str):
    """A non-dynamic patcher over a fresh load of the same checkpoint, with the same patches, for one learning run:
    `get_non_dynamic_delegate` without its cache on `patcher` (see the module)."""
    try:
        return patcher.clone(disable_dynamic=True)
    except RuntimeError as exc:  # "Cannot create non-dynamic delegate: cached_patcher_init is not initialized."
        raise SeFiError(f"This {what} streams its weights (ComfyUI's DynamicVRAM) and ComfyUI cannot make the "
                        f"ordinary copy that learning needs ({exc}). {_FIX}") from exc


def learning_copies(model, clip):
    """(MODEL, CLIP) whose weights stay ordinary tensors for a whole training step: the given ones where they are
    not dynamic, else non-dynamic copies made for this run (same checkpoint, same LoRA and other weight patches),
    which nothing but the caller holds."""
    if is_dynamic(model):
        model = _non_dynamic(model, "MODEL")
        log.info("[SeFi-IDE] DynamicVRAM: learning on ComfyUI's non-dynamic copy of the model; sampling stays "
                 "dynamic.")
    if clip is not None and is_dynamic(clip.patcher):
        patcher = _non_dynamic(clip.patcher, "CLIP")
        clip = clip.clone()
        clip.patcher = patcher
        # the module the CLIP encodes with must be the copy's (CLIP.clone(disable_dynamic=True) of 0.28 keeps the
        # dynamic module there while its patcher loads the copy)
        clip.cond_stage_model = patcher.model
    return model, clip


@contextlib.contextmanager
def in_training() -> Iterator[None]:
    """comfy.model_management.in_training while learning (hosts that have it), restored afterwards."""
    try:
        import comfy.model_management as mm
    except ImportError:  # the ComfyUI-free core tests
        mm = None
    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before
