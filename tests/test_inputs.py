"""Reference image / mask checks: one clear error per bad input (no ComfyUI needed)."""
from __future__ import annotations

import pytest
import torch
from sefi_ide.core.errors import SeFiError
from sefi_ide.host.images import prepare_reference


def photo(h=96, w=80, c=3, seed=0):
    return torch.rand(1, h, w, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image,match", [
    (torch.zeros(1, 96, 96, 3), "blank"),
    (torch.full((1, 96, 96, 3), 0.7), "blank"),
    (photo(h=40, w=200), "at least 64x64"),
    (photo(h=4100, w=64), "at most 4096"),
    (torch.rand(2, 96, 96, 3), "batch of 2 images"),
    (torch.rand(1, 96, 96, 2), "2 channels"),
    (torch.rand(96, 96, 3), "batch of 1"),
])
def test_bad_images_get_one_clear_error(image, match):
    with pytest.raises(SeFiError, match=match):
        prepare_reference(image, None, 64)


def test_grayscale_and_rgba_are_accepted_as_rgb():
    rgb = photo()
    gray = rgb[..., :1]
    rgba = torch.cat([rgb, torch.ones_like(gray)], dim=-1)
    out_rgba, _ = prepare_reference(rgba, None, 64)
    out_rgb, _ = prepare_reference(rgb, None, 64)
    out_gray, _ = prepare_reference(gray, None, 64)
    assert out_rgb.shape == out_gray.shape == (1, 3, 64, 64)
    assert torch.equal(out_rgba, out_rgb)
    assert torch.equal(out_gray[:, 0], out_gray[:, 2])


def test_mask_follows_the_crop_and_bad_masks_are_refused():
    image = photo(h=96, w=128)
    mask = torch.zeros(1, 96, 128)
    mask[:, :, :64] = 1.0  # left half of a landscape photo
    _, m = prepare_reference(image, mask, 64)
    # 96x128 -> 64x85, centre crop keeps columns 10..74 of which 10..42 were the left half
    assert m.shape == (1, 1, 64, 64) and abs(m.mean().item() - 0.5) < 0.02
    assert (m[..., :, :30] > 0.99).all() and (m[..., :, 34:] < 0.01).all()
    with pytest.raises(SeFiError, match="matching the image"):
        prepare_reference(image, torch.ones(1, 10, 10), 64)
    with pytest.raises(SeFiError, match="empty"):
        prepare_reference(image, torch.zeros(1, 96, 128), 64)
