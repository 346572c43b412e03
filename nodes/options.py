"""IDEmbeddingOptions: per-use strength and region mask for an identity (not saved in the file)."""
from __future__ import annotations

import dataclasses

from ..core.errors import SeFiError
from .common import CATEGORY, IDENTITY, SEARCH_WORDS, require_finite


class IDEmbeddingOptions:
    DESCRIPTION = ("Set how strongly an identity applies and, optionally, the region of the image it may appear in "
                   "(its tokens get no attention outside the mask), e.g. to keep two people apart.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = ("The same identity with these options; the input is not changed.",)
    FUNCTION = "configure"
    SEARCH_ALIASES = (*SEARCH_WORDS, "identity strength", "face strength", "region", "mask", "two people")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "identity": (IDENTITY, {"tooltip": "A learned or loaded identity."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "0 = the prompt without the identity (its init word, e.g. 'person'), "
                                                  "1 = as learned, >1 exaggerates. Linear in token space."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where the identity may appear (white). Any size; it is stretched to "
                                             "the image. Leave empty for everywhere."}),
            },
        }

    def configure(self, identity, strength, mask=None):
        require_finite(strength=strength)
        region = None
        if mask is not None:
            if mask.ndim == 3:
                if mask.shape[0] != 1:
                    raise SeFiError(f"Got a batch of {mask.shape[0]} masks; connect one mask per identity.")
                mask = mask[0]
            if mask.ndim != 2 or mask.max() < 0.5:
                raise SeFiError("The region mask is empty (no white area); paint where the person goes.")
            region = mask.detach().float().cpu().clone()
        return (dataclasses.replace(identity, strength=float(strength), region=region),)
