"""A scope in which the host's frozen weights can take part in autograd, without copying them.

ComfyUI executes nodes under `torch.inference_mode()`, so the weights it loads are inference
tensors, which autograd refuses to save for backward. Inside `training_scope()` every inference
tensor that reaches a torch function is replaced by a zero-copy alias (same storage, ordinary tensor):
gradients can flow *through* the frozen UNet/CLIP to our token generator, and the weights are
neither copied nor modified.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


def _is_inference(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_inference()


def _storage_view(x: torch.Tensor) -> torch.Tensor:
    """A zero-copy tensor over `x`'s storage; an inference tensor iff created under inference mode."""
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage(), x.storage_offset(), x.size(),
                                                               x.stride())


def _as_inference(x):
    """A zero-copy inference-tensor view of `x`'s storage (call under inference mode)."""
    if not isinstance(x, torch.Tensor) or x.is_inference():
        return x
    return _storage_view(x)


class _AliasInferenceTensors(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._aliases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.suspended = 0  # > 0 inside frozen_pass(): the host runs as it always does

    def _alias(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_inference():
            return x
        hit = self._aliases.get(id(x))
        # a hit is stale once the host has moved the tensor (device load/offload outside this mode's view)
        if hit is not None and hit[0] is x and hit[1].data_ptr() == x.data_ptr() and hit[1].device == x.device:
            return hit[1]
        alias = _storage_view(x)
        self._aliases[id(x)] = (x, alias)
        return alias

    def _alias_arg(self, x):
        # fast path: this runs for every torch call of a UNet pass; only containers pay for tree_map
        if isinstance(x, torch.Tensor):
            return self._alias(x) if x.is_inference() else x
        if isinstance(x, dict) or (isinstance(x, (list, tuple)) and any(
                isinstance(e, (torch.Tensor, list, tuple, dict)) for e in x)):
            return tree_map(self._alias, x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.suspended:
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__set__" and _is_inference(args[0]):
            # an attribute setter on a host tensor (`param.data = moved`: how the host moves weights between
            # devices) must act on the real tensor, not on an alias, and keep it an inference tensor
            self._aliases.pop(id(args[0]), None)
            with torch.inference_mode():
                return func(args[0], *map(_as_inference, args[1:]), **kwargs)
        args = tuple(self._alias_arg(a) for a in args)
        return func(*args, **{k: self._alias_arg(v) for k, v in kwargs.items()} if kwargs else {})


_ACTIVE: list[_AliasInferenceTensors] = []


@contextlib.contextmanager
def training_scope() -> Iterator[None]:
    """Leave the host's inference mode, enable gradients, alias inference tensors; all restored on exit."""
    mode = _AliasInferenceTensors()
    with torch.inference_mode(False), torch.enable_grad(), mode:
        _ACTIVE.append(mode)
        try:
            yield
        finally:
            _ACTIVE.remove(mode)


@contextlib.contextmanager
def frozen_pass() -> Iterator[None]:
    """A pass that needs no gradient (reference maps, VAE latents, reference text): run it exactly as the
    host runs its own passes, in inference mode and without the per-call aliasing of training_scope."""
    mode = _ACTIVE[-1] if _ACTIVE else None
    if mode is not None:
        mode.suspended += 1
    try:
        with torch.inference_mode():
            yield
    finally:
        if mode is not None:
            mode.suspended -= 1
