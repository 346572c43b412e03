"""ExportIDEmbeddingAsTextualInversion: an identity as a textual-inversion embedding in models/embeddings."""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from ..core.errors import SeFiError
from ..core.identity import Identity
from ..core.textual_inversion import EXPORTED, FOLDER, export_embedding
from .common import CATEGORY, IDENTITY, SEARCH_WORDS

LOSS = ("An embedding is ONE token, used for K and V at every sampling step; the identity has one K and one V token "
        f"for each of its stages. The export writes the {EXPORTED}, the one token measured nearest to the per-stage "
        "conditioning: expect the person to come out less exactly than with 'Apply Per-Stage ID Tokens'. The identity "
        "file itself is not changed.")


class _WrittenFiles:
    """The files the export nodes wrote, by their `name` input, so that IS_CHANGED can tell the host to run them again
    when one was deleted or changed on disk. ComfyUI passes IS_CHANGED the constant inputs only (the identity is a
    link, so an empty name does not tell the file): the files written are the only thing it can check. Nodes with
    the same name share an entry; at worst one of them runs again for nothing (it keeps a file with the same
    bytes as it is)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, dict[Path, str]] = {}  # name input -> {embedding file: sha256 of what it holds}
        self._generation: dict[str, int] = {}

    def remember(self, name: str, path: Path) -> None:
        with self._lock:
            self._files.setdefault(name, {})[path] = _sha256(path)

    def generation(self, name: str) -> int:
        """A number that grows each time a file written under this name is found missing or changed. It only grows:
        the newer hosts' caches (LRU, RAM pressure) keep older results, so going back to an earlier value could hit
        one of them instead of exporting again."""
        with self._lock:
            files = self._files.get(name, {})
            stale = [path for path, sha in files.items() if _sha256(path) != sha]
            for path in stale:
                del files[path]  # the export writes it again and remembers it anew, if it is still its target
            if stale:
                self._generation[name] = self._generation.get(name, 0) + 1
            return self._generation.get(name, 0)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()  # an embedding is a few KB
    except OSError:
        return ""  # missing or unreadable


WRITTEN = _WrittenFiles()


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

    @classmethod
    def IS_CHANGED(cls, name: str | None = None, **_inputs) -> str:
        """Same inputs, file still as written: the host's cached result stands. The file deleted or changed since:
        a new value, so the host runs the export again (it rewrites a missing file; another file there is refused
        unless overwrite is on, as always)."""
        return str(WRITTEN.generation(str(name)))

    def export(self, identity: Identity | None, name: str, overwrite: bool) -> dict:
        import folder_paths

        if identity is None:
            raise SeFiError("No identity connected: connect 'Learn ID Embedding' or 'Load ID Embedding' to 'identity'.")
        folders = folder_paths.get_folder_paths(FOLDER) if FOLDER in folder_paths.folder_names_and_paths else []
        if not folders:
            raise SeFiError("This ComfyUI has no 'embeddings' models folder registered; add one (models/embeddings or "
                            "extra_model_paths.yaml) and restart.")
        path = export_embedding(identity, folders[0], name, overwrite=overwrite)
        WRITTEN.remember(str(name), path)
        word = f"embedding:{path.stem}"
        return {"ui": {"text": [f"{path.name} -> write {word} in a prompt"]}, "result": (word,)}
