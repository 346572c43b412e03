"""Several identities learned together through the host's UNet: chunks of N identities per pass.

Training is launch-bound on a GPU (bench/RESULTS.md: ~43 ms of GPU work in a 150 ms SD1 step), so N identities in
one UNet batch cost less than N passes (H200, block G: 2.4x fewer seconds per SD1 identity at 8, 1.4x for SDXL).
How many fit is estimated from the measured peak memory of one identity (bench/RESULTS.md, H100, fp16 weights)
scaled by pixel count; a chunk that still runs out of memory is split in two and learned again from its start
(logged), so the default never ends in an out-of-memory error.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import torch

from ..core.errors import SeFiError
from ..core.settings import TrainSettings
from ..core.training import IdentityJob, TrainingStopped, TrainResult, train_identities
from .backend import ComfyTrainingBackend

log = logging.getLogger(__name__)

# activation memory of ONE identity's training step at the family's native size, fp16 weights (bench/RESULTS.md:
# peak while learning minus the weights): SD1 512 px ~2.0 GiB (reference in batch), SDXL 1024 px ~12.5 GiB; the
# slope measured on an H200 (block G) is lower, 1.5 and 11.1 GiB per extra identity: these keep a margin
PER_IDENTITY_GIB = {"sd1": 2.0, "sdxl": 12.5}
NATIVE_PIXELS = {"sd1": 512 ** 2, "sdxl": 1024 ** 2}
# gradient checkpointing keeps ~1/8 of the saved tensors, but recompute buffers remain: SDXL 1024 px on an H200,
# reference in batch, measured 5.6 GiB per extra identity against 11.1 without (bench/RESULTS.md, block G)
CHECKPOINTING_FACTOR = 0.5
MAX_PER_PASS = 16


def identities_per_pass(family: str, settings: TrainSettings, device: torch.device, count: int) -> int:
    """How many identities to put in one UNet batch: free memory / the per-identity estimate, 1..count."""
    per_identity = PER_IDENTITY_GIB[family] * 2 ** 30 * settings.resolution ** 2 / NATIVE_PIXELS[family]
    per_identity *= settings.batch_size * (CHECKPOINTING_FACTOR if settings.gradient_checkpointing else 1.0)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
        per_identity *= 2  # float32 activations on the CPU
    return max(1, min(count, MAX_PER_PASS, math.floor(0.8 * free / per_identity)))


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def learn_identities(model, clip, vae, jobs: list[IdentityJob], per_pass: int,
                     on_step: Callable[[int, int, dict], None] | None = None) -> list[TrainResult]:
    """Learn `jobs` in chunks of `per_pass` (0 = estimate from free memory). on_step(done, total, record) counts the
    steps of all chunks. Cancel raises TrainingStopped whose partials hold every identity that started: finished
    ones complete, the running chunk's at their last good state."""
    backend = ComfyTrainingBackend(model, clip, vae, jobs[0].settings)
    try:
        return _learn_in_chunks(backend, jobs, per_pass, on_step)
    finally:
        backend.release()  # DynamicVRAM: the learning copy goes now, whatever happened


def _learn_in_chunks(backend: ComfyTrainingBackend, jobs: list[IdentityJob], per_pass: int,
                     on_step: Callable[[int, int, dict], None] | None) -> list[TrainResult]:
    if per_pass <= 0:
        per_pass = identities_per_pass(backend.family, jobs[0].settings, torch.device(backend.device), len(jobs))
    steps = jobs[0].settings.steps
    results: list[TrainResult | None] = [None] * len(jobs)
    pending = [list(range(i, min(i + per_pass, len(jobs)))) for i in range(0, len(jobs), per_pass)]
    done_steps = 0
    while pending:
        chunk = pending.pop(0)
        base = done_steps

        def progress(step: int, total: int, record: dict, base=base) -> None:
            if on_step is not None:
                on_step(base + step, steps * len(jobs), record)

        try:
            chunk_results = train_identities(backend, [jobs[i] for i in chunk], progress)
        except TrainingStopped as stopped:
            if len(chunk) > 1 and _is_out_of_memory(stopped.cause):
                half = len(chunk) // 2
                log.warning("SeFi-IDE: %d identities in one pass ran out of memory; learning them %d and %d at a "
                            "time instead.", len(chunk), half, len(chunk) - half)
                pending[:0] = [chunk[:half], chunk[half:]]
                _free_device_memory()
                continue
            for i, partial in zip(chunk, stopped.partials):
                results[i] = partial
            raise TrainingStopped(stopped.cause, [r for r in results if r is not None]) from stopped.cause
        for i, result in zip(chunk, chunk_results):
            results[i] = result
        done_steps += steps * len(chunk)
    return results  # type: ignore[return-value]


def _free_device_memory() -> None:
    import comfy.model_management

    comfy.model_management.soft_empty_cache()


def batch_jobs(images: list[torch.Tensor], masks: list[torch.Tensor | None], placeholders: list[str],
               settings: TrainSettings) -> list[IdentityJob]:
    """One job per photo: identity i gets seed + i and its own placeholder; every other setting is shared."""
    if len(images) != len(placeholders):
        raise SeFiError(f"Got {len(images)} photos and {len(placeholders)} placeholders; give one placeholder per "
                        f"photo, in the order of the image batch.")
    return [IdentityJob(image, replace(settings, seed=settings.seed + i, placeholder=p), mask)
            for i, (image, mask, p) in enumerate(zip(images, masks, placeholders))]
