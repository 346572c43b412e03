"""IDAttentionHeatmap: where the identity token attends at each stage, as pictures."""
from __future__ import annotations

from ..host.heatmap import identity_heatmaps
from ..host.images import prepare_reference
from .common import CATEGORY, IDENTITY, SEARCH_WORDS


class IDAttentionHeatmap:
    DESCRIPTION = ("Heat maps of the identity token's cross-attention over the photo, one image per stage "
                   "(early/layout stage last). A good identity attends to the face, not the background.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("heatmaps", "token_norms")
    OUTPUT_TOOLTIPS = ("One overlay per stage (stage 0 = detail, last = layout).",
                       ("Each stage's k/v token norm relative to the init word's: far above 1 means an over-strong "
                        "identity (lower its strength in 'ID Embedding Options')."))
    FUNCTION = "render"
    SEARCH_ALIASES = (*SEARCH_WORDS, "attention map", "heat map", "heatmap", "visualize", "token norm")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD1.x / SDXL MODEL the identity was learned on."}),
            "clip": ("CLIP", {"tooltip": "The same checkpoint's CLIP."}),
            "vae": ("VAE", {"tooltip": "The same checkpoint's VAE."}),
            "image": ("IMAGE", {"tooltip": "The reference photo (or any face photo)."}),
            "identity": (IDENTITY, {"tooltip": "The identity to inspect."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64,
                                   "tooltip": "Size of the square the photo is cropped to."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                              "tooltip": "Noise seed (fixed: the map is reproducible)."}),
        }}

    def render(self, model, clip, vae, image, identity, resolution, seed):
        reference, _ = prepare_reference(image, None, resolution)
        maps, report = identity_heatmaps(model, clip, vae, reference, identity, seed=seed)
        return {"ui": {"text": [report]}, "result": (maps, report)}
