"""LearnIDEmbedding (the simple path) and FaceAttentionLossTrainer (every knob)."""
from __future__ import annotations

import logging
import re

import torch

from ..core.errors import SeFiError
from ..core.identity import Identity, identity_file_name, safe_child_path, save_identity
from ..core.losses import TokenOption
from ..core.settings import DEFAULT_STEPS, TrainSettings
from ..core.training import TrainingStopped, train_identity
from ..host.backend import ComfyTrainingBackend
from ..host.grad_scope import training_scope
from ..host.images import prepare_reference
from ..host.text import check_placeholder, detect_family
from .common import CATEGORY, IDENTITY, PREVIEW_EVERY, SEARCH_WORDS, identity_folder, progress_callback, require_finite

logger = logging.getLogger(__name__)

TOKEN_OPTIONS = {
    "3: all 77 token maps (paper's best)": TokenOption.ALL,
    "2: BOS..EOS token maps": TokenOption.PROMPT,
    "1: placeholder map only": TokenOption.PLACEHOLDER,
}

_BASE_INPUTS = {
    "model": ("MODEL", {"tooltip": "An SD1.x or SDXL checkpoint's MODEL (ε-prediction). It is not modified."}),
    "clip": ("CLIP", {"tooltip": "The same checkpoint's CLIP. It is not modified."}),
    "vae": ("VAE", {"tooltip": "The same checkpoint's VAE, used to encode the photo."}),
    "image": ("IMAGE", {"tooltip": "ONE face photo (a batch of 1). Cropped to a centred square."}),
    "placeholder": ("STRING", {"default": "<id>", "tooltip": "The word you will write in prompts for this person, "
                                                             "e.g. <alice>. One word, no spaces."}),
    "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 5000,
                      "tooltip": "Optimisation steps. 400 is the default; raise it (e.g. 800) if the likeness is "
                                 "weak, lower it for a quick preview."}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                     "tooltip": "Same seed, same image, same settings -> the same identity file."}),
}
_MASK_INPUT = {"mask": ("MASK", {"tooltip": "Optional: restrict the denoising loss to this region (e.g. the face)."})}
_MORE_PHOTOS_INPUT = {"more_photos": ("IMAGE", {
    "tooltip": "Optional: more photos of the same person (a batch); each step learns from one photo picked at "
               "random. Without it the result is the same as before. The file records how many photos it saw."})}

# init word (one token) and reference prompt per kind of subject (the paper also personalises non-face subjects)
SUBJECTS = {
    "face": ("person", "a photo of the face of {word}"),
    "pet": ("pet", "a photo of the face of {word}"),
    "object": ("object", "a photo of the {word}"),
}
CUSTOM_SUBJECT = "custom (init_word, reference_prompt)"


def _save_stopped_state(identity: Identity) -> str:
    """Keep the last good state of a cancelled or diverged run as a resumable identity file."""
    name = f"{_file_stem(identity.placeholder)}-stopped-step{identity.trained_steps}.safetensors"
    save_identity(identity, safe_child_path(identity_folder(), name), overwrite=True)
    return name


def _file_stem(placeholder: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "", placeholder) or "identity"


def run_training(model, clip, vae, image, settings: TrainSettings, mask=None, resume=None, more_photos=None):
    family = detect_family(clip, model)
    if resume is not None:
        resume.check_family(family)
    settings = settings.with_family_resolution(family)
    reference, ref_mask = prepare_reference(image, mask, settings.resolution)
    if more_photos is not None:
        if more_photos.ndim != 4:
            raise SeFiError("'more_photos' must be an IMAGE batch (connect Load Image or an image batch node).")
        reference = torch.cat([reference] + [prepare_reference(more_photos[i:i + 1], None, settings.resolution)[0]
                                             for i in range(more_photos.shape[0])])
    with training_scope():
        backend = ComfyTrainingBackend(model, clip, vae, settings)
        try:
            result = train_identity(backend, reference, settings, mask=ref_mask,
                                    on_step=progress_callback(settings.steps, reference), resume=resume,
                                    preview_every=PREVIEW_EVERY)
        except TrainingStopped as stopped:
            saved = _save_stopped_state(stopped.partial.identity) if stopped.partial.identity.trained_steps else None
            note = (f" The last good state ({stopped.partial.identity.trained_steps} steps) was saved as '{saved}'; "
                    f"load it and connect it to 'resume_from' of the Face Attention Loss Trainer to continue."
                    if saved else "")
            if isinstance(stopped.cause, SeFiError):
                raise SeFiError(f"{stopped.cause}{note}") from None
            if note:
                logger.info("[SeFi-IDE] Training stopped.%s", note)
            raise stopped.cause from None  # the host's interrupt (or another error) keeps its own type
        finally:
            backend.release()  # DynamicVRAM: the learning copy goes now, whatever happened
    return result


