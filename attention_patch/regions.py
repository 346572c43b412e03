"""Regional identities: the identity's token columns get no attention outside its mask.

The K/V patch (which already knows, per layer, which context rows are identity conditioning) hands an
additive attention mask to `RegionAttention`, installed as the host's `optimized_attention_override`,
which passes it to the host's attention kernel for that one cross-attention call. A previous override
(another pack's) is kept and called in turn.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1e4  # large negative, finite: a row never has all its columns masked, and fp16 stays finite


class RegionAttention:
    def __init__(self, previous=None):
        self.previous = previous
        self.pending: torch.Tensor | None = None  # (rows, HW, tokens) additive mask for the next attn2 call
        # a pending mask reached a call it does not fit (the next block's self-attention): the cross-attention it
        # was meant for did not come through this override
        self.missed = False

    def __call__(self, func, q, k, v, heads, *args, mask=None, **kwargs):
        pending, self.pending = self.pending, None
        if pending is not None and k.shape[1] == pending.shape[-1] and q.shape[1] == pending.shape[1] \
                and q.shape[0] == pending.shape[0]:
            pending = pending.to(device=q.device, dtype=q.dtype)
            mask = pending if mask is None else mask + pending
        elif pending is not None:
            self.missed = True
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, *args, mask=mask, **kwargs)
        return func(q, k, v, heads, *args, mask=mask, **kwargs)


class RegionBias:
    """Builds the additive mask for one layer from each identity's token columns and region."""

    def __init__(self, columns: list[list[int]], regions: list[torch.Tensor | None], prompt_tokens: int):
        self.columns = columns  # per identity: token columns within one prompt block
        self.regions = regions  # per identity: (H, W) mask or None
        self.prompt_tokens = prompt_tokens
        self._cache: dict = {}

    def _outside(self, region: torch.Tensor, h: int, w: int) -> torch.Tensor:
        key = (id(region), h, w)
        if key not in self._cache:
            small = F.interpolate(region[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)
            self._cache[key] = (small[0, 0] < 0.5).flatten()  # (HW,) True where the identity is not allowed
        return self._cache[key]

    def build(self, match: torch.Tensor, hw: tuple[int, int], tokens: int) -> torch.Tensor | None:
        """match: (rows, blocks) identity rows/blocks -> (rows, HW, tokens) additive mask, or None."""
        h, w = hw
        bias = None
        for cols, region in zip(self.columns, self.regions):
            if region is None:
                continue
            pixels = self._outside(region, h, w).nonzero().flatten()[None, :]
            if bias is None:
                bias = torch.zeros(match.shape[0], h * w, tokens)
            for b in range(match.shape[1]):
                rows = match[:, b].cpu().nonzero().flatten()[:, None]
                for c in cols:
                    bias[rows, pixels, b * self.prompt_tokens + c] = NEG
        return bias
