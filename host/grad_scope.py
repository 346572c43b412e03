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


class _AliasInferenceTensors(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._aliases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _alias(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_inference():
            return x
        hit = self._aliases.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        alias = torch.empty(0, dtype=x.dtype, device=x.device)
        alias.set_(x.untyped_storage(), x.storage_offset(), x.size(), x.stride())
        self._aliases[id(x)] = (x, alias)
        return alias

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*tree_map(self._alias, args), **tree_map(self._alias, kwargs or {}))


@contextlib.contextmanager
def training_scope() -> Iterator[None]:
    """Leave the host's inference mode, enable gradients, alias inference tensors; all restored on exit."""
    with torch.inference_mode(False), torch.enable_grad(), _AliasInferenceTensors():
        yield
