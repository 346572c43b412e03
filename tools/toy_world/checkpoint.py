"""The toy SD1 checkpoint: a small file of trained weights, and a builder that writes the full checkpoint ComfyUI's
CheckpointLoaderSimple loads as SD1.

Trained (committed, fp16): the slim UNet (unet.py) and, of the text encoder, the token-embedding rows of the world's
words (tokens.json, plus start/end) and the final LayerNorm. Filled by the builder, deterministically:
- the UNet's zero padding to SD1's shapes (unet.SlimUNet.shell_state_dict);
- CLIP-L's 12 layers as identities (every attention output projection and MLP output layer zero, so each residual
  layer adds nothing), zero position embeddings and zero rows for every other word. The context is then
  final_layer_norm(row of each token): a bag of words, order-free, with the placeholder's row as the pack's
  identity injection point;
- the analytic VAE (vae.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import vae
from .tokens import END, START, load_token_ids
from .unet import SlimConfig, SlimUNet

CLIP_LAYERS, CLIP_WIDTH, CLIP_MLP, CLIP_VOCAB, CLIP_POSITIONS = 12, 768, 3072, 49408, 77
TEXT_PREFIX = "transformer.text_model."


def text_state_dict(token_ids: list[int], rows: torch.Tensor, norm_weight: torch.Tensor,
                    norm_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every weight of ComfyUI's SD1 CLIP-L (keys without `cond_stage_model.`): identity layers, the given rows."""
    embedding = torch.zeros(CLIP_VOCAB, CLIP_WIDTH)
    embedding[torch.tensor(token_ids)] = rows.float()
    out = {f"{TEXT_PREFIX}embeddings.token_embedding.weight": embedding,
           f"{TEXT_PREFIX}embeddings.position_embedding.weight": torch.zeros(CLIP_POSITIONS, CLIP_WIDTH),
           f"{TEXT_PREFIX}final_layer_norm.weight": norm_weight.float(),
           f"{TEXT_PREFIX}final_layer_norm.bias": norm_bias.float()}
    shapes = {"self_attn.q_proj": (CLIP_WIDTH, CLIP_WIDTH), "self_attn.k_proj": (CLIP_WIDTH, CLIP_WIDTH),
              "self_attn.v_proj": (CLIP_WIDTH, CLIP_WIDTH), "self_attn.out_proj": (CLIP_WIDTH, CLIP_WIDTH),
              "mlp.fc1": (CLIP_MLP, CLIP_WIDTH), "mlp.fc2": (CLIP_WIDTH, CLIP_MLP)}
    for layer in range(CLIP_LAYERS):
        key = f"{TEXT_PREFIX}encoder.layers.{layer}."
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{key}{norm}.weight"] = torch.ones(CLIP_WIDTH)
            out[f"{key}{norm}.bias"] = torch.zeros(CLIP_WIDTH)
        for name, shape in shapes.items():  # all zero: out_proj and fc2 zero make the layer an identity
            out[f"{key}{name}.weight"] = torch.zeros(shape)
            out[f"{key}{name}.bias"] = torch.zeros(shape[0])
    return out


def text_token_ids() -> list[int]:
    """The rows the text encoder trains: start, end, and every world word's id (sorted)."""
    return sorted({START, END, *load_token_ids().values()})


def save_trained(path: Path, unet: SlimUNet, rows: torch.Tensor, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, notes: dict[str, str] | None = None) -> None:
    """The committed file: fp16 slim-UNet weights and the text rows, the slim config in the metadata."""
    import safetensors.torch

    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors["text.rows"] = rows.detach().half().contiguous()
    tensors["text.final_layer_norm.weight"] = norm_weight.detach().half().contiguous()
    tensors["text.final_layer_norm.bias"] = norm_bias.detach().half().contiguous()
    cfg = unet.cfg
    metadata = {"slim_config": json.dumps([cfg.width, cfg.time_width, cfg.ff_width]),
                "token_ids": json.dumps(text_token_ids()), **(notes or {})}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def load_trained(path: Path) -> tuple[SlimUNet, list[int], dict[str, torch.Tensor]]:
    """(slim UNet in float32, token ids, {'rows', 'norm_weight', 'norm_bias'}) from a trained-weights file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    unet = SlimUNet(SlimConfig(*json.loads(meta["slim_config"])))
    unet.load_state_dict({k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")})
    text = {"rows": tensors["text.rows"], "norm_weight": tensors["text.final_layer_norm.weight"],
            "norm_bias": tensors["text.final_layer_norm.bias"]}
    return unet, json.loads(meta["token_ids"]), text


def checkpoint_state_dict(unet: SlimUNet, token_ids: list[int], text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full SD1 checkpoint's tensors (fp16), ComfyUI's keys."""
    out = {f"model.diffusion_model.{k}": v for k, v in unet.shell_state_dict().items()}
    out.update({f"cond_stage_model.{k}": v for k, v in
                text_state_dict(token_ids, text["rows"], text["norm_weight"], text["norm_bias"]).items()})
    out.update({f"first_stage_model.{k}": v for k, v in vae.vae_state_dict().items()})
    return {k: v.detach().half().contiguous() for k, v in out.items()}


def build_checkpoint(trained: Path, out: Path) -> Path:
    """Write the loadable checkpoint built from a trained-weights file to `out` (atomically); about 290 MB."""
    import safetensors.torch

    unet, token_ids, text = load_trained(trained)
    tmp = out.with_suffix(".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    # single-key metadata keeps the bytes identical between builds
    safetensors.torch.save_file(checkpoint_state_dict(unet, token_ids, text), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out
