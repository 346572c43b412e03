"""Seeded tiny checkpoints that ComfyUI's own loaders accept (see CONTRIBUTING.md).

SD1 family: a shallow UNet with SD1's widths (model_channels 320, context 768), plus a full
CLIP-L and the standard SD VAE (ComfyUI leaves unloaded weights uninitialised, so every tensor
must be in the file). Every tensor is filled from one seed, so the file is reproducible.
Needs the ComfyUI tree importable (the harness puts it on sys.path first).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

TINY_SD1_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 1, 1],
    "transformer_depth_middle": -2,  # no middle block: smallest shape the SD1 detector accepts
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

BUILDER_VERSION = "1"


def _shapes(module: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}


def _fill(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Seeded values with sane scales: unit norms, 1/sqrt(fan_in) weights, small biases."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape, dtype = shapes[key]
        if not dtype.is_floating_point:
            out[key] = torch.arange(shape[-1]).expand(shape).clone().to(dtype) if len(shape) else torch.zeros(shape, dtype=dtype)
            continue
        leaf = key.rsplit(".", 1)[-1]
        is_norm = any(n in key for n in ("norm", "ln_", "layer_norm")) and len(shape) == 1
        if is_norm and leaf == "weight":
            t = torch.ones(shape)
        elif leaf == "bias" or len(shape) <= 1:
            t = torch.randn(shape, generator=gen) * 0.01
        elif "embedding" in key:
            t = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            t = torch.randn(shape, generator=gen) / fan_in ** 0.5
        out[key] = t.to(torch.float16)
    return out


def _sd1_state_shapes(unet_config: dict | None = None) -> dict[str, tuple]:
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    shapes = {}
    unet = UNetModel(**(unet_config or TINY_SD1_UNET), device="meta", operations=ops)
    shapes.update({f"model.diffusion_model.{k}": v for k, v in _shapes(unet).items()})
    clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    shapes.update({f"cond_stage_model.{k}": v for k, v in _shapes(clip).items()
                   if "text_projection" not in k and "logit_scale" not in k})
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    shapes.update({f"first_stage_model.{k}": v for k, v in _shapes(vae).items()})
    return shapes


def cache_dir() -> Path:
    root = Path(os.environ.get("SEFI_CACHE", Path.home() / ".cache" / "sefi-ide"))
    return root / "tiny-checkpoints"


def build_tiny_sd1_checkpoint(path: Path, seed: int = 0, unet_config: dict | None = None) -> Path:
    """Write the tiny SD1 checkpoint (or, with `unet_config`, one with that UNet) to `path` atomically."""
    import safetensors.torch

    tensors = _fill(_sd1_state_shapes(unet_config), seed)
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    # single-key metadata keeps the bytes identical between builds
    safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def tiny_sd1_checkpoint(seed: int = 0) -> Path:
    """The cached tiny SD1 checkpoint for `seed`, built on first use (outside the repository)."""
    tag = hashlib.sha256(repr((BUILDER_VERSION, TINY_SD1_UNET, seed)).encode()).hexdigest()[:10]
    path = cache_dir() / f"tiny-sd1-{seed}-{tag}.safetensors"
    if not path.exists():
        build_tiny_sd1_checkpoint(path, seed)
    return path


# --- SDXL family -----------------------------------------------------------------------------------
# The SDXL detector demands the full 2.6 B-parameter UNet, too big for CPU tests, so tiny SDXL-family
# objects are built through ComfyUI's own classes instead: the SDXL model config with a reduced
# unet_config (same widths where they matter: context 2048, ADM 2816, linear transformer projections),
# ComfyUI's SDXL tokenizer, and its SDClipModel text encoders with reduced depth (widths 768 and 1280
# kept, so identity tokens have the real shapes).

TINY_SDXL_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def _text_config(name: str, **overrides) -> str:
    """A copy of one of ComfyUI's text-encoder configs with `overrides` (e.g. fewer layers), as a file path."""
    import json

    import comfy.sd1_clip

    src = Path(comfy.sd1_clip.__file__).parent / name
    config = json.loads(src.read_text())
    config.update(overrides)
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items()))
    path = cache_dir() / f"text-{tag}-{name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return str(path)


