"""Timestep -> stage mapping: the 1000 training timesteps split evenly into S stages."""
from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def stage_of_timestep(t: torch.Tensor | float, num_stages: int) -> torch.Tensor:
    """stage(t) = min(S-1, floor(t*S/1000)); high t (early sampling) -> last stage index."""
    # float32 is exact here (t·S < 2^24 and a non-integer t·S/1000 is ≥ 0.001 from an integer) and runs on any device
    t = torch.as_tensor(t, dtype=torch.float32)
    stage = torch.floor(t * num_stages / NUM_TRAIN_TIMESTEPS).long()
    return stage.clamp(0, num_stages - 1)


def stage_timestep_range(stage: int, num_stages: int) -> tuple[int, int]:
    """Inclusive integer timestep range [lo, hi] that maps to `stage`."""
    lo = -(-stage * NUM_TRAIN_TIMESTEPS // num_stages)  # ceil
    hi = -(-(stage + 1) * NUM_TRAIN_TIMESTEPS // num_stages) - 1
    return lo, min(hi, NUM_TRAIN_TIMESTEPS - 1)


def stage_middle_timestep(stage: int, num_stages: int) -> int:
    """The timestep in the middle of `stage`'s range: where the heat maps look at each stage."""
    lo, hi = stage_timestep_range(stage, num_stages)
    return (lo + hi) // 2
