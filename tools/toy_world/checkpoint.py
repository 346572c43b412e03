"""The toy SD1 checkpoint: a small file of trained weights, and a builder that writes the full checkpoint ComfyUI's
CheckpointLoaderSimple loads as SD1.

Trained (committed, fp16): the slim UNet (unet.py) and the slim text encoder (text.py: the world's word rows, start
and end, position embeddings, one contextual layer and the final LayerNorm; world v1's file has rows and the norm
only). Filled by the builder, deterministically:
- the UNet's zero padding to SD1's shapes (unet.SlimUNet.shell_state_dict);
- CLIP-L's full shapes around the slim text encoder (text.full_state_dict): its other 11 layers identities (every
  attention output projection and MLP output layer zero, so each adds nothing), zero rows for every other word;
- the analytic VAE (vae.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import vae
from .text import TextConfig, TextEncoder, full_state_dict
from .tokens import text_token_ids
from .unet import SlimConfig, SlimUNet

CLIP_LAYERS = 12
TEXT_PREFIX = "transformer.text_model."


def save_trained(path: Path, unet: SlimUNet, text: TextEncoder, notes: dict[str, str] | None = None) -> None:
    """The committed file: fp16 slim-UNet and slim text-encoder weights, their configs in the metadata."""
    import safetensors.torch

    tensors = {f"unet.{k}": v.detach() for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v for k, v in text.export().items()})
    cfg = unet.cfg
    metadata = {"slim_config": json.dumps([cfg.width, cfg.time_width, cfg.ff_width, cfg.heads]),
                "text_config": json.dumps(text.cfg.to_dict()), "token_ids": json.dumps(text_token_ids()),
                **(notes or {})}
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_trained(path: Path) -> tuple[SlimUNet, TextEncoder]:
    """(slim UNet, slim text encoder), float32, from a trained-weights file (world v1 or v2)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    slim = json.loads(meta["slim_config"])
    if len(slim) == 3:  # world v1: whole heads of 40 channels, the rest of SD1's 8 heads dead
        slim.append(slim[0] // 40)
    unet = SlimUNet(SlimConfig(*slim))
    unet.load_state_dict({k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")})
    text_cfg = TextConfig(**json.loads(meta["text_config"])) if "text_config" in meta else TextConfig.bag_of_words()
    if json.loads(meta["token_ids"]) != text_token_ids():
        raise ValueError(f"{path} was trained for other word rows than tokens.json lists")
    text = TextEncoder.from_export(text_cfg, {k[len("text."):]: v for k, v in tensors.items()
                                              if k.startswith("text.")})
    return unet, text


def load_notes(path: Path) -> dict[str, str]:
    """The file's metadata: configs, and the training run's notes (steps, history) where train.py wrote them."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def checkpoint_state_dict(unet: SlimUNet, text: TextEncoder) -> dict[str, torch.Tensor]:
    """The full SD1 checkpoint's tensors (fp16), ComfyUI's keys."""
    out = {f"model.diffusion_model.{k}": v for k, v in unet.shell_state_dict().items()}
    out.update({f"cond_stage_model.{k}": v for k, v in
                full_state_dict(text.cfg, text.export(), TEXT_PREFIX, CLIP_LAYERS).items()})
    out.update({f"first_stage_model.{k}": v for k, v in vae.vae_state_dict().items()})
    return {k: v.detach().half().contiguous() for k, v in out.items()}


def build_checkpoint(trained: Path, out: Path) -> Path:
    """Write the loadable checkpoint built from a trained-weights file to `out` (atomically); about 290 MB."""
    import safetensors.torch

    unet, text = load_trained(trained)
    tmp = out.with_suffix(".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    # single-key metadata keeps the bytes identical between builds
    safetensors.torch.save_file(checkpoint_state_dict(unet, text), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out
