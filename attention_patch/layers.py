"""Which cross-attention layers a ComfyUI UNet has, at which resolution, and the default choice."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import SeFiError


@dataclass(frozen=True)
class CrossAttnLayer:
    key: tuple[str, int, int]  # (block name, block id, transformer index) as ComfyUI's patches_replace uses
    downsample: int  # latent side / attention-map side

    @property
    def name(self) -> str:
        return f"{self.key[0]}.{self.key[1]}.{self.key[2]}"


def _transformer_counts(block) -> int:
    from comfy.ldm.modules.attention import SpatialTransformer

    return sum(len(m.transformer_blocks) for m in block if isinstance(m, SpatialTransformer))


def cross_attention_layers(unet) -> list[CrossAttnLayer]:
    """All attn2 layers of a ComfyUI `UNetModel`, with their downsampling factor."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    layers: list[CrossAttnLayer] = []
    factor = 1
    for i, block in enumerate(unet.input_blocks):
        layers += [CrossAttnLayer(("input", i, j), factor) for j in range(_transformer_counts(block))]
        if any(isinstance(m, Downsample) for m in block):
            factor *= 2
    if unet.middle_block is not None:
        layers += [CrossAttnLayer(("middle", 0, j), factor) for j in range(_transformer_counts(unet.middle_block))]
    for i, block in enumerate(unet.output_blocks):
        layers += [CrossAttnLayer(("output", i, j), factor) for j in range(_transformer_counts(block))]
        if any(isinstance(m, Upsample) for m in block):
            factor //= 2
    return layers


def select_layers(layers: list[CrossAttnLayer], spec: str) -> list[CrossAttnLayer]:
    """spec: "auto" (maps at 1/4 of the latent side: 16x16 at 512 px SD1, 32x32 at 1024 px SDXL;
    a UNet without such layers uses its coarsest attention level), "all", or names like
    "input.7.0,output.3.0"."""
    spec = spec.strip().lower()
    if not layers:
        raise SeFiError("This model has no cross-attention layers; it is not a supported SD1/SDXL UNet.")
    if spec == "all":
        return layers
    if spec == "auto":
        chosen = [layer for layer in layers if layer.downsample == 4]
        if not chosen:
            coarsest = max(layer.downsample for layer in layers)
            chosen = [layer for layer in layers if layer.downsample == coarsest]
        return chosen
    by_name = {layer.name: layer for layer in layers}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise SeFiError(f"Unknown attention layer(s) {unknown or spec!r}. Use 'auto', 'all', or names from: "
                        f"{', '.join(by_name)}.")
    return [by_name[n] for n in names]
