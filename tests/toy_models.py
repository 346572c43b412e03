"""The toy world's SD1 checkpoint (tools/toy_world/) as ComfyUI loads it, for the quality benchmark and its CI test.

The committed 2.8 MB of trained weights are built into the 290 MB checkpoint in the cache on first use and loaded by
ComfyUI's own `load_checkpoint_guess_config`, exactly as Load Checkpoint does.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from harness import PACK_ROOT, cache_root

TRAINED = PACK_ROOT / "tools" / "toy_world" / "toy_sd1.safetensors"
PROBE_PROMPT = "a photo of the face of person, oval face, tan skin, long ginger hair, green eyes, wearing a hat"


def toy_checkpoint() -> Path:
    """The built toy checkpoint, keyed by the trained file's content (rebuilt when the weights change)."""
    import sys

    if str(PACK_ROOT) not in sys.path:
        sys.path.insert(0, str(PACK_ROOT))
    from tools.toy_world import checkpoint

    tag = hashlib.sha256(TRAINED.read_bytes()).hexdigest()[:10]
    path = cache_root() / "toy-world" / f"toy-sd1-{tag}.safetensors"
    if not path.exists():
        checkpoint.build_checkpoint(TRAINED, path)
    return path


def _drop_idle_text_layers(clip) -> int:
    """Keep only the first of CLIP-L's 12 layers. The toy text encoder is a bag of words: every layer's attention
    output projection and MLP output are zero, so each layer adds exactly 0 to the residual stream and the context
    is the same bits with 1 layer or 12 (checked here on a probe prompt; an error if not). Saves ~half of a CPU
    learning step, which re-encodes the prompt with gradients at every step."""
    encoder = clip.cond_stage_model.clip_l.transformer.text_model.encoder
    with torch.inference_mode():
        before = clip.encode_from_tokens(clip.tokenize(PROBE_PROMPT))
        layers = encoder.layers
        encoder.layers = layers[:1]
        after = clip.encode_from_tokens(clip.tokenize(PROBE_PROMPT))
    if not torch.equal(before, after):
        encoder.layers = layers
        raise RuntimeError("the toy text encoder's layers 2..12 are not idle: the checkpoint is not the toy one")
    return len(layers) - 1


def load_toy(drop_idle_text_layers: bool = True):
    """(MODEL, CLIP, VAE) of the toy checkpoint through ComfyUI's checkpoint loader, under inference mode as the host
    loads them; by default without CLIP's 11 idle layers (bit-identical contexts, see `_drop_idle_text_layers`)."""
    import comfy.sd

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(toy_checkpoint()), output_vae=True,
                                                                    output_clip=True)
    if drop_idle_text_layers:
        _drop_idle_text_layers(clip)
    return model, clip, vae
