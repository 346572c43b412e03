"""ApplyPerStageIDTokens: prompt with placeholders + identities -> patched MODEL clone + CONDITIONING."""
from __future__ import annotations

from ..host.conditioning import apply_identities
from .common import CATEGORY, IDENTITY, SEARCH_WORDS

MAX_IDENTITIES = 4


class ApplyPerStageIDTokens:
    DESCRIPTION = ("Encode a prompt that names learned identities (their placeholders) into per-stage K/V "
                   "contexts. Use BOTH outputs: the MODEL carries the per-stage swap, the CONDITIONING goes to the "
                   "sampler's positive input.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "positive")
    OUTPUT_TOOLTIPS = ("A clone of the model with the per-stage K/V patch (the input model is not changed).",
                       "Conditioning for the sampler's positive input.")
    FUNCTION = "apply"
    SEARCH_ALIASES = (*SEARCH_WORDS, "apply identity", "face in prompt", "conditioning", "textual inversion",
                      "embedding")

    @classmethod
    def INPUT_TYPES(cls):
        optional = {f"identity_{i}": (IDENTITY, {"tooltip": "Another identity; its placeholder must be in the text."})
                    for i in range(2, MAX_IDENTITIES + 1)}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL (SD1.x or SDXL family)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "default": "a photo of <id> holding a basketball, eyes closed",
                                    "tooltip": "The prompt; write each identity's placeholder where the person goes."}),
                "identity": (IDENTITY, {"tooltip": "A learned or loaded identity."}),
            },
            "optional": optional,
        }

    def apply(self, model, clip, text, identity, **more):
        identities = [identity] + [more[k] for k in sorted(more) if more[k] is not None]
        return apply_identities(model, clip, text, identities)
