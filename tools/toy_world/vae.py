"""An analytic VAE: encode = the mean colour of every 8 x 8 cell, decode = that colour painted back over the cell.
No training, no committed weights.

ComfyUI initialises no weight it does not load, so every VAE weight must be in the checkpoint. Two architectures
are possible inside an SD1 checkpoint, both chosen by the keys: the SD VAE (fixed config, 84 M weights) and TAESD
(`taesd_encoder.*` / `taesd_decoder.*` keys; 64-channel convs, ReLU, no norms, 2.4 M weights). Both were built
analytically and checked through ComfyUI (docs/toy-world.md); TAESD is used: about 15x fewer operations per picture
(the pack's learning encodes the reference picture every step) and it needs no tricks around GroupNorm.

TAESD's weights are set so that the network is linear on the world's pictures:
- every Block's last conv is zero and its skip is the identity, so a Block is relu(x) = x on non-negative lanes;
- each encoder stride-2 conv (3x3, padding 1) averages 2x2 pixels: three of them make 8x8 means;
- each decoder Upsample (nearest x2, then a 3x3 conv) copies;
- the decoder starts with Clamp (3 tanh(x / 3)): the latents enter scaled by `vae_scale` (a loaded parameter) to
  |x| < 0.1, where Clamp is the identity to 4e-4, and its first conv scales them back;
- decoder lanes carry colour + 1, so ReLUs never cut a colour above -1.
Latents are the cell colours centred and whitened by COLOUR_* so that after SD1's scale factor every latent channel
has about unit variance over the world's pictures; the fourth latent channel is always zero and decoding ignores it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SD1_SCALE = 0.18215  # ComfyUI multiplies VAE latents by this before the UNet sees them
CELL = 8

# Principal axes of the 8x8-cell colours (RGB in [-1, 1]) over renders of trained identities: rows are axes
# (luminance first), STD their standard deviations. Re-estimate with colour_basis(); a test checks the match.
COLOUR_MEAN = (0.0765, 0.0817, 0.0441)
COLOUR_AXES = ((0.6363, 0.5597, 0.5309), (-0.6395, -0.0021, 0.7688), (-0.4314, 0.8287, -0.3566))
COLOUR_STD = (0.9824, 0.4152, 0.2422)


def colour_basis(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, axes as rows, standard deviations) of N x 3 cell colours; axes by falling variance, signs fixed so
    each axis' largest entry is positive."""
    mean = cells.mean(0)
    variances, vectors = np.linalg.eigh(np.cov(cells.T))
    order = np.argsort(variances)[::-1]
    axes = vectors[:, order].T
    axes *= np.sign(axes[np.arange(3), np.abs(axes).argmax(1)])[:, None]
    return mean, axes, np.sqrt(variances[order])


def encode_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """(M, b): latent = M @ rgb + b for a cell's mean colour rgb in [-1, 1] (4 x 3 and 4; last row zero)."""
    axes, std, mean = (torch.tensor(v, dtype=torch.float64) for v in (COLOUR_AXES, COLOUR_STD, COLOUR_MEAN))
    m = torch.zeros(4, 3, dtype=torch.float64)
    m[:3] = axes / std[:, None] / SD1_SCALE
    return m, -m @ mean


def decode_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """(D, c): rgb = D @ latent + c (3 x 4 and 3), the inverse of encode_matrix on its first three channels."""
    axes, std, mean = (torch.tensor(v, dtype=torch.float64) for v in (COLOUR_AXES, COLOUR_STD, COLOUR_MEAN))
    d = torch.zeros(3, 4, dtype=torch.float64)
    d[:, :3] = axes.T * std[None, :] * SD1_SCALE
    return d, mean


def encode(pixels: torch.Tensor) -> torch.Tensor:
    """What the analytic VAE's encoder computes (up to its ~1e-3 gain error): B x 3 x H x W in [-1, 1] ->
    B x 4 x H/8 x W/8 latents (before SD1's scale factor). Used to train without running the 84 M-weight VAE."""
    m, b = (t.to(pixels.dtype) for t in encode_matrix())
    cells = F.avg_pool2d(pixels, CELL)
    return torch.einsum("kc,bchw->bkhw", m, cells) + b[None, :, None, None]


