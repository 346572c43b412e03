"""LearnIDEmbedding (the simple path) and FaceAttentionLossTrainer (every knob)."""
from __future__ import annotations

import logging
import re

from ..core.errors import SeFiError
from ..core.identity import safe_child_path, save_identity
from ..core.losses import TokenOption
from ..core.settings import DEFAULT_STEPS, TrainSettings
from ..core.training import TrainingStopped, train_identity
from ..host.backend import ComfyTrainingBackend
from ..host.grad_scope import training_scope
from ..host.images import prepare_reference
from ..host.text import detect_family
from .common import CATEGORY, IDENTITY, identity_folder, progress_callback, require_finite

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
    "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 5000, "tooltip": "Optimisation steps. 400 is "
                                                                                "the default; more rarely helps."}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                     "tooltip": "Same seed, same image, same settings -> the same identity file."}),
}
_MASK_INPUT = {"mask": ("MASK", {"tooltip": "Optional: restrict the denoising loss to this region (e.g. the face)."})}


def _save_stopped_state(stopped: TrainingStopped, settings: TrainSettings) -> str:
    """Keep the last good state of a cancelled or diverged run as a resumable identity file."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "", settings.placeholder) or "identity"
    name = f"{stem}-stopped-step{stopped.partial.identity.trained_steps}.safetensors"
    save_identity(stopped.partial.identity, safe_child_path(identity_folder(), name), overwrite=True)
    return name


def run_training(model, clip, vae, image, settings: TrainSettings, mask=None, resume=None):
    family = detect_family(clip, model)
    if resume is not None:
        resume.check_family(family)
    settings = settings.with_family_resolution(family)
    reference, ref_mask = prepare_reference(image, mask, settings.resolution)
    with training_scope():
        backend = ComfyTrainingBackend(model, clip, vae, settings)
        try:
            result = train_identity(backend, reference, settings, mask=ref_mask,
                                    on_step=progress_callback(settings.steps), resume=resume)
        except TrainingStopped as stopped:
            saved = _save_stopped_state(stopped, settings) if stopped.partial.identity.trained_steps else None
            note = (f" The last good state ({stopped.partial.identity.trained_steps} steps) was saved as '{saved}'; "
                    f"load it and connect it to 'resume_from' of the Face Attention Loss Trainer to continue."
                    if saved else "")
            if isinstance(stopped.cause, SeFiError):
                raise SeFiError(f"{stopped.cause}{note}") from None
            if note:
                logger.info("[SeFi-IDE] Training stopped.%s", note)
            raise stopped.cause from None  # the host's interrupt (or another error) keeps its own type
    return result


class LearnIDEmbedding:
    DESCRIPTION = ("Learn an identity from one face photo (SeFi-IDE, the paper's defaults). Write the placeholder "
                   "in prompts of 'Apply Per-Stage ID Tokens' to put the person in any scene.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The learned identity: per-stage K/V tokens. Save it with 'Save ID Embedding'.",)
    FUNCTION = "learn"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(_BASE_INPUTS), "optional": dict(_MASK_INPUT)}

    def learn(self, model, clip, vae, image, placeholder, steps, seed, mask=None):
        settings = TrainSettings(steps=steps, seed=seed, placeholder=placeholder.strip())
        return (run_training(model, clip, vae, image, settings, mask).identity,)


class FaceAttentionLossTrainer:
    DESCRIPTION = "Learn an identity with every knob of the face-wise attention loss and the training exposed."
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The learned identity (with generator weights, so training can be resumed).",)
    FUNCTION = "train"

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
        optional = dict(_MASK_INPUT)
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
              batch_size, mask=None, resume_from=None, gradient_checkpointing=False):
        require_finite(attn_lambda=attn_lambda, lr=lr, color_jitter=color_jitter, flip_p=flip_p, scale_min=scale_min,
                       scale_max=scale_max)
        settings = TrainSettings(
            steps=steps, seed=seed, lr=lr, attn_lambda=attn_lambda, token_option=TOKEN_OPTIONS[token_option],
            num_stages=stages, kv_split=kv_split, placeholder=placeholder.strip(), init_word=init_word.strip(),
            reference_prompt=reference_prompt, layers=layers, resolution=resolution, color_jitter=color_jitter,
            flip_p=flip_p, scale_min=min(scale_min, scale_max), scale_max=max(scale_min, scale_max),
            batch_size=batch_size, gradient_checkpointing=gradient_checkpointing,
        )
        return (run_training(model, clip, vae, image, settings, mask, resume_from).identity,)
