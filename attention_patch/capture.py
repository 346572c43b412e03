"""Differentiable capture of cross-attention probabilities softmax(QKᵀ/√d) at chosen layers."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .layers import CrossAttnLayer


class AttentionCapture:
    """attn2 replace patches that compute attention explicitly and keep the probability maps.

    Installed only on the layers the loss uses; every other layer keeps the host's fast kernel.
    Maps are (batch·heads, HW, tokens), in the order the layers run.
    """

    def __init__(self, layers: list[CrossAttnLayer]):
        self.layers = layers
        self.maps: list[torch.Tensor] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        b, n, inner = q.shape
        d = inner // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2).reshape(x.shape[0] * heads, x.shape[1], d)

        qh, kh, vh = split(q).float(), split(k).float(), split(v).float()
        probs = torch.softmax(qh @ kh.transpose(1, 2) * d ** -0.5, dim=-1)
        if not _replaying:
            self.maps.append(probs)
        out = (probs @ vh).to(q.dtype)
        return out.reshape(b, heads, n, d).transpose(1, 2).reshape(b, n, inner)

    def replace_patches(self) -> dict:
        return {layer.key: self for layer in self.layers}

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


_replaying = 0  # > 0 while gradient checkpointing recomputes a block: its maps were recorded the first time


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Attention computed again for backward (gradient checkpointing) is not recorded a second time.

    A plain counter, not a context variable: on a GPU the recompute runs in autograd's device thread."""
    global _replaying
    _replaying += 1
    try:
        yield
    finally:
        _replaying -= 1