_LOSS_CURVE_TOOLTIP = "The loss per step: total, L_LDM (denoising) and λ·L_attn (face-wise attention)."


def _with_loss_curve(result, settings: TrainSettings) -> tuple:
    from ..host.plots import loss_curve

    return result.identity, loss_curve(result.history, settings.attn_lambda)


class LearnIDEmbedding:
    DESCRIPTION = ("Learn an identity from one face photo (SeFi-IDE, the paper's defaults). Write the placeholder "
                   "in prompts of 'Apply Per-Stage ID Tokens' to put the person in any scene. The progress bar shows "
                   "where the identity token attends on the photo every few steps.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITY, "IMAGE")
    RETURN_NAMES = ("identity", "loss_curve")
    OUTPUT_TOOLTIPS = ("The learned identity: per-stage K/V tokens. Save it with 'Save ID Embedding'.",
                       _LOSS_CURVE_TOOLTIP)
    FUNCTION = "learn"
    SEARCH_ALIASES = (*SEARCH_WORDS, "learn face", "train face", "one photo", "face id", "textual inversion",
                      "embedding")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(_BASE_INPUTS), "optional": {
            **_MASK_INPUT, **_MORE_PHOTOS_INPUT,
            "subject": (list(SUBJECTS), {"default": "face", "tooltip": "What the photo shows: a person's face "
                                         "(the paper's setting), a pet, or an object. Sets the init word and the "
                                         "reference prompt of the attention loss."})}}

    def learn(self, model, clip, vae, image, placeholder, steps, seed, mask=None, more_photos=None, subject="face"):
        if subject not in SUBJECTS:
            raise SeFiError(f"Unknown subject {subject!r}; choose one of {', '.join(SUBJECTS)}.")
        init_word, reference_prompt = SUBJECTS[subject]
        settings = TrainSettings(steps=steps, seed=seed, placeholder=placeholder.strip(), init_word=init_word,
                                 reference_prompt=reference_prompt)
        return _with_loss_curve(run_training(model, clip, vae, image, settings, mask, more_photos=more_photos),
                                settings)


