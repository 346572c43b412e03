"""Losses of the paper: L_LDM (denoising) and L_attn (face-wise attention loss)."""
from __future__ import annotations

import enum

import torch

# pixels of one loss-layer map in the paper's setting (SD1.4 at 512 px: 16x16); see attention_loss
REFERENCE_MAP_PIXELS = 256


class TokenOption(enum.IntEnum):
    """Which token maps L_attn compares (the paper's three options; 3 is its best)."""

    PLACEHOLDER = 1  # the placeholder's map only
    PROMPT = 2  # BOS .. EOS maps
    ALL = 3  # all 77 token maps


def ldm_loss(eps: torch.Tensor, eps_pred: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_LDM = ||ε − ε_θ||², averaged; with a mask (B,1,h,w in latent space) only inside it."""
    err = (eps.float() - eps_pred.float()) ** 2
    if mask is None:
        return err.mean()
    weight = mask.expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1e-8)


def select_token_maps(maps: torch.Tensor, option: TokenOption, placeholder: int, eos: int) -> torch.Tensor:
    """maps: (..., HW, tokens) attention probabilities -> the token columns the option compares."""
    if option == TokenOption.PLACEHOLDER:
        return maps[..., placeholder: placeholder + 1]
    if option == TokenOption.PROMPT:
        return maps[..., : eos + 1]
    return maps


def attention_loss(
    target_maps: list[torch.Tensor],
    reference_maps: list[torch.Tensor],
    option: TokenOption,
    placeholder: int,
    eos: int,
) -> torch.Tensor:
    """L_attn = mean over layers and batch·heads of (256 / HW) · Σ_pixels Σ_selected tokens (A_tgt − A_ref)².

    Each map is (batch·heads, HW, tokens). The paper sums the squared error over the map; summed over
    pixels, the same λ would weigh 4x more on SDXL (32x32 loss maps at 1024 px) than on SD1 (16x16 at
    512 px) and change with the training resolution. The per-pixel mean times 256 (the 16x16 maps of
    SD1.4 at 512 px, the paper's setting) keeps the paper's λ = 0.003 meaning what it meant there, and
    the same at any map size.
    """
    if not target_maps or len(target_maps) != len(reference_maps):
        raise ValueError("attention_loss needs one reference map per target map")
    per_layer = []
    for tgt, ref in zip(target_maps, reference_maps):
        diff = select_token_maps(tgt.float(), option, placeholder, eos) - select_token_maps(
            ref.float(), option, placeholder, eos
        )
        per_layer.append(diff.pow(2).sum(dim=-1).mean() * REFERENCE_MAP_PIXELS)
    return torch.stack(per_layer).mean()
