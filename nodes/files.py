"""Save / load identity files in models/sefi_identities (safetensors only)."""
from __future__ import annotations

from ..core.errors import SeFiError
from ..core.identity import identity_file_name, load_identity, safe_child_path, save_identity
from .common import CATEGORY, FOLDER, IDENTITY, SEARCH_WORDS, identity_folder, register_identity_folder


class SaveIDEmbedding:
    DESCRIPTION = "Save an identity as a small .safetensors file in models/sefi_identities to share or reuse."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    SEARCH_ALIASES = (*SEARCH_WORDS, "save identity", "save face", "embedding", "share")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity": (IDENTITY, {"tooltip": "The identity to save."}),
            "filename": ("STRING", {"default": "my_person", "tooltip": "File name in models/sefi_identities "
                                                                       "(.safetensors is added)."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
            "include_generator": ("BOOLEAN", {"default": False, "tooltip": "Also store the generator weights and "
                                              "optimiser state so training can be resumed (SD1 ~90 MB, SDXL ~250 MB). "
                                              "Off: the tokens only (SD1 ~30 KB, SDXL ~75 KB), the file to share."}),
        }}

    def save(self, identity, filename, overwrite, include_generator):
        path = safe_child_path(identity_folder(), identity_file_name(filename))
        save_identity(identity, path, overwrite=overwrite, include_generator=include_generator)
        return {"ui": {"text": [path.name]}, "result": ()}


class LoadIDEmbedding:
    DESCRIPTION = "Load an identity file from models/sefi_identities."
    CATEGORY = CATEGORY
    RETURN_TYPES = (IDENTITY,)
    RETURN_NAMES = ("identity",)
    OUTPUT_TOOLTIPS = (("The identity in the file: connect it to 'Apply Per-Stage ID Tokens' (or to 'resume_from' "
                        "of the advanced learner, if it was saved with its generator)."),)
    FUNCTION = "load"
    SEARCH_ALIASES = (*SEARCH_WORDS, "load identity", "load face", "embedding")

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        register_identity_folder()
        return {"required": {"identity_file": (folder_paths.get_filename_list(FOLDER),
                                               {"tooltip": "An identity saved by 'Save ID Embedding'."})}}

    def load(self, identity_file):
        import folder_paths

        path = folder_paths.get_full_path(FOLDER, identity_file)
        if path is None:
            raise SeFiError(f"Identity file '{identity_file}' not found in models/{FOLDER}.")
        safe_child_path(identity_folder(), identity_file)
        return (load_identity(path),)
