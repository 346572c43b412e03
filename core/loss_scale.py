"""Dynamic loss scaling for the backward pass through reduced-precision (fp16) host weights.

The gradient that reaches the UNet output is ~2·|ε − ε_θ|/N per element (N = 4·64·64 at 512 px), near
fp16's subnormal range: without scaling, much of it would round to zero inside the fp16 backward pass.
The loss is multiplied by a power of two before backward and the generator's (fp32) gradients are divided
by it after, which is exact in binary floating point. An overflow (a non-finite gradient) skips the step
and halves the scale; a run of good steps doubles it. fp32 and bf16 have fp32's range: no scaling there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# device types whose torch build has no kernel for `_amp_foreach_non_finite_check_and_unscale_` (e.g. Apple's MPS or
# the CPU on older torch): found at the first call, then the per-gradient check runs there
_NO_CHECK_KERNEL: set[str] = set()

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


def unscale_and_check(grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """grads *= inv_scale, and found_inf (one element) becomes 1 if any gradient element is inf/NaN; on the device,
    without the host waiting. One multi-tensor kernel where the device has it (what torch's GradScaler uses); else
    the same result from two small ops per gradient."""
    device = grads[0].device.type
    if device not in _NO_CHECK_KERNEL:
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
            return
        except NotImplementedError:
            _NO_CHECK_KERNEL.add(device)
            log.info("SeFi-IDE: this torch build has no one-kernel gradient check on %s; checking each gradient "
                     "tensor instead (same result, a few more small ops per step).", device)
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    found_inf.copy_(torch.maximum(found_inf, (~finite).to(found_inf.dtype)))
    for g in grads:
        g.mul_(inv_scale)
