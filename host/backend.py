"""The ComfyUI implementation of `core.training.TrainingBackend`: the host's own CLIP, UNet and VAE."""
from __future__ import annotations

import contextlib
import logging
import uuid

import torch
import torch.nn.functional as F

from ..attention_patch.capture import AttentionCapture
from ..attention_patch.layers import cross_attention_layers, select_layers
from ..attention_patch.per_stage_kv import FixedKVPatch
from ..core.errors import SeFiError
from ..core.identity import FAMILY_ENCODERS
from ..core.settings import TrainSettings
from .checkpointing import checkpointed
from .dynamic_vram import learning_copies
from .grad_scope import frozen_pass, grad_pass
from .text import check_placeholder, detect_family, encode_variants, inject, mark_prompt, word_embedding, word_token_id

log = logging.getLogger(__name__)


_NO_ADM = object()  # the model takes no `y` (SD1)
COMPILE_KEY = "torch.compile"  # the wrapper key of ComfyUI's TorchCompileModel (comfy_api/torch_helpers)


def _merge_transformer_options(base: dict, kv_patch, replace: dict, sigma: torch.Tensor, chunks: int,
                               model_extensions: dict[str, dict]) -> dict:
    """The model's own transformer options (other packs' patches keep running) plus ours, with the keys a sampler
    sets (comfy/samplers.py `_calc_cond_batch`): patches written for sampling read them. Every row of our passes
    is positive conditioning, in `chunks` equal chunks (2 with the reference rows in the target batch). The model
    patcher's wrappers and callbacks join them as the sampler joins them (comfy/sampler_helpers.py
    `prepare_model_patcher`): other packs' model wrappers run, and ComfyUI's TorchCompileModel compiles our passes."""
    import comfy.patcher_extension

    opts = dict(base)
    for name, extension in model_extensions.items():
        opts[name] = comfy.patcher_extension.merge_nested_dicts(opts.get(name, {}), extension)
    opts["cond_or_uncond"] = [0] * chunks
    opts["uuids"] = [uuid.uuid4() for _ in range(chunks)]
    opts["sigmas"] = sigma[: sigma.shape[0] // chunks]
    patches = {k: list(v) for k, v in opts.get("patches", {}).items()}
    patches["attn2_patch"] = patches.get("attn2_patch", []) + [kv_patch]
    opts["patches"] = patches
    if replace:
        patches_replace = {k: dict(v) for k, v in opts.get("patches_replace", {}).items()}
        patches_replace["attn2"] = {**patches_replace.get("attn2", {}), **replace}
        opts["patches_replace"] = patches_replace
    return opts


class ComfyTrainingBackend:
    """`learning=False`: forward passes only (the heat map); those run on a dynamic (DynamicVRAM) MODEL as sampling
    does, so no non-dynamic copy is made. Call `release` when learning ends: it lets go of the copy at once."""

    def __init__(self, model, clip, vae, settings: TrainSettings, learning: bool = True):
        import comfy.model_management
        import comfy.model_sampling

        # DynamicVRAM: non-dynamic copies for this run (host/dynamic_vram.py); else the given objects
        copies = learning_copies(model, clip) if learning else (model, clip)
        self._owns_copies = copies[0] is not model or copies[1] is not clip
        model, clip = copies
        self.family = detect_family(clip, model)
        self.model = model
        self.clip = clip
        self.vae = vae
        self.settings = settings
        self.encoders = FAMILY_ENCODERS[self.family]
        if not isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.EPS):
            raise SeFiError("This checkpoint is not an ε-prediction model (v-prediction or flow). SeFi-IDE learns on "
                            "ε-prediction SD1.x / SDXL checkpoints.")
        layers = select_layers(cross_attention_layers(model.model.diffusion_model), settings.layers)

        # prompt checks first: they are cheap and fail before any model is moved to the device
        placeholder = check_placeholder(settings.placeholder)
        init_ids = word_token_id(clip, settings.init_word)
        if "{word}" not in settings.reference_prompt:
            raise SeFiError("The reference prompt must contain {word} where the person goes, e.g. "
                            "'a photo of the face of {word}'.")
        self.reference_text = settings.reference_prompt.replace("{word}", settings.init_word)
        self.target = mark_prompt(clip, settings.reference_prompt.replace("{word}", placeholder), [placeholder])
        self.placeholder = placeholder
        places = self.target.positions[placeholder]["l"]
        if len(places) != 1 or places[0][0] != 0:
            raise SeFiError("The reference prompt must name {word} exactly once, within the first 75 tokens.")
        self.placeholder_index = places[0][1]
        ref_tokens = clip.tokenize(self.reference_text)
        ref_ids = [t[0] for t in ref_tokens["l"][0]]
        if ref_ids[self.placeholder_index] != init_ids["l"]:
            raise SeFiError("The reference and target prompts do not line up token by token; use a reference prompt "
                            "where {word} is a separate word.")
        end_id = clip.tokenize("")["l"][0][1][0]
        self.eos_index = ref_ids.index(end_id, 1)
        self._ref_tokens = ref_tokens
        with frozen_pass():  # loaded the host's way: its patched weights and backups stay inference tensors
            comfy.model_management.load_models_gpu([model])
        self.device = model.load_device
        self.compute_dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        self.unet = UNetPass(model, layers, checkpointing=settings.gradient_checkpointing)

    def release(self) -> None:
        """Let go of this run's non-dynamic copies (DynamicVRAM) now, not whenever the backend is collected (an
        exception's traceback can keep it for long): their host and GPU memory is freed. The backend is unusable
        afterwards. Nothing happens where it learned on the user's own objects."""
        if not self._owns_copies:
            return
        import comfy.model_management

        self.model = self.clip = self.unet = None
        self._owns_copies = False
        comfy.model_management.soft_empty_cache()  # the copy's GPU blocks back to the driver, for DynamicVRAM's use

    # --- text -------------------------------------------------------------------------------
    def base_vectors(self) -> dict[str, torch.Tensor]:
        """e: the word embedding of the init word, per text encoder."""
        return word_embedding(self.clip, self.settings.init_word)

    def reference_context(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        with frozen_pass():
            return encode_variants(self.clip, [self._ref_tokens], output_device=self.device)

    def target_contexts(self, rows: dict[str, torch.Tensor],
                        pooled_of: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contexts (n, T, D) for the target prompt with row i injected, in ONE text-encoder call, and the pooled
        output of row 0 (1, D), or of each row in `pooled_of` (len, D) (SDXL: from OpenCLIP-G; the training loop
        asks for every K row's, so each UNet row's pooled output comes from its own stage's K token). Both stay on
        the UNet's device (never through the host's intermediate device: see `host_outputs_on`)."""
        n = next(iter(rows.values())).shape[0]
        variants = [inject(self.target, {self.placeholder: {enc: r[i] for enc, r in rows.items()}}) for i in range(n)]
        ctx, pooled = encode_variants(self.clip, variants, every_pooled=pooled_of is not None,
                                      output_device=self.device)
        if pooled_of is not None and pooled is not None:
            pooled = pooled[pooled_of]
        return ctx, pooled

    # --- images -----------------------------------------------------------------------------
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """z0 of images (B,3,H,W), as the host's `VAE.encode` computes it (the same load, input scaling and call)
        but left on the device: the host's encode returns its result through the intermediate (CPU) device, a copy
        the training step would wait on every step. The training resolution is a multiple of 8: nothing to crop."""
        import comfy.model_management

        vae = self.vae
        with frozen_pass():
            comfy.model_management.load_models_gpu([vae.patcher], force_full_load=vae.disable_offload,
                                                   memory_required=vae.memory_used_encode(images.shape, vae.vae_dtype))
            pixels = vae.process_input(images.to(vae.device)).to(vae.vae_dtype)
            z = vae.first_stage_model.encode(pixels).float()
            return self.model.model.process_latent_in(z).to(self.device)

    def latent_mask(self, mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
        return F.interpolate(mask.float(), size=latent_shape[-2:], mode="area").to(self.device)

    # --- UNet -------------------------------------------------------------------------------
    def predict_noise(self, z0, eps, t, context_k, context_v, capture: bool, pooled=None, chunks: int = 1):
        return self.unet(z0, eps, t, context_k, context_v, capture, pooled, chunks)


class UNetPass:
    """ε_θ(z_t, t) through the host's UNet with fixed K/V contexts, optionally capturing the loss layers' maps."""

    def __init__(self, model, layers: list, checkpointing: bool = False):
        self.model = model
        self.checkpointing = checkpointing
        self.model_sampling = model.get_model_object("model_sampling")
        self.capture = AttentionCapture(layers)
        self.device = model.load_device
        self._warned = False
        self._size_parts: dict[tuple[int, int], torch.Tensor | None] = {}
        self._compile_failed = False

    def _adm(self, pooled: torch.Tensor | None, z0: torch.Tensor) -> torch.Tensor | None:
        """SDXL's `y` (pooled text + size/crop conditioning, no crop, size = the training square); SD1: None.

        The host builds the size part on the CPU and joins it to the pooled rows there: copies the step would wait
        on (and again in the backward pass). The size part is the same every step, so it is taken from the host's
        own `encode_adm` once, on the device; `y` is then the pooled rows joined to it where they are."""
        if pooled is None:
            return None
        h, w = z0.shape[-2] * 8, z0.shape[-1] * 8
        if (h, w) not in self._size_parts:
            self._size_parts[(h, w)] = self._size_part(pooled.shape[-1], h, w)
        size_part = self._size_parts[(h, w)]
        if size_part is _NO_ADM:  # SD1: the model takes no `y`
            return None
        if size_part is None:  # the host's layout is not pooled-then-size: its own function, every step
            adm = self.model.model.encode_adm(pooled_output=pooled, width=w, height=h, target_width=w,
                                              target_height=h, crop_w=0, crop_h=0)
            return None if adm is None else adm.to(self.device).expand(z0.shape[0], -1)
        rows = pooled.to(self.device).expand(z0.shape[0], -1)
        return torch.cat([rows, size_part.expand(rows.shape[0], -1)], dim=1)  # dtypes promote as the host's do

    def _size_part(self, width: int, h: int, w: int) -> torch.Tensor | None | object:
        """The host's `encode_adm` columns after the pooled ones, on the device, if `y` is [pooled | size part] with
        the size part independent of the pooled rows (SDXL in every release this pack declares); `_NO_ADM` for a
        model without `y` (SD1); else None."""
        probes = torch.stack([torch.zeros(width), torch.linspace(-1.0, 1.0, width)])
        adm = self.model.model.encode_adm(pooled_output=probes, width=w, height=h, target_width=w, target_height=h,
                                          crop_w=0, crop_h=0)
        if adm is None:
            return _NO_ADM
        if (adm.shape[1] > width and torch.equal(adm[:, :width].cpu(), probes)
                and torch.equal(adm[0, width:], adm[1, width:])):
            return adm[:1, width:].to(self.device)
        log.info("SeFi-IDE: this host's SDXL conditioning is not [pooled | size]; `y` is built by the host every step.")
        return None

    def __call__(self, z0, eps, t, context_k, context_v, capture: bool, pooled=None, chunks: int = 1):
        """chunks: how many equal groups of rows the batch holds (reference + target rows in one pass: 2)."""
        from torch._dynamo.exc import TorchDynamoException

        args = (z0, eps, t, context_k, context_v, capture, pooled, chunks)
        try:
            return self._pass(*args)
        except TorchDynamoException as exc:  # ComfyUI's TorchCompileModel on the model could not compile this pass
            if self._compile_failed or not any(COMPILE_KEY in by_key for by_key in self.model.wrappers.values()):
                raise
            self._compile_failed = True
            log.warning("SeFi-IDE: torch.compile (TorchCompileModel) could not compile the training pass, so it runs "
                        "uncompiled (sampling keeps the compiled model): %s", str(exc).splitlines()[0])
            return self._pass(*args)

    def _pass(self, *args):
        if not torch.is_grad_enabled():  # the reference pass: the host's own fast path
            with frozen_pass():
                return self._run(*args)
        return self._run(*args)

    def _model_extensions(self) -> dict[str, dict]:
        """The model patcher's wrappers and callbacks; without the compile wrapper once it failed."""
        wrappers = self.model.wrappers
        if self._compile_failed:
            wrappers = {kind: {key: w for key, w in by_key.items() if key != COMPILE_KEY}
                        for kind, by_key in wrappers.items()}
        return {"wrappers": wrappers, "callbacks": self.model.callbacks}

    def _warn_replaced(self, base_options: dict) -> None:
        """Our map capture replaces the attention call at the loss layers; another pack's attention replacement
        there does not run in the training passes (it does everywhere else, and in sampling)."""
        foreign = set(base_options.get("patches_replace", {}).get("attn2", {}))
        # the host looks up (block, id, index), then (block, id): ComfyUI_IPAdapter_plus registers the latter for SD1
        overlap = sorted(layer.name for layer in self.capture.layers if layer.key in foreign or layer.key[:2] in foreign)
        if overlap and not self._warned:
            self._warned = True
            log.warning("SeFi-IDE: another pack replaces cross-attention at the loss layers %s; while learning, the "
                        "attention maps there are computed without it.", ", ".join(overlap))

    def _run(self, z0, eps, t, context_k, context_v, capture: bool, pooled, chunks: int):
        ms = self.model_sampling
        sigma = ms.sigma(t.to(ms.sigmas.device)).to(self.device)
        z0, eps = z0.to(self.device), eps.to(self.device)
        x = ms.noise_scaling(sigma, eps, z0)  # z_t in the host's sigma parameterisation
        base_options = self.model.model_options.get("transformer_options", {})
        if capture:
            self._warn_replaced(base_options)
        opts = _merge_transformer_options(base_options, FixedKVPatch(context_k, context_v),
                                          self.capture.replace_patches() if capture else {}, sigma, chunks,
                                          self._model_extensions())
        extra = {}
        adm = self._adm(pooled, z0)
        if adm is not None:
            extra["y"] = adm

        def unet():
            self.capture.take()
            return self.model.model.apply_model(x, sigma, c_crossattn=context_k, transformer_options=opts, **extra)

        if not torch.is_grad_enabled():
            denoised = unet()
        else:
            with checkpointed(self.model.model.diffusion_model) if self.checkpointing else contextlib.nullcontext():
                denoised = grad_pass(self.model.model, unet)
        eps_pred = (x - denoised) / sigma.view(-1, 1, 1, 1)  # ε_θ from the host's x0 output (ε-prediction)
        return eps_pred, self.capture.take()