def decode(latents: torch.Tensor) -> torch.Tensor:
    """What the analytic VAE's decoder computes: latents -> B x 3 x H x W in [-1, 1] (unclamped)."""
    d, c = (t.to(latents.dtype) for t in decode_matrix())
    rgb = torch.einsum("ck,bkhw->bchw", d, latents) + c[None, :, None, None]
    return F.interpolate(rgb, scale_factor=CELL, mode="nearest")


# --- TAESD's weights ----------------------------------------------------------------------------------------------
WIDTH = 64
LATENT_SCALE = 0.004  # vae_scale: latents (|z| < 25) enter the decoder's Clamp below 0.1
LANE_OFFSET = 1.0  # decoder lanes carry colour (in [0, 1]) + this, so ReLU keeps colours above -1
ENCODER = ("conv", "block", "down", "block", "block", "block", "down", "block", "block", "block", "down", "block",
           "block", "block", "conv_out")
DECODER = ("clamp", "conv_in", "relu", "block", "block", "block", "up", "conv", "block", "block", "block", "up", "conv",
           "block", "block", "block", "up", "conv", "block", "conv_out")


def _block(prefix: str, out: dict[str, torch.Tensor]) -> None:
    """A Block whose residual branch is zero: relu(x + 0) = x on non-negative lanes."""
    for i in (0, 2, 4):
        out[f"{prefix}.conv.{i}.weight"] = torch.zeros(WIDTH, WIDTH, 3, 3)
        out[f"{prefix}.conv.{i}.bias"] = torch.zeros(WIDTH)


def _taps(cout: int, cin: int, taps: list[tuple[int, int, float]], where: tuple[slice, slice]) -> torch.Tensor:
    """A 3x3 conv weight mapping input lane i to output lane o with gain g at the kernel positions `where`."""
    w = torch.zeros(cout, cin, 3, 3)
    for o, i, g in taps:
        w[o, i][where] = g
    return w


CENTRE = (slice(1, 2), slice(1, 2))
LOWER_RIGHT = (slice(1, 3), slice(1, 3))  # with stride 2 and padding 1: input pixels 2i and 2i + 1


def vae_state_dict() -> dict[str, torch.Tensor]:
    """Every weight of the analytic TAESD, with ComfyUI's keys (without the checkpoint's `first_stage_model.`)."""
    m, b = encode_matrix()
    d, c = decode_matrix()
    # pictures enter TAESD in [0, 1]: rgb[-1, 1] = 2 rgb01 - 1
    m01, b01 = 2 * m, b - m.sum(1)
    out: dict[str, torch.Tensor] = {"vae_scale": torch.tensor(LATENT_SCALE), "vae_shift": torch.tensor(0.0)}
    rgb = [(k, k, 1.0) for k in range(3)]
    for i, kind in enumerate(ENCODER):
        key = f"taesd_encoder.{i}"
        if kind == "conv":
            out[f"{key}.weight"], out[f"{key}.bias"] = _taps(WIDTH, 3, rgb, CENTRE), torch.zeros(WIDTH)
        elif kind == "block":
            _block(key, out)
        elif kind == "down":
            out[f"{key}.weight"] = _taps(WIDTH, WIDTH, [(k, k, 0.25) for k in range(3)], LOWER_RIGHT)
        else:  # latent * vae_scale, as TAESD.encode divides by it
            w = torch.zeros(4, WIDTH, 3, 3)
            w[:, :3, 1, 1] = LATENT_SCALE * m01
            out[f"{key}.weight"], out[f"{key}.bias"] = w, LATENT_SCALE * b01
    # rgb01 = (rgb[-1, 1] + 1) / 2 = (d z + c + 1) / 2, with z = input / vae_scale
    for i, kind in enumerate(DECODER):
        key = f"taesd_decoder.{i}"
        if kind == "conv_in":
            w = torch.zeros(WIDTH, 4, 3, 3)
            w[:3, :, 1, 1] = d / 2 / LATENT_SCALE
            bias = torch.zeros(WIDTH)
            bias[:3] = (c + 1) / 2 + LANE_OFFSET
            out[f"{key}.weight"], out[f"{key}.bias"] = w, bias
        elif kind == "block":
            _block(key, out)
        elif kind == "conv":
            out[f"{key}.weight"] = _taps(WIDTH, WIDTH, rgb, CENTRE)
        elif kind == "conv_out":
            out[f"{key}.weight"], out[f"{key}.bias"] = _taps(3, WIDTH, rgb, CENTRE), torch.full((3,), -LANE_OFFSET)
    return {k: v.float() for k, v in out.items()}
