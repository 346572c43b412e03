"""Each identity's training noise: t ~ U{0..999} and ε ~ N(0, I) per step, from its own seeded generator.

Drawn on the CPU in the loop's order (t, then ε, step by step), so the numbers are the same on every device and
for any chunking; `CHUNK_STEPS` steps at a time go to the device in one copy the host does not wait for. Per-step
copies from ordinary (pageable) CPU memory make the host wait for the GPU to finish everything queued before them.
"""
from __future__ import annotations

import torch

CHUNK_STEPS = 25
NUM_TIMESTEPS = 1000
LATENT_CHANNELS = 4  # SD1 and SDXL


def to_device(cpu: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A CPU tensor onto `like`'s device (and dtype, for floating tensors); to a GPU from pinned memory without the
    host waiting for the copy."""
    dtype = like.dtype if cpu.is_floating_point() else cpu.dtype
    if like.device.type == "cuda":
        return cpu.pin_memory().to(like.device, dtype, non_blocking=True)
    return cpu.to(like.device, dtype)


class NoiseStream:
    """One identity's (t, ε) per step; `take()` gives the next step's t on the CPU (for the record) and t, ε on the
    device."""

    def __init__(self, seed: int, batch: int, latent_side: int, device: torch.device):
        self.rng = torch.Generator().manual_seed(seed)
        self.batch = batch
        self.shape = (batch, LATENT_CHANNELS, latent_side, latent_side)
        self.like = torch.empty(0, device=device)
        self._cpu: list[torch.Tensor] = []
        self._device: tuple[torch.Tensor, torch.Tensor] | None = None
        self._next = 0

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, NUM_TIMESTEPS, (self.batch,), generator=self.rng)
        return t, torch.randn(self.shape, generator=self.rng)

    def skip(self, steps: int) -> None:
        """Fast-forward past `steps` steps (an exact resume continues the same stream); only before the first take."""
        for _ in range(steps):
            self._draw()

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._next == len(self._cpu):  # the first take, or this chunk is used up
            draws = [self._draw() for _ in range(CHUNK_STEPS)]
            self._cpu = [t for t, _ in draws]
            self._device = (to_device(torch.stack(self._cpu), self.like),
                            to_device(torch.stack([eps for _, eps in draws]), self.like))
            self._next = 0
        i, self._next = self._next, self._next + 1
        return self._cpu[i], self._device[0][i], self._device[1][i]
