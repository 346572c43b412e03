"""Gradient checkpointing for the training pass through the host's UNet, leaving the model as it is for anyone else.

Inside `checkpointed(unet)` each ResBlock and transformer block keeps only its inputs for backward and runs
again when backward reaches it (torch.utils.checkpoint, non-reentrant): activation memory falls to roughly
one block's worth plus the block inputs, for about one more forward pass of compute.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..attention_patch.capture import replaying
from .grad_scope import weights_aliased


def _units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    # a module that already has its own instance `forward` (another pack's wrapper) is left alone
    return [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock)) and "forward" not in vars(m)]


def _checkpointed_forward(module: torch.nn.Module, forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if isinstance(kwargs.get("transformer_options"), dict):
            # the UNet rewrites one options dict as it goes (block, block_index): the recompute needs this call's
            kwargs["transformer_options"] = dict(kwargs["transformer_options"])
        calls = 0
        # how this forward ran: on swapped weights (grad_pass's fast path, no mode on the stack) or under
        # per-call aliasing (its fallback); the recompute inside backward must run the same way
        swapped = torch.overrides._get_current_function_mode() is None

        def once(*a, **kw):
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*a, **kw)
            # the recompute: its attention maps were recorded the first time, and by now the host's weights
            # are inference tensors again, so a swapped block is swapped again
            with replaying(), weights_aliased(module) if swapped else contextlib.nullcontext():
                return forward(*a, **kw)

        return checkpoint(once, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed(unet: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing per ResBlock / transformer block of `unet` for the passes run inside.

    Installed as instance `forward`s for the duration and removed on exit, also on error; like the weight swap
    of `grad_pass`, only the pass running in the host's worker thread sees them.
    """
    units = _units(unet)
    try:
        for m in units:
            m.forward = _checkpointed_forward(m, type(m).forward.__get__(m))
        yield
    finally:
        for m in units:
            vars(m).pop("forward", None)
