"""Shared bits of the node classes: the identity type, the identities folder, progress and cancel."""
from __future__ import annotations

import math
import os

from ..core.errors import SeFiError

IDENTITY = "SEFI_IDENTITY"
CATEGORY = "SeFi-IDE"
FOLDER = "sefi_identities"
# Node search on current ComfyUI also matches a classic node's SEARCH_ALIASES (server.py node_info): the words people
# type when they look for an identity / face pack. Every node has these plus its own.
SEARCH_WORDS = ("identity", "face", "person", "personalization", "consistent character", "id embedding", "sefi")


def register_identity_folder() -> None:
    """models/sefi_identities, registered with folder_paths (dropdowns, extra_model_paths.yaml)."""
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


def identity_folder() -> str:
    import folder_paths

    register_identity_folder()
    return folder_paths.get_folder_paths(FOLDER)[0]


def require_finite(**values: float) -> None:
    """FLOAT inputs: the API can send NaN or infinity, which pass the host's min/max check."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise SeFiError(f"'{name}' is {value}; enter a finite number.")


PREVIEW_EVERY = 10  # steps between live previews of the identity token's attention (bench/RESULTS.md: its cost)


def progress_callback(total: int, reference=None):
    """ComfyUI progress bar + cancel: the interrupt is checked once per training step. With the (1,3,R,R) reference,
    records that carry "attention" show it over the photo as the bar's preview picture."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def on_step(step: int, steps: int, record: dict) -> None:
        preview = None
        if reference is not None and "attention" in record:
            from ..host.plots import PREVIEW_SIDE, attention_preview

            preview = ("JPEG", attention_preview(reference, record["attention"]), PREVIEW_SIDE)
        bar.update_absolute(step, steps, preview)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return on_step