class FaceAttentionLossTrainer:
    DESCRIPTION = ("The advanced form of 'Learn ID Embedding': the same learning with every knob of the face-wise "
                   "attention loss and the training exposed, and resume_from.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITY, "IMAGE")
    RETURN_NAMES = ("identity", "loss_curve")
    OUTPUT_TOOLTIPS = ("The learned identity (with generator weights, so training can be resumed).",
                       _LOSS_CURVE_TOOLTIP)
    FUNCTION = "train"
    SEARCH_ALIASES = (*SEARCH_WORDS, "learn face", "train face", "advanced", "attention loss", "textual inversion",
                      "embedding")

    @classmethod
    def INPUT_TYPES(cls):
        d = TrainSettings()
        required = dict(_BASE_INPUTS)
        required.update({
            "init_word": ("STRING", {"default": d.init_word, "tooltip": "Word whose embedding starts the identity; "
                                                                         "also the reference word. One token."}),
            "reference_prompt": ("STRING", {"default": d.reference_prompt, "tooltip": "Prompt whose attention maps "
                                            "the identity must match; {word} is the init word / the placeholder."}),
            "attn_lambda": ("FLOAT", {"default": d.attn_lambda, "min": 0.0, "max": 1000.0, "step": 0.0001,
                                      "tooltip": "λ: weight of the face-wise attention loss (0 disables it)."}),
            "token_option": (list(TOKEN_OPTIONS), {"tooltip": "Which token maps the attention loss compares."}),
            "layers": ("STRING", {"default": d.layers, "tooltip": "Cross-attention layers of the loss: 'auto' (maps "
                                  "at 1/4 of the latent size), 'all', or names like input.7.0,output.3.0."}),
            "stages": ("INT", {"default": d.num_stages, "min": 1, "max": 10, "tooltip": "Per-stage tokens: the 1000 "
                               "timesteps are split evenly into this many stages."}),
            "kv_split": ("BOOLEAN", {"default": d.kv_split, "tooltip": "Separate tokens for K and V (the paper). "
                                     "Off: V uses the K token."}),
            "lr": ("FLOAT", {"default": d.lr, "min": 1e-6, "max": 1.0, "step": 0.0001, "tooltip": "Adam learning rate."}),
            "resolution": ("INT", {"default": d.resolution, "min": 0, "max": 2048, "step": 64,
                                   "tooltip": "Training resolution in pixels (square). 0 = native: 512 for SD1, "
                                              "1024 for SDXL."}),
            "color_jitter": ("FLOAT", {"default": d.color_jitter, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "Brightness/contrast/saturation jitter strength (0 = off)."}),
            "flip_p": ("FLOAT", {"default": d.flip_p, "min": 0.0, "max": 1.0, "step": 0.05,
                                 "tooltip": "Probability of a horizontal flip."}),
            "scale_min": ("FLOAT", {"default": d.scale_min, "min": 0.25, "max": 2.0, "step": 0.05,
                                    "tooltip": "Smallest random scale."}),
            "scale_max": ("FLOAT", {"default": d.scale_max, "min": 0.25, "max": 2.0, "step": 0.05,
                                    "tooltip": "Largest random scale."}),
            "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 16,
                                   "tooltip": "Augmented copies per step."}),
        })
        optional = {**_MASK_INPUT, **_MORE_PHOTOS_INPUT}
        optional["subject"] = ([CUSTOM_SUBJECT, *SUBJECTS], {
            "default": CUSTOM_SUBJECT, "tooltip": "custom: use init_word and reference_prompt as set above; face / "
                                                  "pet / object: their presets (as in 'Learn ID Embedding')."})
        optional["resume_from"] = (IDENTITY, {"tooltip": "Continue an identity saved with its generator: a stopped "
                                              "run continues exactly where it stopped (same seed and settings)."})
        optional["gradient_checkpointing"] = ("BOOLEAN", {
            "default": d.gradient_checkpointing,
            "tooltip": "Recompute each UNet block during backward instead of keeping its activations: much less GPU "
                       "memory (for SDXL on cards under 24 GB), for one more UNet forward per step. The learned "
                       "identity is the same."})
        return {"required": required, "optional": optional}

    def train(self, model, clip, vae, image, placeholder, steps, seed, init_word, reference_prompt, attn_lambda,
              token_option, layers, stages, kv_split, lr, resolution, color_jitter, flip_p, scale_min, scale_max,
              batch_size, mask=None, resume_from=None, gradient_checkpointing=False, more_photos=None,
              subject=CUSTOM_SUBJECT):
        require_finite(attn_lambda=attn_lambda, lr=lr, color_jitter=color_jitter, flip_p=flip_p, scale_min=scale_min,
                       scale_max=scale_max)
        if subject != CUSTOM_SUBJECT:
            if subject not in SUBJECTS:
                raise SeFiError(f"Unknown subject {subject!r}; choose custom or one of {', '.join(SUBJECTS)}.")
            init_word, reference_prompt = SUBJECTS[subject]
        settings = TrainSettings(
            steps=steps, seed=seed, lr=lr, attn_lambda=attn_lambda, token_option=TOKEN_OPTIONS[token_option],
            num_stages=stages, kv_split=kv_split, placeholder=placeholder.strip(), init_word=init_word.strip(),
            reference_prompt=reference_prompt, layers=layers, resolution=resolution, color_jitter=color_jitter,
            flip_p=flip_p, scale_min=min(scale_min, scale_max), scale_max=max(scale_min, scale_max),
            batch_size=batch_size, gradient_checkpointing=gradient_checkpointing,
        )
        return _with_loss_curve(run_training(model, clip, vae, image, settings, mask, resume_from, more_photos),
                                settings)


def parse_placeholders(text: str) -> list[str]:
    """One placeholder per line (or comma-separated), in the order of the image batch."""
    return [check_placeholder(p) for p in re.split(r"[\n,]+", text) if p.strip()]


