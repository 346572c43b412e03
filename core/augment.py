"""The paper's augmentations (colour jitter, horizontal flip p=0.5, random scaling) via kornia."""
from __future__ import annotations

from collections import defaultdict

import torch

from .settings import TrainSettings

# kornia parameters that hold one value for the whole call instead of one per image (the colour jitter applies its
# four adjustments in one random order per call)
_PER_CALL_PARAMS = ("order",)


class Augmenter(torch.nn.Module):
    """Photometric jitter on RGB only; flip and scaling on RGB and the optional mask together."""

    def __init__(self, settings: TrainSettings):
        super().__init__()
        import kornia.augmentation as K

        j = settings.color_jitter
        self.photometric = K.ColorJitter(j, j, j, min(j / 4, 0.5), p=1.0) if j > 0 else None
        geometric: list[torch.nn.Module] = []
        if settings.flip_p > 0:
            geometric.append(K.RandomHorizontalFlip(p=settings.flip_p))
        if (settings.scale_min, settings.scale_max) != (1.0, 1.0):
            geometric.append(K.RandomAffine(degrees=0.0, scale=(settings.scale_min, settings.scale_max),
                                            padding_mode="reflection", p=1.0))
        self.geometric = torch.nn.Sequential(*geometric)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.photometric is not None:
            images = self.photometric(images).clamp(0, 1)
        if len(self.geometric) == 0:
            return images, masks
        both = images if masks is None else torch.cat([images, masks], dim=1)
        both = self.geometric(both)
        return (both[:, :3], None) if masks is None else (both[:, :3], both[:, 3:])


def make_augmenter(settings: TrainSettings) -> Augmenter:
    return Augmenter(settings)


def augment(augmenter: Augmenter, images: torch.Tensor, masks: torch.Tensor | None,
            seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """images (B,3,H,W) in [0,1]; seeded without disturbing the global RNG stream. One identity's augmentation: the
    definition `augment_together` keeps for each identity (training calls that)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augmenter(images, masks)


def augment_together(augmenter: Augmenter, images: list[torch.Tensor], masks: list[torch.Tensor | None],
                     seeds: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """What `augment` gives each (images, mask, seed) alone, in fewer calls: each one's random parameters are drawn
    from its own seed exactly as `augment` draws them, then the flip and the scaling run once for all of them, and the
    colour jitter once per group that shares its random order of adjustments. Every kornia call costs the host a few
    hundred small ops whatever its batch size, so one call for N people instead of N shortens the step.
    All `images` have the same shape."""
    photometric, geometric = augmenter.photometric, list(augmenter.geometric)
    shapes = [(*x.shape[:1], x.shape[1] + (m.shape[1] if m is not None else 0), *x.shape[2:])
              for x, m in zip(images, masks)]
    colour, moves = [], []  # per item: its colour-jitter parameters, its flip/scaling parameters
    for x, shape, seed in zip(images, shapes, seeds):
        with torch.random.fork_rng(devices=[]):  # the draws in the order the modules make them in `augment`
            torch.manual_seed(seed)
            colour.append(photometric.forward_parameters(x.shape) if photometric is not None else None)
            moves.append([g.forward_parameters(shape) for g in geometric])

    images = list(images)
    if photometric is not None:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, params in enumerate(colour):
            groups[tuple(tuple(params[k].tolist()) for k in _PER_CALL_PARAMS if k in params)].append(i)
        for members in groups.values():
            batch = torch.cat([images[i] for i in members])
            out = photometric(batch, params=_joined([colour[i] for i in members], batch.shape)).clamp(0, 1)
            for i, x in zip(members, out.split([images[i].shape[0] for i in members])):
                images[i] = x
    if not geometric:
        return images, list(masks)

    # one batch of image + mask channels; an item without a mask gets a stand-in channel (each channel is moved on
    # its own, so the stand-in changes nothing) when another item has one
    mask_channels = max((m.shape[1] for m in masks if m is not None), default=0)
    rows = [torch.cat([x, m if m is not None else x[:, :1].new_zeros(x.shape[0], mask_channels, *x.shape[2:])], 1)
            if mask_channels else x for x, m in zip(images, masks)]
    both = torch.cat(rows)
    for n, module in enumerate(geometric):
        both = module(both, params=_joined([item[n] for item in moves], both.shape))
    parts = both.split([x.shape[0] for x in images])
    return [p[:, :3] for p in parts], [p[:, 3:] if m is not None else None for p, m in zip(parts, masks)]


def _joined(params: list[dict[str, torch.Tensor]], shape: torch.Size) -> dict[str, torch.Tensor]:
    """kornia parameters of several calls as the parameters of one call on their joined batch of `shape`."""
    if len(params) == 1:
        return params[0]
    joined = {}
    for key in params[0]:
        if key == "forward_input_shape":
            joined[key] = torch.tensor(shape)
        elif key in _PER_CALL_PARAMS:
            joined[key] = params[0][key]  # equal in every member (the caller groups by them)
        else:
            joined[key] = torch.cat([p[key] for p in params])
    return joined
