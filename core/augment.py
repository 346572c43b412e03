"""The paper's augmentations (colour jitter, horizontal flip p=0.5, random scaling) via kornia."""
from __future__ import annotations

import torch

from .settings import TrainSettings


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
    """images (B,3,H,W) in [0,1]; seeded without disturbing the global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augmenter(images, masks)
