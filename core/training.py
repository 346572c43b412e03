"""The training loop of the paper, top to bottom: data -> noise -> forward -> L_LDM + λ·L_attn -> step.

Host-free: everything that touches the diffusion model goes through a `TrainingBackend`
(the ComfyUI one lives in `host/backend.py`), so this file reads like the paper.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from .augment import Augmenter, augment_together, make_augmenter
from .errors import SeFiError
from .generator import GENERATOR_VERSION, TokenGenerator
from .identity import Identity, image_sha256, token_norms
from .loss_scale import LossScale, unscale_and_check
from .losses import attention_loss, ldm_loss
from .noise import NoiseStream, to_device
from .settings import TrainSettings
from .stages import stage_of_timestep


class TrainingBackend(Protocol):
    family: str
    encoders: dict[str, int]  # encoder name -> width
    placeholder_index: int  # token position of the placeholder in the target prompt
    eos_index: int
    compute_dtype: torch.dtype  # the host's UNet compute dtype: fp16 gets loss scaling
    device: torch.device  # where the UNet runs: the generators, their Adam and the augmentation run there too

    def base_vectors(self) -> dict[str, torch.Tensor]: ...
    def reference_context(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...  # (context, pooled)
    def target_contexts(self, rows: dict[str, torch.Tensor],  # pooled of row 0, or of each row in pooled_of
                        pooled_of: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def latents(self, images: torch.Tensor) -> torch.Tensor: ...
    def latent_mask(self, mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor: ...
    def predict_noise(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, context_k: torch.Tensor,
                      context_v: torch.Tensor, capture: bool, pooled: torch.Tensor | None = None,
                      chunks: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


@dataclass
class TrainResult:
    identity: Identity
    history: list[dict] = field(default_factory=list)
    error: SeFiError | None = None  # set when this identity diverged: `identity` is its last good state


class TrainingStopped(Exception):
    """Training ended before its last step; `partials` hold each identity's last good state, resumable exactly
    (`partial`: the first, for one identity)."""

    def __init__(self, cause: BaseException, partials: list[TrainResult]):
        super().__init__(str(cause))
        self.cause = cause
        self.partials = partials
        self.partial = partials[0] if partials else None


def _optimizer_state(optimizer: torch.optim.Adam, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """One identity's Adam moments (`names`: its parameters) out of the optimizer all identities share."""
    out = {}
    for param, name in names.items():
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{name}.{key}"] = torch.as_tensor(value, dtype=torch.float32).detach().cpu().clone()
    return out


LOSS_SCALE_KEY = "loss_scale"


def _adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """ONE Adam for every identity's generator: Adam is elementwise per parameter, so one optimizer over all of them
    updates each exactly as an optimizer of its own would, in one fused kernel per step where the device has one
    (an identity that skips a step has its gradients set to None: Adam leaves those parameters and moments alone)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: no list to ask, and no fused kernel off CUDA
        def _get_fused_kernels_supported_devices() -> list[str]:
            return ["cuda"]

    fused = params[0].device.type in _get_fused_kernels_supported_devices()
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def _load_optimizer_state(optimizer: torch.optim.Adam, names: dict[torch.nn.Parameter, str],
                          state: dict[str, torch.Tensor]) -> None:
    fused = bool(optimizer.defaults.get("fused"))
    for param, name in names.items():
        entries = {k[len(name) + 1:]: t for k, t in state.items() if k.startswith(name + ".")}
        if not entries:
            continue
        step = entries["step"].to(torch.float32).reshape(()).clone()
        optimizer.state[param] = {
            "step": step.to(param.device) if fused else step,  # the fused kernel counts on the device
            "exp_avg": entries["exp_avg"].to(param).clone(),
            "exp_avg_sq": entries["exp_avg_sq"].to(param).clone(),
        }


def _build_generators(base: dict[str, torch.Tensor], settings: TrainSettings, resume: Identity | None,
                      device: torch.device) -> dict[str, TokenGenerator]:
    with torch.random.fork_rng(devices=[]):  # initialised on the CPU: the same start on every device
        torch.manual_seed(settings.seed)
        gens = {enc: TokenGenerator(vec, settings.num_stages).to(device) for enc, vec in sorted(base.items())}
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


@dataclass
class IdentityJob:
    """One identity to learn: its photos (P,3,R,R in [0,1]; each step samples one per row when P > 1), optional mask
    (1,1,R,R, one photo only), settings and resume state. Jobs learned together may differ only in seed and
    placeholder (they share the UNet batch)."""

    image: torch.Tensor
    settings: TrainSettings
    mask: torch.Tensor | None = None
    resume: Identity | None = None


@dataclass
class _Learner:
    """The per-identity state of a run: its own generators, Adam moments, loss scale, seeded t/ε stream and history.
    `images` / `mask`: the job's photos and mask on the device (the augmentation runs there)."""

    job: IdentityJob
    images: torch.Tensor
    mask: torch.Tensor | None
    generators: dict[str, TokenGenerator]
    names: dict[torch.nn.Parameter, str]
    loss_scale: LossScale
    noise: NoiseStream
    # which photo each row uses (several photos): apart from `noise`, so one photo = as before
    photo_rng: torch.Generator
    base: dict[str, torch.Tensor]
    start: int
    family: str
    history: list[dict] = field(default_factory=list)
    error: SeFiError | None = None  # diverged: it stopped at its last good state, the others go on

    def result(self, optimizer: torch.optim.Adam) -> TrainResult:
        """Its last good state; `optimizer`: the run's Adam, shared by every identity (see `_adam`)."""
        s = self.job.settings
        done = self.start + len(self.history)  # a step is recorded only after its optimizer update
        identity = _finish(self.generators, optimizer, self.names, self.loss_scale, self.base, s, self.job.image,
                           self.family, done)
        return TrainResult(identity, self.history, self.error)


