"""The training loop of the paper, top to bottom: data -> noise -> forward -> L_LDM + λ·L_attn -> step.

Host-free: everything that touches the diffusion model goes through a `TrainingBackend`
(the ComfyUI one lives in `host/backend.py`), so this file reads like the paper.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .augment import augment, make_augmenter
from .errors import SeFiError
from .generator import TokenGenerator
from .identity import Identity, image_sha256
from .losses import attention_loss, ldm_loss
from .settings import TrainSettings
from .stages import stage_of_timestep


class TrainingBackend(Protocol):
    family: str
    encoders: dict[str, int]  # encoder name -> width
    placeholder_index: int  # token position of the placeholder in the target prompt
    eos_index: int

    def base_vectors(self) -> dict[str, torch.Tensor]: ...
    def reference_context(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...  # (context, pooled)
    def target_contexts(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def latents(self, images: torch.Tensor) -> torch.Tensor: ...
    def latent_mask(self, mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor: ...
    def predict_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, context_k: torch.Tensor,
                      context_v: torch.Tensor, capture: bool,
                      pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


@dataclass
class TrainResult:
    identity: Identity
    history: list[dict] = field(default_factory=list)


def _build_generators(base: dict[str, torch.Tensor], settings: TrainSettings,
                      resume: Identity | None) -> dict[str, TokenGenerator]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        gens = {enc: TokenGenerator(vec, settings.num_stages) for enc, vec in sorted(base.items())}
    if resume is not None:
        for enc, gen in gens.items():
            state = {k[len(enc) + 1:]: t for k, t in resume.generator_state.items() if k.startswith(enc + ".")}
            if not state:
                raise SeFiError(f"Cannot resume from identity '{resume.placeholder}': the file holds no generator "
                                f"weights for {enc} (save it with 'include generator' on).")
            try:
                gen.load_state_dict(state)
            except RuntimeError as exc:
                raise SeFiError(f"Cannot resume from identity '{resume.placeholder}': its generator does not match "
                                f"these settings (stages {settings.num_stages}) - {exc}") from None
    return gens


def train_identity(
    backend: TrainingBackend,
    image: torch.Tensor,
    settings: TrainSettings,
    mask: torch.Tensor | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
    resume: Identity | None = None,
) -> TrainResult:
    """Learn per-stage K/V identity tokens from one image (1,3,H,W in [0,1]); mask (1,1,H,W) optional."""
    S = settings.num_stages
    generators = _build_generators(backend.base_vectors(), settings, resume)
    params = [p for g in generators.values() for p in g.parameters()]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    augmenter = make_augmenter(settings)
    rng = torch.Generator().manual_seed(settings.seed)
    use_attn = settings.attn_lambda > 0

    with torch.no_grad():
        ref_context, ref_pooled = backend.reference_context()  # frozen: "a photo of the face of person"

    history: list[dict] = []
    B = settings.batch_size
    for step in range(settings.steps):
        # data: augmented reference (and the mask through the same geometric transform)
        images = image.expand(B, -1, -1, -1)
        masks = mask.expand(B, -1, -1, -1) if mask is not None else None
        images, masks = augment(augmenter, images, masks, seed=settings.seed * 1_000_003 + step)
        with torch.no_grad():
            z0 = backend.latents(images)
        latent_mask = backend.latent_mask(masks, z0.shape) if masks is not None else None

        # noise: t ~ U{0..999}, ε ~ N(0, I)
        t = torch.randint(0, 1000, (B,), generator=rng)
        eps = torch.randn(z0.shape, generator=rng).to(z0)
        stage = stage_of_timestep(t, S)

        # A_ref under the reference context, same z_t and t, no gradient
        ref_maps: list[torch.Tensor] = []
        if use_attn:
            with torch.no_grad():
                _, ref_maps = backend.predict_noise(z0, eps, t, ref_context.expand(B, -1, -1),
                                                    ref_context.expand(B, -1, -1), capture=True, pooled=ref_pooled)

        # forward with the current stage's tokens: C^K_s from k_s, C^V_s from v_s
        rows = {}
        for enc, gen in generators.items():
            k, v = gen()
            rows[enc] = torch.cat([k[stage], (v if settings.kv_split else k)[stage]])
        contexts, pooled = backend.target_contexts(rows)  # K rows first: SDXL's pooled comes from the K path
        eps_pred, tgt_maps = backend.predict_noise(z0, eps, t, contexts[:B], contexts[B:], capture=use_attn,
                                                   pooled=pooled)

        l_ldm = ldm_loss(eps, eps_pred, latent_mask)  # L_LDM
        l_attn = (attention_loss(tgt_maps, ref_maps, settings.token_option, backend.placeholder_index,
                                 backend.eos_index) if use_attn else torch.zeros(()))  # L_attn
        loss = l_ldm + settings.attn_lambda * l_attn  # L = L_LDM + λ·L_attn
        if not torch.isfinite(loss):
            raise SeFiError(f"Training diverged at step {step + 1}: the loss became {loss.item()}. "
                            f"Lower the learning rate or λ, or check the image.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        record = {"step": step + 1, "loss": loss.detach().item(), "ldm": l_ldm.detach().item(),
                  "attn": l_attn.detach().item(),
                  "t": int(t[0]), "stage": int(stage[0])}
        history.append(record)
        if on_step is not None:
            on_step(step + 1, settings.steps, record)

    return TrainResult(_finish(generators, settings, image, backend.family), history)


def _finish(generators: dict[str, TokenGenerator], settings: TrainSettings, image: torch.Tensor,
            family: str) -> Identity:
    k, v, state = {}, {}, {}
    with torch.no_grad():
        for enc, gen in generators.items():
            k_enc, v_enc = gen()
            k[enc] = k_enc.detach().float().cpu()
            v[enc] = (v_enc if settings.kv_split else k_enc).detach().float().cpu()
            state.update({f"{enc}.{name}": t.detach().float().cpu() for name, t in gen.state_dict().items()})
    return Identity(
        family=family,
        placeholder=settings.placeholder,
        init_word=settings.init_word,
        k=k,
        v=v,
        training=settings.to_metadata(),
        reference_sha256=image_sha256(image),
        generator_state=state,
    )
