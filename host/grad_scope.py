"""A scope in which the host's frozen weights can take part in autograd, without copying them.

ComfyUI executes nodes under `torch.inference_mode()`, so the weights it loads are inference
tensors, which autograd refuses to save for backward. Inside `training_scope()` every inference
tensor that reaches a torch function is replaced by a zero-copy alias (same storage, ordinary tensor):
gradients can flow *through* the frozen UNet/CLIP to our token generator, and the weights are
neither copied nor modified.

That per-call hook is Python on every torch call. The big passes avoid it: `grad_pass` swaps a host
module's weights for the same aliases once per pass and takes the mode off torch's stack, and
`frozen_pass` (no gradient) runs the host's way, in inference mode, also without the hook.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .dynamic_vram import in_training

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        self._tables: dict[int, tuple[torch.nn.Module, list[dict]]] = {}  # module id -> its param/buffer tables
        self.suspended = 0  # > 0 while lifted (frozen_pass, weights_aliased): no per-call aliasing
        self.per_call: set[int] = set()  # ids of modules whose gradient passes keep per-call aliasing

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

    def tables(self, module: torch.nn.Module) -> list[dict]:
        """Every parameter and buffer table of `module`'s tree (walked once per module and scope)."""
        hit = self._tables.get(id(module))
        if hit is None or hit[0] is not module:
            hit = (module, [t for m in module.modules() for t in (m._parameters, m._buffers) if t])
            self._tables[id(module)] = hit
        return hit[1]


_ACTIVE: list[_AliasInferenceTensors] = []


@contextlib.contextmanager
def training_scope() -> Iterator[None]:
    """Leave the host's inference mode, enable gradients, alias inference tensors, tell the host it is training
    (`in_training`); all restored on exit."""
    mode = _AliasInferenceTensors()
    with torch.inference_mode(False), torch.enable_grad(), in_training(), mode:
        _ACTIVE.append(mode)
        try:
            yield
        finally:
            _ACTIVE.remove(mode)


def _is_plain_inference(x) -> bool:
    return type(x) in (torch.Tensor, torch.nn.Parameter) and x.is_inference()


@contextlib.contextmanager
def weights_aliased(module: torch.nn.Module) -> Iterator[None]:
    """A gradient pass through `module` (the UNet, a text encoder, a block) without the per-call cost.

    A UNet pass makes thousands of torch calls and the mode runs a Python hook on each (bench/overhead.py).
    Here the module's inference parameters and buffers are swapped, for the duration, for the same zero-copy
    aliases the mode would hand out, and the mode is lifted off torch's stack.
    The swap is undone on exit, also on error. The host runs its models from this (single) worker thread, so
    nothing but this pass sees the aliases; should the host move a weight meanwhile (`param.data = moved` when
    it loads or offloads), the real tensor is moved the same way on exit and stays an inference tensor.
    An inference tensor the swap cannot reach fails with autograd's "cannot be saved" error (see `grad_pass`).
    """
    mode = _ACTIVE[-1] if _ACTIVE else None
    if mode is None or mode.suspended:
        yield
        return
    swapped: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
    with _lifted(mode):  # first: while active, the mode would answer is_inference() for an alias
        try:
            for table in mode.tables(module):
                for name, real in table.items():
                    if _is_plain_inference(real):
                        alias = mode._alias(real)
                        table[name] = alias
                        swapped.append((table, name, real, alias))
            yield
        finally:
            for table, name, real, alias in swapped:
                if table[name] is not alias:
                    continue  # the host put a new tensor there (e.g. a weight patch): it stands
                if alias.data_ptr() != real.data_ptr() or alias.device != real.device or alias.dtype != real.dtype:
                    with torch.inference_mode():  # the host moved the alias (`.data = moved`): move the real one
                        real.data = _as_inference(alias)
                table[name] = real


def _is_inference_save_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "Inference tensors cannot be saved for backward" in str(exc)


def grad_pass(module: torch.nn.Module, fn: Callable[[], T]) -> T:
    """`fn()`, a gradient pass through the host's `module`, with its weights swapped (`weights_aliased`).

    If the pass meets an inference tensor the swap cannot reach (one held by another pack's patch), autograd
    refuses it before anything is computed for backward; the pass then runs again with per-call aliasing,
    as do this module's later passes in the scope: correct, slower, and logged once.
    """
    mode = _ACTIVE[-1] if _ACTIVE else None
    if mode is None or mode.suspended or id(module) in mode.per_call:
        return fn()
    try:
        with weights_aliased(module):
            return fn()
    except RuntimeError as exc:
        if not _is_inference_save_error(exc):
            raise
    log.warning("SeFi-IDE: a patch on this %s holds inference tensors; training continues with per-call "
                "aliasing (correct, but slower per step).", type(module).__name__)
    mode.per_call.add(id(module))
    return fn()


@contextlib.contextmanager
def per_call_aliasing(module: torch.nn.Module) -> Iterator[None]:
    """Gradient passes through `module` alias every torch call, as before `weights_aliased` (benchmarks)."""
    mode = _ACTIVE[-1]
    added = id(module) not in mode.per_call
    mode.per_call.add(id(module))
    try:
        yield
    finally:
        if added:
            mode.per_call.discard(id(module))


@contextlib.contextmanager
def frozen_pass() -> Iterator[None]:
    """A pass that needs no gradient (reference maps, VAE latents, reference text): run it exactly as the
    host runs its own passes, in inference mode and without the per-call aliasing of training_scope."""
    mode = _ACTIVE[-1] if _ACTIVE else None
    with _lifted(mode) if mode is not None else contextlib.nullcontext(), torch.inference_mode():
        yield


@contextlib.contextmanager
def _lifted(mode: _AliasInferenceTensors) -> Iterator[None]:
    """The mode out of the way for a pass: off torch's function-mode stack when it is on top (then no torch
    call pays for a Python hook; suspending alone still costs one per call), else only suspended."""
    mode.suspended += 1
    try:
        if torch.overrides._get_current_function_mode() is mode:
            with torch.overrides._pop_mode_temporarily():
                yield
        else:
            yield
    finally:
        mode.suspended -= 1
