"""ExportIDEmbeddingAsTextualInversion: an identity as a textual-inversion embedding in models/embeddings."""
from __future__ import annotations

from ..core.errors import SeFiError
from ..core.identity import Identity
from ..core.textual_inversion import EXPORTED, FOLDER, export_embedding
from .common import CATEGORY, IDENTITY, SEARCH_WORDS

LOSS = ("An embedding is ONE token, used for K and V at every sampling step; the identity has one K and one V token "
        f"for each of its stages. The export writes the {EXPORTED}, the one token measured nearest to the per-stage "
        "conditioning: expect the person to come out less exactly than with 'Apply Per-Stage ID Tokens'. The identity "
        "file itself is not changed.")


class ExportIDEmbeddingAsTextualInversion:
    DESCRIPTION = ("Write a learned identity as a textual-inversion embedding (.safetensors) into models/embeddings, "
                   "the format every UI reads: write embedding:NAME in any CLIP Text Encode prompt here, or share the "
                   "file with people without this pack (A1111/Forge and kohya read it too; an SD1 identity gives an "
                   "SD1 embedding, an SDXL identity an SDXL one). " + LOSS)
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt_word",)
    OUTPUT_TOOLTIPS = ("The word to write in a prompt, e.g. 'embedding:alice' (ComfyUI's syntax).",)
    OUTPUT_NODE = True
    FUNCTION = "export"
    SEARCH_ALIASES = (*SEARCH_WORDS, "textual inversion", "embedding", "export embedding", "share identity", "a1111",
                      "kohya")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity": (IDENTITY, {"tooltip": "A learned or loaded identity (not through 'ID Embedding Options': an "
                                               "embedding holds the learned identity only). " + LOSS}),
            "name": ("STRING", {"default": "", "tooltip": "The embedding's name: the file models/embeddings/<name>"
                                                         ".safetensors and the word after 'embedding:' in prompts. "
                                                         "Letters, digits, _ - . only. Empty: the identity's "
                                                         "placeholder without < > (e.g. <alice> -> alice)."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing embedding of that name. Off: "
                                                                  "an existing file with other contents is an error "
                                                                  "(the same contents are left as they are)."}),
        }}

    def export(self, identity: Identity | None, name: str, overwrite: bool) -> dict:
        import folder_paths

        if identity is None:
            raise SeFiError("No identity connected: connect 'Learn ID Embedding' or 'Load ID Embedding' to 'identity'.")
        folders = folder_paths.get_folder_paths(FOLDER) if FOLDER in folder_paths.folder_names_and_paths else []
        if not folders:
            raise SeFiError("This ComfyUI has no 'embeddings' models folder registered; add one (models/embeddings or "
                            "extra_model_paths.yaml) and restart.")
        path = export_embedding(identity, folders[0], name, overwrite=overwrite)
        word = f"embedding:{path.stem}"
        return {"ui": {"text": [f"{path.name} -> write {word} in a prompt"]}, "result": (word,)}
