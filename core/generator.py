"""The token generator G (DESIGN §1): 2·S inputs e + p_i -> k_1..k_S, v_1..v_S."""
from __future__ import annotations

import torch
from torch import nn


class TokenGenerator(nn.Module):
    """Two self-attention layers and one feed-forward layer over the 2·S (stage, K|V) slots.

    The base vector `e` (word embedding of the init word) is a frozen buffer; only G learns.
    The output projection starts at zero, so before training every token equals `e` (the init
    word), and its output is scaled by 1/d so that one Adam step at the paper's lr (0.005) moves a
    token by about as much as textual inversion moves an embedding at that lr.
    """

    def __init__(self, base: torch.Tensor, num_stages: int, heads: int = 8, ff_mult: int = 2):
        super().__init__()
        dim = base.shape[-1]
        if dim % heads:
            heads = 1
        self.num_stages = num_stages
        self.dim = dim
        self.register_buffer("base", base.detach().float().clone().reshape(dim))
        self.positions = nn.Parameter(torch.randn(2 * num_stages, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (k, v), each (S, d): k[s] / v[s] replace the placeholder row for stage s."""
        h = (self.base + self.positions).unsqueeze(0)
        x = self.norm1(h)
        h = h + self.attn1(x, x, x, need_weights=False)[0]
        x = self.norm2(h)
        h = h + self.attn2(x, x, x, need_weights=False)[0]
        h = h + self.ff(self.norm3(h))
        tokens = self.base + self.out(self.norm_out(h[0])) / self.dim
        return tokens[: self.num_stages], tokens[self.num_stages:]
