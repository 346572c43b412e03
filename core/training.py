"""The training loop of the paper, top to bottom: data -> noise -> forward -> L_LDM + λ·L_attn -> step.

Host-free: everything that touches the diffusion model goes through a `TrainingBackend`
(the ComfyUI one lives in `host/backend.py`), so this file reads like the paper.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .augment import augment, make_augmenter
from .errors import SeFiError
from .generator import GENERATOR_VERSION, TokenGenerator
from .identity import Identity, image_sha256, token_norms
from .loss_scale import LossScale
from .losses import attention_loss, ldm_loss
from .settings import TrainSettings
from .stages import stage_of_timestep


class TrainingBackend(Protocol):
    family: str
    encoders: dict[str, int]  # encoder name -> width
    placeholder_index: int  # token position of the placeholder in the target prompt
    eos_index: int
    compute_dtype: torch.dtype  # the host's UNet compute dtype: fp16 gets loss scaling

    def base_vectors(self) -> dict[str, torch.Tensor]: ...
    def reference_context(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...  # (context, pooled)
    def target_contexts(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def latents(self, images: torch.Tensor) -> torch.Tensor: ...
    def latent_mask(self, mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor: ...
    def predict_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, context_k: torch.Tensor,
                      context_v: torch.Tensor, capture: bool, pooled: torch.Tensor | None = None,
                      chunks: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


@dataclass
class TrainResult:
    identity: Identity
    history: list[dict] = field(default_factory=list)


class TrainingStopped(Exception):
    """Training ended before its last step; `partial` holds the last good state, resumable exactly."""

    def __init__(self, cause: BaseException, partial: TrainResult):
        super().__init__(str(cause))
        self.cause = cause
        self.partial = partial


def _optimizer_state(optimizer: torch.optim.Adam, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[param]}.{key}"] = torch.as_tensor(value, dtype=torch.float32).detach().cpu().clone()
    return out


LOSS_SCALE_KEY = "loss_scale"


def _load_optimizer_state(optimizer: torch.optim.Adam, names: dict[torch.nn.Parameter, str],
                          state: dict[str, torch.Tensor]) -> None:
    for param, name in names.items():
        entries = {k[len(name) + 1:]: t for k, t in state.items() if k.startswith(name + ".")}
        if not entries:
            continue
        optimizer.state[param] = {
            "step": entries["step"].to(torch.float32).reshape(()).clone(),
            "exp_avg": entries["exp_avg"].to(param).clone(),
            "exp_avg_sq": entries["exp_avg_sq"].to(param).clone(),
        }


def _build_generators(base: dict[str, torch.Tensor], settings: TrainSettings,
                      resume: Identity | None) -> dict[str, TokenGenerator]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        gens = {enc: TokenGenerator(vec, settings.num_stages) for enc, vec in sorted(base.items())}
    if resume is not None:
        if resume.generator_state and resume.generator_version != GENERATOR_VERSION:
            raise SeFiError(f"Cannot resume from identity '{resume.placeholder}': it was trained with generator "
                            f"version {resume.generator_version}, whose per-stage K/V tokens collapse to one token; "
                            f"this pack trains version {GENERATOR_VERSION}. The identity still works for generation "
                            f"as it is; to continue training, learn it again without 'resume_from'.")
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
    """Learn per-stage K/V identity tokens from one image (1,3,H,W in [0,1]); mask (1,1,H,W) optional.

    Raises TrainingStopped (with the last good, exactly resumable state) on cancel or divergence.
    """
    settings.validate()
    generators = _build_generators(backend.base_vectors(), settings, resume)
    names = {p: f"{enc}.{n}" for enc, g in generators.items() for n, p in g.named_parameters()}
    optimizer = torch.optim.Adam(list(names), lr=settings.lr)
    augmenter = make_augmenter(settings)
    rng = torch.Generator().manual_seed(settings.seed)
    loss_scale = LossScale.for_dtype(getattr(backend, "compute_dtype", torch.float32))
    start = 0
    if resume is not None and resume.optimizer_state:
        # exact continuation: Adam moments restored, and the same t/ε stream fast-forwarded
        start = resume.trained_steps
        if start >= settings.steps:
            raise SeFiError(f"The identity to resume was already trained for {start} steps; set steps above that.")
        _load_optimizer_state(optimizer, names, resume.optimizer_state)
        loss_scale.load(resume.optimizer_state.get(LOSS_SCALE_KEY))

    with torch.no_grad():
        ref_context, ref_pooled = backend.reference_context()  # frozen: "a photo of the face of person"
        base = {enc: gen.base.clone() for enc, gen in generators.items()}

    history: list[dict] = []
    B = settings.batch_size
    latent_side = settings.resolution // 8
    for _ in range(start):
        torch.randint(0, 1000, (B,), generator=rng)
        torch.randn((B, 4, latent_side, latent_side), generator=rng)
    try:
        for step in range(start, settings.steps):
            _train_step(backend, generators, optimizer, loss_scale, augmenter, rng, image, mask, ref_context,
                        ref_pooled, settings, step, history, on_step)
    except Exception as exc:  # cancel or divergence: hand back the last good state, resumable exactly
        done = start + len(history)  # a step is recorded only after its optimizer update
        raise TrainingStopped(exc, TrainResult(_finish(generators, optimizer, names, loss_scale, base, settings,
                                                       image, backend.family, done), history)) from exc
    return TrainResult(_finish(generators, optimizer, names, loss_scale, base, settings, image, backend.family,
                               settings.steps), history)


def _train_step(backend, generators, optimizer, loss_scale: LossScale, augmenter, rng, image, mask, ref_context,
                ref_pooled, settings: TrainSettings, step: int, history: list[dict], on_step) -> None:
    """One step: data -> noise -> forward -> L = L_LDM + λ·L_attn -> Adam."""
    S, B = settings.num_stages, settings.batch_size
    use_attn = settings.attn_lambda > 0
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

    # forward with the current stage's tokens: C^K_s from k_s, C^V_s from v_s
    rows = {}
    for enc, gen in generators.items():
        k, v = gen()
        rows[enc] = torch.cat([k[stage], (v if settings.kv_split else k)[stage]])
    contexts, pooled = backend.target_contexts(rows)  # K rows first: SDXL's pooled comes from the K path
    ctx_k, ctx_v = contexts[:B], contexts[B:]
    ref_k = ref_context.expand(B, -1, -1)

    # A_ref: the reference context, same z_t and t, no gradient
    ref_maps: list[torch.Tensor] = []
    in_batch = settings.reference_in_batch
    if in_batch is None:
        in_batch = backend.family == "sd1"
    if use_attn and in_batch:  # one UNet pass of 2B rows: reference first, then target
        both = _pair(ref_pooled, pooled, B)
        eps_pred, maps = backend.predict_noise(torch.cat([z0, z0]), torch.cat([eps, eps]), torch.cat([t, t]),
                                               torch.cat([ref_k, ctx_k]), torch.cat([ref_k, ctx_v]), capture=True,
                                               pooled=both, chunks=2)
        eps_pred = eps_pred[B:]
        half = maps[0].shape[0] // 2 if maps else 0  # maps are (rows·heads, HW, tokens), row-major
        ref_maps = [m[:half].detach() for m in maps]
        tgt_maps = [m[half:] for m in maps]
    else:
        if use_attn:
            with torch.no_grad():
                _, ref_maps = backend.predict_noise(z0, eps, t, ref_k, ref_k, capture=True, pooled=ref_pooled)
        eps_pred, tgt_maps = backend.predict_noise(z0, eps, t, ctx_k, ctx_v, capture=use_attn, pooled=pooled)

    l_ldm = ldm_loss(eps, eps_pred, latent_mask)  # L_LDM
    l_attn = (attention_loss(tgt_maps, ref_maps, settings.token_option, backend.placeholder_index,
                             backend.eos_index) if use_attn else torch.zeros((), device=l_ldm.device))  # L_attn
    loss = l_ldm + settings.attn_lambda * l_attn  # L = L_LDM + λ·L_attn
    optimizer.zero_grad(set_to_none=True)
    (loss * loss_scale.value if loss_scale.dynamic else loss).backward()  # scaled: fp16's range (loss_scale.py)
    grads = [p.grad for g in generators.values() for p in g.parameters() if p.grad is not None]
    # ONE host-device sync per step: the losses and the gradient check come back together
    grads_finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
    loss_value, ldm_value, attn_value, grads_ok = torch.stack(
        [loss.detach().float(), l_ldm.detach().float(), l_attn.detach().float().to(loss.device),
         grads_finite.to(loss.device, torch.float32)]).tolist()
    if not math.isfinite(loss_value):  # raised before the update: the state stays the last good one
        raise SeFiError(f"Training diverged at step {step + 1}: the loss became {loss_value}. "
                        f"Lower the learning rate or λ, or check the image.")
    scale_used = loss_scale.value
    take_step = loss_scale.update(bool(grads_ok))
    if not grads_ok and (not loss_scale.dynamic or loss_scale.value < 1):
        raise SeFiError(f"Training diverged at step {step + 1}: the gradients became NaN or infinite. "
                        f"Lower the learning rate or λ, or check the image.")
    if take_step:
        if loss_scale.dynamic:
            for g in grads:
                g.div_(scale_used)  # a power of two: exact
        optimizer.step()

    record = {"step": step + 1, "loss": loss_value, "ldm": ldm_value, "attn": attn_value,
              "t": int(t[0]), "stage": int(stage[0]), "skipped": not take_step, "loss_scale": scale_used}
    history.append(record)
    if on_step is not None:
        on_step(step + 1, settings.steps, record)


def _pair(ref_pooled: torch.Tensor | None, pooled: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Pooled text rows for a reference+target batch (SDXL); None for families without one."""
    if pooled is None:
        return None
    return torch.cat([ref_pooled.expand(batch, -1).to(pooled), pooled.expand(batch, -1)])


def _finish(generators: dict[str, TokenGenerator], optimizer: torch.optim.Adam, names: dict, loss_scale: LossScale,
            base: dict[str, torch.Tensor], settings: TrainSettings, image: torch.Tensor, family: str,
            trained_steps: int) -> Identity:
    k, v, state = {}, {}, {}
    with torch.no_grad():
        for enc, gen in generators.items():
            k_enc, v_enc = gen()
            k[enc] = k_enc.detach().float().cpu()
            v[enc] = (v_enc if settings.kv_split else k_enc).detach().float().cpu()
            state.update({f"{enc}.{name}": t.detach().float().cpu() for name, t in gen.state_dict().items()})
    optimizer_state = _optimizer_state(optimizer, names)
    if loss_scale.dynamic:
        optimizer_state[LOSS_SCALE_KEY] = loss_scale.state().float()
    return Identity(
        family=family,
        placeholder=settings.placeholder,
        init_word=settings.init_word,
        k=k,
        v=v,
        training=settings.to_metadata(),
        reference_sha256=image_sha256(image),
        generator_state=state,
        generator_version=GENERATOR_VERSION,
        optimizer_state=optimizer_state,
        trained_steps=trained_steps,
        token_norms=token_norms(k, v, base),
    )