def _sdxl_clip_class(**overrides):
    """ComfyUI's SDXL dual text encoder (CLIP-L + OpenCLIP-G) with both configs changed by `overrides`."""
    import comfy.sd1_clip
    import comfy.sdxl_clip

    l_config = _text_config("sd1_clip_config.json", **overrides)
    g_config = _text_config("clip_config_bigg.json", **overrides)

    class ConfiguredSDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (host signature)
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=l_config, model_options=model_options)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, textmodel_json_config=g_config,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    return ConfiguredSDXLClipModel


def _sd1_clip_class(**overrides):
    """ComfyUI's SD1 text encoder (CLIP-L) with its config changed by `overrides`."""
    import comfy.sd1_clip

    config = _text_config("sd1_clip_config.json", **overrides)

    class ConfiguredSD1ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 (host signature)
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             clip_model=lambda **kw: comfy.sd1_clip.SDClipModel(
                                 textmodel_json_config=config, return_projected_pooled=False, **kw))

    return ConfiguredSD1ClipModel


def random_text_encoder(family: str, seed: int = 0, embedding_directory=None, **overrides):
    """A random-weight CLIP of a family through ComfyUI's classes, its configs changed by `overrides`; with
    `embedding_directory` its tokenizer reads `embedding:NAME` from there, as a checkpoint loader's CLIP does."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    if family == "sd1":
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, _sd1_clip_class(**overrides))
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, _sdxl_clip_class(**overrides))
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    _fill_module(clip.cond_stage_model, seed)
    return clip


def _fill_module(module: torch.nn.Module, seed: int) -> None:
    values = _fill(_shapes(module), seed)
    module.load_state_dict({k: v.to(dtype=t.dtype) for (k, v), t in
                            zip(sorted(values.items()), [module.state_dict()[k] for k in sorted(values)])})


def _random_vae(seed: int):
    """The standard SD/SDXL VAE architecture through comfy.sd.VAE, every weight filled from `seed`."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae_shapes = _shapes(AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4))
    return comfy.sd.VAE(sd={k: v.float() for k, v in _fill(vae_shapes, seed).items()})


def tiny_sdxl(seed: int = 0):
    """(MODEL, CLIP, VAE) of the SDXL family, built through ComfyUI's classes and filled from `seed`.

    Call under torch.inference_mode() to get tensors like the host's loader gives.
    """
    model = random_unet_model("sdxl", TINY_SDXL_UNET, seed, torch.float32)
    clip = random_text_encoder("sdxl", seed + 1, num_hidden_layers=3, intermediate_size=512)
    vae = _random_vae(seed + 2)
    return model, clip, vae


def tiny_sd1_controlnet(seed: int = 0):
    """A ControlNet for the tiny SD1 UNet, loaded through ComfyUI's own ControlNet loader."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in TINY_SD1_UNET.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, device="meta",
                                     operations=comfy.ops.disable_weight_init)
    state = {k: v.float() for k, v in _fill(_shapes(net), seed).items()}
    return comfy.controlnet.load_controlnet_state_dict(state)


def random_unet_model(family: str, unet_config: dict, seed: int = 0, dtype: torch.dtype | None = None):
    """A random-weight MODEL (ModelPatcher) of a family, any size, through ComfyUI's classes (benchmarks)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = (comfy.supported_models.SD15 if family == "sd1" else comfy.supported_models.SDXL)(dict(unet_config))
    config.set_inference_dtype(dtype or mm.unet_dtype(), None)
    base_model = config.get_model({})
    _fill_module(base_model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base_model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def random_family_models(family: str, unet_config: dict, seed: int = 0, dtype: torch.dtype | None = None):
    """Full-size (or any-size) random-weight MODEL/CLIP/VAE of a family through ComfyUI's classes (benchmarks)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    model = random_unet_model(family, unet_config, seed, dtype)
    clip_cls = comfy.sd1_clip.SD1ClipModel if family == "sd1" else comfy.sdxl_clip.SDXLClipModel
    tok_cls = comfy.sd1_clip.SD1Tokenizer if family == "sd1" else comfy.sdxl_clip.SDXLTokenizer
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tok_cls, clip_cls))
    _fill_module(clip.cond_stage_model, seed + 1)
    vae = _random_vae(seed + 2)
    return model, clip, vae
