"""The token generator G: the init word's embedding e -> k_1..k_S, v_1..v_S.

Design (generator version 2; version 1 collapsed every slot onto one token, see docs/how-it-works.md):

- 2·S slots, one per (stage, K|V). Slot i's input is `e + q_i`, where the slot queries `q_i` start at the
  word-embedding table's own scale (per-element RMS of `e`), so two slots begin as different as two words,
  not as the 0.02-scale nudges of version 1 that the self-attention averaged away.
- Two self-attention layers and one feed-forward layer over the slots (the paper's module), then one shared
  output layer, zero-initialised and scaled by 1/d so that one Adam step at lr 0.005 moves a token about as
  far as textual inversion moves an embedding: the shared identity every stage agrees on.
- A per-slot output offset `o_i` (zero-initialised): each (stage, K|V) token can move on its own exactly as
  freely as a directly optimised token. Each stage's slots get gradient only at that stage's timesteps, so
  without it the slots could only move apart as far as the shared layers let them (they did not).

token_i = e + W_out·LN(h_i)/d + o_i. Before training every token equals e (the init word).
"""
from __future__ import annotations

import torch
from torch import nn

GENERATOR_VERSION = 2


class TokenGenerator(nn.Module):
    """Only G learns: e is a frozen buffer."""

    def __init__(self, base: torch.Tensor, num_stages: int, heads: int = 8, ff_mult: int = 2):
        super().__init__()
        dim = base.shape[-1]
        if dim % heads:
            heads = 1
        self.num_stages = num_stages
        self.dim = dim
        base = base.detach().float().clone().reshape(dim)
        self.register_buffer("base", base)
        rms = float(base.pow(2).mean().sqrt().clamp_min(1e-3))
        self.slot_queries = nn.Parameter(torch.randn(2 * num_stages, dim) * rms)
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
        self.slot_offsets = nn.Parameter(torch.zeros(2 * num_stages, dim))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (k, v), each (S, d): k[s] / v[s] replace the placeholder row for stage s."""
        h = (self.base + self.slot_queries).unsqueeze(0)
        x = self.norm1(h)
        h = h + self.attn1(x, x, x, need_weights=False)[0]
        x = self.norm2(h)
        h = h + self.attn2(x, x, x, need_weights=False)[0]
        h = h + self.ff(self.norm3(h))
        tokens = self.base + self.out(self.norm_out(h[0])) / self.dim + self.slot_offsets
        return tokens[: self.num_stages], tokens[self.num_stages:]
