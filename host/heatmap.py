"""Where the identity token attends, per stage: heat maps over the reference image."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.identity import Identity, norm_report
from ..core.settings import TrainSettings
from ..core.stages import stage_middle_timestep
from .backend import ComfyTrainingBackend
from .text import detect_family, word_embedding


def colorize(m: torch.Tensor) -> torch.Tensor:
    """(H,W) in [0,1] -> (H,W,3) blue -> green -> red."""
    r = (1.5 - (4 * m - 3).abs()).clamp(0, 1)
    g = (1.5 - (4 * m - 2).abs()).clamp(0, 1)
    b = (1.5 - (4 * m - 1).abs()).clamp(0, 1)
    return torch.stack([r, g, b], dim=-1)


def noised_reference(backend: ComfyTrainingBackend, reference: torch.Tensor, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, ε): the (1,3,R,R) reference's latents and noise of their shape from `seed`, the heat maps' inputs."""
    with torch.no_grad():
        z0 = backend.latents(reference)
    return z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed)).to(z0)


def identity_stage_maps(backend: ComfyTrainingBackend, z0: torch.Tensor, eps: torch.Tensor, identity: Identity,
                        stage: int) -> list[torch.Tensor]:
    """The identity prompt's cross-attention maps (backend's loss layers, each heads x HW x 77) over the noised
    reference at the middle timestep of `stage`, that stage's K/V tokens in place of the placeholder."""
    t = torch.tensor([stage_middle_timestep(stage, identity.num_stages)])
    rows = {enc: torch.stack([identity.k[enc][stage], identity.v[enc][stage]]) for enc in identity.k}
    ctx, pooled = backend.target_contexts(rows)
    return backend.predict_noise(z0, eps, t, ctx[:1], ctx[1:], capture=True, pooled=pooled)[1]


def placeholder_attention(backend: ComfyTrainingBackend, z0: torch.Tensor, eps: torch.Tensor, identity: Identity,
                          size: int) -> torch.Tensor:
    """(S, size, size): the placeholder token's attention probability at every pixel, averaged over heads and summed
    over the backend's loss layers (each map resized to `size`), at the middle timestep of each stage."""
    heats = []
    with torch.no_grad():
        for s in range(identity.num_stages):
            heat = torch.zeros(size, size)
            for m in identity_stage_maps(backend, z0, eps, identity, s):
                col = m[..., backend.placeholder_index].float().mean(0)  # mean over heads
                side = int(col.numel() ** 0.5)
                heat += F.interpolate(col.reshape(1, 1, side, side).cpu(), size=(size, size), mode="bilinear")[0, 0]
            heats.append(heat)
    return torch.stack(heats)


def identity_heatmaps(model, clip, vae, reference: torch.Tensor, identity: Identity, seed: int = 0,
                      overlay: float = 0.5) -> tuple[torch.Tensor, str]:
    """IMAGE (S,R,R,3): the placeholder token's attention, averaged over heads and the loss layers,
    at the middle timestep of each stage, over the (1,3,R,R) reference; and the token-norm report."""
    identity.check_family(detect_family(clip, model))
    trained = identity.training
    settings = TrainSettings(placeholder=identity.placeholder, init_word=identity.init_word,
                             reference_prompt=trained.get("reference_prompt", TrainSettings.reference_prompt),
                             layers=trained.get("layers", "auto"), num_stages=identity.num_stages)
    backend = ComfyTrainingBackend(model, clip, vae, settings, learning=False)  # forward only: the user's MODEL
    z0, eps = noised_reference(backend, reference, seed)
    heats = placeholder_attention(backend, z0, eps, identity, reference.shape[-1])
    image = reference[0].permute(1, 2, 0).cpu()
    frames = []
    for heat in heats:
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
        frames.append((1 - overlay) * image + overlay * colorize(heat))
    return torch.stack(frames).clamp(0, 1), norm_report(identity, word_embedding(clip, identity.init_word))