def _learner(backend: TrainingBackend, job: IdentityJob) -> _Learner:
    settings, resume = job.settings, job.resume
    settings.validate()
    generators = _build_generators(backend.base_vectors(), settings, resume, backend.device)
    names = {p: f"{enc}.{n}" for enc, g in generators.items() for n, p in g.named_parameters()}
    loss_scale = LossScale.for_dtype(getattr(backend, "compute_dtype", torch.float32))
    noise = NoiseStream(settings.seed, settings.batch_size, settings.resolution // 8, backend.device)
    # its own stream, seeded by a 64-bit mix of the seed: unrelated to the t/ε stream `noise` draws from `seed`
    photo_rng = torch.Generator().manual_seed((settings.seed * 0x9E3779B97F4A7C15 + 0x5851F42D4C957F2D) % 2 ** 63)
    photos = job.image.shape[0]
    if job.mask is not None and photos > 1:
        raise SeFiError("A mask belongs to one photo; disconnect the mask or the extra photos.")
    start = 0
    if resume is not None and resume.optimizer_state:
        # exact continuation: Adam moments restored, and the same t/ε stream fast-forwarded
        start = resume.trained_steps
        if start >= settings.steps:
            raise SeFiError(f"The identity to resume was already trained for {start} steps; set steps above that.")
        loss_scale.load(resume.optimizer_state.get(LOSS_SCALE_KEY))
    noise.skip(start)
    for _ in range(start):
        if photos > 1:
            torch.randint(0, photos, (settings.batch_size,), generator=photo_rng)
    mask = None if job.mask is None else job.mask.to(backend.device)
    return _Learner(job, job.image.to(backend.device), mask, generators, names, loss_scale, noise, photo_rng,
                    {enc: gen.base.detach().cpu().clone() for enc, gen in generators.items()}, start, backend.family)


def _shared(settings: TrainSettings) -> TrainSettings:
    return replace(settings, seed=0, placeholder="")


def train_identities(
    backend: TrainingBackend,
    jobs: list[IdentityJob],
    on_step: Callable[[int, int, dict], None] | None = None,
    preview_every: int = 0,
) -> list[TrainResult]:
    """Learn several identities in one loop: every UNet and text-encoder pass carries all of them in one batch,
    each keeps its own generator, Adam, seed and losses (a result equals the same identity learned alone, to float
    tolerance). An identity whose loss or gradients diverge stops at its last good state (its result's `error`)
    while the others go on. Cancel (an exception from `on_step`) raises TrainingStopped with every identity's last
    good, exactly resumable state. Every `preview_every` steps (0: never) each record carries "attention": the
    placeholder token's attention at the loss layers (H, W), for a live preview; it does not change the training."""
    if not jobs:
        raise SeFiError("No identity to learn.")
    first = jobs[0].settings
    if any(_shared(j.settings) != _shared(first) for j in jobs):
        raise SeFiError("Identities learned together must share every setting except seed and placeholder.")
    learners = [_learner(backend, job) for job in jobs]
    if len({L.start for L in learners}) != 1:
        raise SeFiError("Identities learned together must resume from the same step; resume them one by one.")
    optimizer = _adam([p for L in learners for p in L.names], first.lr)
    augmenter = make_augmenter(first)  # depends only on settings every identity shares
    for L in learners:
        if L.job.resume is not None and L.job.resume.optimizer_state:  # exact continuation: Adam's moments
            _load_optimizer_state(optimizer, L.names, L.job.resume.optimizer_state)
    with torch.no_grad():
        ref_context, ref_pooled = backend.reference_context()  # frozen: "a photo of the face of person"
    try:
        for step in range(learners[0].start, first.steps):
            active = [L for L in learners if L.error is None]
            if not active:
                break
            preview = preview_every > 0 and (step + 1) % preview_every == 0
            records = _train_step(backend, active, ref_context, ref_pooled, step, optimizer, augmenter, preview)
            if on_step is not None:
                on_step(step + 1, first.steps, records[0] if len(jobs) == 1 else {"step": step + 1,
                                                                                  "identities": records})
    # cancel: hand back every identity's last good state, resumable exactly. BaseException: the host's interrupt
    # derives from it since ComfyUI 0.28 (from Exception before), and Ctrl+C in the batch command is one too
    except BaseException as exc:
        raise TrainingStopped(exc, [L.result(optimizer) for L in learners]) from exc
    return [L.result(optimizer) for L in learners]


def train_identity(
    backend: TrainingBackend,
    image: torch.Tensor,
    settings: TrainSettings,
    mask: torch.Tensor | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
    resume: Identity | None = None,
    preview_every: int = 0,
) -> TrainResult:
    """Learn per-stage K/V identity tokens from one image (1,3,H,W in [0,1]); mask (1,1,H,W) optional.

    Raises TrainingStopped (with the last good, exactly resumable state) on cancel or divergence.
    """
    (result,) = train_identities(backend, [IdentityJob(image, settings, mask, resume)], on_step, preview_every)
    if result.error is not None:
        raise TrainingStopped(result.error, [result])
    return result


def _train_step(backend: TrainingBackend, learners: list[_Learner], ref_context: torch.Tensor,
                ref_pooled: torch.Tensor | None, step: int, optimizer: torch.optim.Adam, augmenter: Augmenter,
                preview: bool = False) -> list[dict]:
    """One step for every active identity: data -> noise -> text -> latents -> UNet -> L = L_LDM + λ·L_attn -> one
    Adam update."""
    settings = learners[0].job.settings  # shared by all but seed and placeholder
    S, B, N = settings.num_stages, settings.batch_size, len(learners)
    use_attn = settings.attn_lambda > 0
    # data: each identity's augmented reference (and mask through the same geometric transform), on the device.
    # Order within the step: what makes the host wait for the GPU (the host's text encoder uploads its token ids from
    # host memory) is issued before the large GPU work (VAE, UNet), so those waits find little in the GPU's queue.
    photos = []
    for L in learners:
        if L.images.shape[0] > 1:  # several photos of the person: each row samples one
            photos.append(L.images[torch.randint(0, L.images.shape[0], (B,), generator=L.photo_rng)])
        else:
            photos.append(L.images.expand(B, -1, -1, -1))
    # each identity's own augmentation from its own seed, applied to all of them in one go
    images, masks = augment_together(augmenter, photos,
                                     [L.mask.expand(B, -1, -1, -1) if L.mask is not None else None for L in learners],
                                     [L.job.settings.seed * 1_000_003 + step for L in learners])

    # noise: t ~ U{0..999}, ε ~ N(0, I), from each identity's own seeded stream, already on the device (noise.py)
    draws = [L.noise.take() for L in learners]
    ts = [t for t, _, _ in draws]  # on the CPU, for the records
    t_all, eps_all = torch.cat([t for _, t, _ in draws]), torch.cat([eps for _, _, eps in draws])
    stages = stage_of_timestep(t_all, S).split(B)  # on the device: picks each row's tokens without a copy

    # forward with each identity's current stage tokens: C^K_s from k_s, C^V_s from v_s
    rows = []
    for L, stage in zip(learners, stages):
        r = {}
        for enc, gen in L.generators.items():
            k, v = gen()
            r[enc] = torch.cat([k[stage], (v if settings.kv_split else k)[stage]])
        rows.append(r)
    # ONE text-encoder call for every identity's K and V rows. SDXL's pooled output: every row its own K row's, i.e.
    # the K token of the row's own stage (rows draw their own timesteps), as sampling gives each step its stage's
    joined = {enc: torch.cat([r[enc] for r in rows]) for enc in rows[0]}
    if backend.family == "sd1":  # no pooled output
        contexts, pooled_rows = backend.target_contexts(joined)
    else:  # identity i's K rows are rows 2·B·i .. 2·B·i + B - 1 of the joined batch (its V rows follow them)
        contexts, pooled_rows = backend.target_contexts(joined, pooled_of=[2 * B * i + b for i in range(N)
                                                                           for b in range(B)])
    per_identity = contexts.split(2 * B)
    ctx_k = torch.cat([c[:B] for c in per_identity])
    ctx_v = torch.cat([c[B:] for c in per_identity])

    with torch.no_grad():  # one VAE call for every identity's images
        z0_rows = backend.latents(torch.cat(images))
    if eps_all.shape != z0_rows.shape:
        raise SeFiError(f"The VAE gives latents of shape {tuple(z0_rows.shape)}; SeFi-IDE learns on 4-channel latents "
                        f"at 1/8 of the image size (SD1.x, SDXL).")
    z0s = z0_rows.split(B)
    ref_k = ref_context.expand(N * B, -1, -1)

    # A_ref: the reference context, same z_t and t, no gradient
    in_batch = settings.reference_in_batch
    if in_batch is None:
        in_batch = backend.family == "sd1"
    ref_maps: list[torch.Tensor] = []
    if use_attn and in_batch:  # one UNet pass: all reference rows first, then all target rows
        both = _pair(ref_pooled, pooled_rows, N * B)
        eps_pred, maps = backend.predict_noise(torch.cat([z0_rows, z0_rows]), torch.cat([eps_all, eps_all]),
                                               torch.cat([t_all, t_all]), torch.cat([ref_k, ctx_k]),
                                               torch.cat([ref_k, ctx_v]), capture=True, pooled=both, chunks=2)
        eps_pred = eps_pred[N * B:]
        half = maps[0].shape[0] // 2 if maps else 0  # maps are (rows·heads, HW, tokens), row-major
        ref_maps = [m[:half].detach() for m in maps]
        tgt_maps = [m[half:] for m in maps]
    else:
        if use_attn:
            with torch.no_grad():
                _, ref_maps = backend.predict_noise(z0_rows, eps_all, t_all, ref_k, ref_k, capture=True,
                                                    pooled=_expand_pooled(ref_pooled, N * B))
        eps_pred, tgt_maps = backend.predict_noise(z0_rows, eps_all, t_all, ctx_k, ctx_v, capture=use_attn,
                                                   pooled=pooled_rows)

    # each identity's L = L_LDM + λ·L_attn on its own rows; one backward for all (their graphs do not meet)
    losses, values = [], []
    for i, L in enumerate(learners):
        rows_i = slice(i * B, (i + 1) * B)
        mask_i = backend.latent_mask(masks[i], z0s[i].shape) if masks[i] is not None else None
        l_ldm = ldm_loss(eps_all[rows_i], eps_pred[rows_i], mask_i)  # L_LDM
        if use_attn:
            heads = tgt_maps[0].shape[0] // (N * B)
            maps_i = slice(i * B * heads, (i + 1) * B * heads)
            l_attn = attention_loss([m[maps_i] for m in tgt_maps], [m[maps_i] for m in ref_maps],
                                    settings.token_option, backend.placeholder_index, backend.eos_index)  # L_attn
        else:
            l_attn = torch.zeros((), device=l_ldm.device)
        loss = l_ldm + settings.attn_lambda * l_attn  # L = L_LDM + λ·L_attn
        losses.append(loss * L.loss_scale.value if L.loss_scale.dynamic else loss)  # fp16's range (loss_scale.py)
        values.append((loss, l_ldm, l_attn))
    optimizer.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()

    # each identity's gradients unscaled (fp16 loss scale; by a power of two: exact) and checked for inf/NaN in ONE
    # multi-tensor kernel (loss_scale.py), then ONE host-device sync per step: every identity's losses and check come
    # back together
    device = losses[0].device
    found_inf = torch.zeros(N, device=device)
    inv_scales = to_device(torch.tensor([1.0 / L.loss_scale.value for L in learners]), found_inf)
    checks = []
    for i, (L, (loss, l_ldm, l_attn)) in enumerate(zip(learners, values)):
        grads = [p.grad for p in L.names if p.grad is not None]
        if grads:
            unscale_and_check(grads, found_inf[i:i + 1], inv_scales[i:i + 1])
        checks.append(torch.stack([loss.detach().float(), l_ldm.detach().float(), l_attn.detach().float().to(device)]))
    synced = torch.cat([torch.stack(checks), found_inf[:, None]], dim=1).tolist()

    records = [_update(L, step, loss_value, ldm_value, attn_value, not inf_found, int(t[0]),
                       int(stage_of_timestep(t[0], S)))
               for L, (loss_value, ldm_value, attn_value, inf_found), t in zip(learners, synced, ts)]
    if any(r.get("skipped") is False for r in records):  # ONE Adam update for every identity that takes its step
        optimizer.step()
    if preview and tgt_maps:
        for i, record in enumerate(records):
            record["attention"] = placeholder_attention([m.detach() for m in tgt_maps], i, N, backend.placeholder_index)
    return records


def placeholder_attention(maps: list[torch.Tensor], identity: int, identities: int, column: int) -> torch.Tensor:
    """(H, W) on the CPU: the placeholder column of identity `identity`'s rows, averaged over its rows, heads and the
    layers (each resized to the largest layer's side)."""
    side = max(int(m.shape[1] ** 0.5) for m in maps)
    total = torch.zeros(side, side)
    for m in maps:
        per_identity = m.shape[0] // identities
        col = m[identity * per_identity:(identity + 1) * per_identity, :, column].float().mean(0)
        s = int(col.numel() ** 0.5)
        total += torch.nn.functional.interpolate(col.reshape(1, 1, s, s).cpu(), size=(side, side),
                                                 mode="bilinear", align_corners=False)[0, 0]
    return total / len(maps)


def _update(L: _Learner, step: int, loss_value: float, ldm_value: float, attn_value: float, grads_ok: bool,
            t: int, stage: int) -> dict:
    """Whether one identity takes this step's (shared) Adam update, or its divergence (found before the update: its
    state stays the last good one). An identity that does not step has its gradients dropped, so the one update for
    all leaves it alone."""
    record = {"step": step + 1, "loss": loss_value, "ldm": ldm_value, "attn": attn_value, "t": t, "stage": stage,
              "placeholder": L.job.settings.placeholder}
    if not math.isfinite(loss_value):
        L.error = SeFiError(f"Training diverged at step {step + 1}: the loss became {loss_value}. "
                            f"Lower the learning rate or λ, or check the image.")
        return _drop_gradients(L, {**record, "diverged": True})
    scale_used = L.loss_scale.value
    take_step = L.loss_scale.update(grads_ok)
    if not grads_ok and (not L.loss_scale.dynamic or L.loss_scale.value < 1):
        L.error = SeFiError(f"Training diverged at step {step + 1}: the gradients became NaN or infinite. "
                            f"Lower the learning rate or λ, or check the image.")
        return _drop_gradients(L, {**record, "diverged": True})
    record.update(skipped=not take_step, loss_scale=scale_used)
    L.history.append(record)
    return record if take_step else _drop_gradients(L, record)


def _drop_gradients(L: _Learner, record: dict) -> dict:
    for p in L.names:
        p.grad = None
    return record


def _expand_pooled(pooled: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if pooled is None else pooled.expand(rows, -1)


def _pair(ref_pooled: torch.Tensor | None, pooled: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """Pooled text rows for a reference+target batch (SDXL); None for families without one."""
    if pooled is None:
        return None
    return torch.cat([ref_pooled.expand(rows, -1).to(pooled), pooled])


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
        photos=image.shape[0],
        generator_state=state,
        generator_version=GENERATOR_VERSION,
        optimizer_state=optimizer_state,
        trained_steps=trained_steps,
        token_norms=token_norms(k, v, base),
    )