class LearnIDEmbeddingsBatch:
    DESCRIPTION = ("Learn one identity per photo of an IMAGE batch, several in each UNet pass (much faster per "
                   "identity on a GPU), and save each as <prefix>_<placeholder>.safetensors. Same method and defaults "
                   "as 'Learn ID Embedding'; photo i uses seed + i.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identities",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = (("The learned identities, in the order of the photos (a list: nodes after it run once per "
                        "identity)."),)
    FUNCTION = "learn"
    SEARCH_ALIASES = (*SEARCH_WORDS, "learn faces", "batch", "many people", "several identities", "embedding")

    @classmethod
    def INPUT_TYPES(cls):
        base = {k: v for k, v in _BASE_INPUTS.items() if k not in ("image", "placeholder")}
        return {"required": {
            **base,
            "images": ("IMAGE", {"tooltip": "One face photo per person, as one batch (e.g. 'Load Images' or "
                                            "'Image Batch'). Each is centre-cropped to a square."}),
            "placeholders": ("STRING", {"multiline": True, "default": "<alice>\n<bob>",
                                        "tooltip": "One placeholder per photo, one per line (or comma-separated), "
                                                   "in the order of the batch."}),
            "filename_prefix": ("STRING", {"default": "batch", "tooltip": "Files are saved as "
                                           "models/sefi_identities/<prefix>_<placeholder>.safetensors (tokens only). "
                                           "Empty: do not save."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace files that already exist (otherwise "
                                                                   "the node refuses before learning anything)."}),
            "identities_per_pass": ("INT", {"default": 0, "min": 0, "max": 16, "tooltip": "Identities in one UNet "
                                            "batch. 0 = as many as the free memory allows (estimated; a pass that "
                                            "still runs out of memory is split)."}),
        }, "optional": {
            "masks": ("MASK", {"tooltip": "Optional: one mask per photo (same batch order) restricting the denoising "
                                          "loss to the face."}),
            "resolution": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 64,
                                   "tooltip": "Training resolution in pixels (square). 0 = native: 512 for SD1, "
                                              "1024 for SDXL. Lower uses less memory per identity."})}}

    def learn(self, model, clip, vae, images, placeholders, steps, seed, filename_prefix, overwrite,
              identities_per_pass, masks=None, resolution=0):
        from ..host.batch import batch_jobs, learn_identities

        names = parse_placeholders(placeholders)
        if len(set(names)) != len(names):
            raise SeFiError(f"Placeholders must differ: {', '.join(names)}.")
        if images is None or images.ndim != 4 or images.shape[0] != len(names):
            count = "no" if images is None or images.ndim != 4 else images.shape[0]
            raise SeFiError(f"Got {count} photos and {len(names)} placeholders; give one placeholder per photo.")
        if masks is not None and (masks.ndim != 3 or masks.shape[0] != len(names)):
            raise SeFiError(f"Connect one mask per photo ({len(names)}), in the order of the image batch.")
        paths = self._target_paths(filename_prefix, names, overwrite)
        settings = TrainSettings(steps=steps, seed=seed, resolution=resolution).with_family_resolution(
            detect_family(clip, model))
        refs, ref_masks = [], []
        for i in range(len(names)):
            ref, m = prepare_reference(images[i:i + 1], None if masks is None else masks[i:i + 1], settings.resolution)
            refs.append(ref)
            ref_masks.append(m)
        jobs = batch_jobs(refs, ref_masks, names, settings)
        with training_scope():
            try:
                results = learn_identities(model, clip, vae, jobs, identities_per_pass,
                                           on_step=progress_callback(steps * len(jobs)))
            except TrainingStopped as stopped:  # cancel: every started identity's last good state is kept
                kept = [_save_stopped_state(r.identity) for r in stopped.partials
                        if r.identity is not None and r.identity.trained_steps]
                if kept:
                    logger.info("[SeFi-IDE] Learning stopped; last good states saved as %s (resume each with the "
                                "Face Attention Loss Trainer's 'resume_from').", ", ".join(kept))
                raise stopped.cause from None
        for path, result in zip(paths, results):
            if path is not None and result.error is None:
                save_identity(result.identity, path, overwrite=overwrite, include_generator=False)
        diverged = [f"{r.identity.placeholder}: {r.error}" + (f" Its last good state was saved as "
                    f"'{_save_stopped_state(r.identity)}'." if r.identity.trained_steps else "")
                    for r in results if r.error is not None]
        if diverged:
            raise SeFiError(" ".join(diverged) + " The other identities were learned"
                            + (" and saved." if paths[0] is not None else "."))
        return ([r.identity for r in results],)

    @staticmethod
    def _target_paths(prefix: str, names: list[str], overwrite: bool) -> list:
        if not prefix.strip():
            return [None] * len(names)
        files = [identity_file_name(f"{prefix.strip()}_{_file_stem(p)}") for p in names]
        if len(set(files)) != len(files):
            raise SeFiError(f"Two placeholders give the same file name ({', '.join(files)}); make them differ in "
                            f"letters or digits.")
        paths = [safe_child_path(identity_folder(), f) for f in files]
        existing = [p.name for p in paths if p.exists()]
        if existing and not overwrite:
            raise SeFiError(f"{', '.join(existing)} already exist(s). Choose another prefix or enable overwrite.")
        return paths
