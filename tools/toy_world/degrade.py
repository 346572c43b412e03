"""Degradations a diffusion model's pictures show, applied to batches of renders (B x 3 x H x W floats in [0, 1]).

They train the reader to be robust and measure how robust it is: the toy VAE's 8 x 8 cell grid (its decoder draws
one colour per latent cell), blur, noise, a slight colour shift and a few pixels of offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

VAE_CELL = 8


def vae_roundtrip(images: torch.Tensor, cell: int = VAE_CELL) -> torch.Tensor:
    """What the toy checkpoint's VAE gives back: every cell x cell block replaced by its mean colour."""
    return F.interpolate(F.avg_pool2d(images, cell), scale_factor=cell, mode="nearest")


def blur(images: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Gaussian blur, one sigma (pixels) per picture; sigma 0 leaves a picture as it is."""
    b, ch, h, w = images.shape
    sigma = torch.as_tensor(sigma, dtype=images.dtype).expand(b).clamp_min(1e-3)
    radius = int(torch.ceil(3 * sigma.max()).item())
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (b*ch, taps)
    x = F.pad(images.reshape(1, b * ch, h, w), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * ch)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * ch)
    return x.reshape(b, ch, h, w)


def shift(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Move each picture by (dx, dy) pixels (may be fractional), repeating the border."""
    b, _, h, w = images.shape
    theta = torch.zeros(b, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * torch.as_tensor(dx, dtype=images.dtype) / w
    theta[:, 1, 2] = -2 * torch.as_tensor(dy, dtype=images.dtype) / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_shift(images: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Per-picture, per-channel gain and offset (B x 3 each)."""
    return (images * gain[:, :, None, None] + offset[:, :, None, None]).clamp(0, 1)


def add_noise(images: torch.Tensor, sigma: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=images.dtype).expand(images.shape[0])
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return (images + sigma[:, None, None, None] * noise).clamp(0, 1)


def random_degradation(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """A random mix of every degradation (the reader's training augmentation); `strength` scales the ranges, given
    in pixels of a 128 px picture (smaller pictures get proportionally smaller shifts, blur and cells)."""
    b = images.shape[0]
    px = images.shape[-1] / 128

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    def chance(p: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) < p

    x = shift(images, uniform(-4, 4) * px * strength * chance(0.5), uniform(-4, 4) * px * strength * chance(0.5))
    x = torch.where(chance(0.5)[:, None, None, None], vae_roundtrip(x, round(VAE_CELL * px)), x)
    x = blur(x, uniform(0, 2) * px * strength * chance(0.5))
    gain = torch.where(chance(0.5)[:, None], 1 + uniform(-0.1, 0.1, 3) * strength, torch.ones(b, 3))
    offset = torch.where(chance(0.5)[:, None], uniform(-0.05, 0.05, 3) * strength, torch.zeros(b, 3))
    x = colour_shift(x, gain, offset)
    return add_noise(x, uniform(0, 0.08) * strength * chance(0.5), generator)
