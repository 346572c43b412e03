"""Dynamic loss scaling for the backward pass through reduced-precision (fp16) host weights.

The gradient that reaches the UNet output is ~2·|ε − ε_θ|/N per element (N = 4·64·64 at 512 px), near
fp16's subnormal range: without scaling, much of it would round to zero inside the fp16 backward pass.
The loss is multiplied by a power of two before backward and the generator's (fp32) gradients are divided
by it after, which is exact in binary floating point. An overflow (a non-finite gradient) skips the step
and halves the scale; a run of good steps doubles it. fp32 and bf16 have fp32's range: no scaling there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INITIAL_SCALE = 2.0 ** 12
GROWTH_INTERVAL = 100
MAX_SCALE = 2.0 ** 24


@dataclass
class LossScale:
    value: float = 1.0
    dynamic: bool = False
    good_steps: int = 0

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> LossScale:
        return cls(INITIAL_SCALE, True) if dtype == torch.float16 else cls()

    def update(self, grads_finite: bool) -> bool:
        """After a backward pass: whether to take the optimizer step (False: skip it, the scale was too high)."""
        if not self.dynamic:
            return grads_finite
        if not grads_finite:
            self.value /= 2
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps >= GROWTH_INTERVAL and self.value < MAX_SCALE:
            self.value *= 2
            self.good_steps = 0
        return True

    def state(self) -> torch.Tensor:
        return torch.tensor([self.value, float(self.good_steps)], dtype=torch.float64)

    def load(self, state: torch.Tensor | None) -> None:
        if self.dynamic and state is not None:
            self.value, self.good_steps = float(state[0]), int(state[1])
