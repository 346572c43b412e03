"""A learned identity as a textual-inversion embedding: the file every UI reads (ComfyUI's `embedding:NAME`,
A1111/Forge, kohya), written beside the host's other embeddings. ComfyUI-free.

What is lost: our identity is 2·S tokens per text encoder (one K and one V token for each of S timestep stages);
an embedding is ONE token used for K and V at every step. Which one token is exported was chosen by measurement
(`bench/export_vector.py`, bench/RESULTS.md block J): the candidate whose `embedding:NAME` conditioning is nearest to
the per-stage conditioning of 'Apply Per-Stage ID Tokens', averaged over stages and K/V.

File layout (checked against the readers' code):
- SD1: one tensor `emb_params` (1, 768): kohya's SD1 key; ComfyUI (`comfy/sd1_clip.py` load_embed) takes it as
  the file's only tensor; A1111 reads a safetensors file with exactly one tensor as an embedding (its "diffuser
  concepts" branch: any key, 2-D (n, 768)).
- SDXL: `clip_l` (1, 768) and `clip_g` (1, 1280): the keys ComfyUI's SDXL tokenizers ask for by name, A1111's SDXL
  branch needs (both present, same token count) and kohya's SDXL trainer writes.
float32, plus string metadata (which identity, which vector) that the readers ignore.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import SeFiError
from .identity import PACK_VERSION, Identity, load_identity, validate_identity, write_safetensors_atomically

Table = torch.Tensor  # (stages, width): one encoder's k or v tokens


def _middle_k(k: Table, v: Table) -> torch.Tensor:
    return k[k.shape[0] // 2]


def _mean_k(k: Table, v: Table) -> torch.Tensor:
    return k.mean(0)


def _mean_v(k: Table, v: Table) -> torch.Tensor:
    return v.mean(0)


def _mean_kv(k: Table, v: Table) -> torch.Tensor:
    return torch.cat([k, v]).mean(0)


def _middle_kv(k: Table, v: Table) -> torch.Tensor:
    mid = k.shape[0] // 2
    return (k[mid] + v[mid]) / 2


def _mean_kv_rescaled(k: Table, v: Table) -> torch.Tensor:
    """The mean of all 2·S tokens at their mean norm (averaging tokens that point apart shortens the mean)."""
    tokens = torch.cat([k, v])
    mean = tokens.mean(0)
    return mean * (tokens.norm(dim=-1).mean() / mean.norm().clamp_min(1e-12))


# Candidate one-token summaries of an identity, per text encoder: (k (S, d), v (S, d)) -> (d,)
CANDIDATES: dict[str, Callable[[Table, Table], torch.Tensor]] = {
    "middle stage K": _middle_k,
    "mean of K over stages": _mean_k,
    "mean of V over stages": _mean_v,
    "mean of K and V over stages": _mean_kv,
    "middle stage, mean of K and V": _middle_kv,
    "mean of K and V, rescaled to their mean norm": _mean_kv_rescaled,
}
EXPORTED = "mean of K over stages"  # the measured best (bench/RESULTS.md block J, docs/how-it-works.md)

FILE_KEYS = {"sd1": {"clip_l": "emb_params"}, "sdxl": {"clip_l": "clip_l", "clip_g": "clip_g"}}
FOLDER = "embeddings"  # ComfyUI's models/embeddings (folder_paths name)
MAX_NAME_BYTES = 200
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def export_vectors(identity: Identity, vector: str = EXPORTED) -> dict[str, torch.Tensor]:
    """The one token per text encoder that the export writes: {encoder: (d,) float32}."""
    if vector not in CANDIDATES:
        raise SeFiError(f"Unknown export vector {vector!r}; choose one of {sorted(CANDIDATES)}.")
    return {enc: CANDIDATES[vector](identity.k[enc].detach().float().cpu(), identity.v[enc].detach().float().cpu())
            for enc in identity.k}


def embedding_tensors(identity: Identity, vector: str = EXPORTED) -> dict[str, torch.Tensor]:
    """The embedding file's tensors: SD1 {"emb_params": (1, 768)}, SDXL {"clip_l": (1, 768), "clip_g": (1, 1280)}."""
    keys = FILE_KEYS[identity.family]
    return {keys[enc]: vec.reshape(1, -1).contiguous() for enc, vec in export_vectors(identity, vector).items()}


def embedding_name(name: str, placeholder: str = "") -> str:
    """The embedding's name (the file's stem and the word after `embedding:`); empty: the identity's placeholder
    without its brackets, e.g. <alice> -> alice."""
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem:
        stem = re.sub(r"[^A-Za-z0-9_.\-]+", "_", placeholder.strip().strip("<>")).strip("_.-")
        if not stem:
            raise SeFiError(f"Enter a name for the embedding (the placeholder {placeholder!r} gives none), e.g. "
                            f"'alice'.")
    if not _NAME.fullmatch(stem):
        raise SeFiError(f"The embedding name {stem!r} may use letters, digits, '_', '-' and '.', and must start with "
                        f"a letter or digit: prompts write it as one word after 'embedding:' (e.g. embedding:alice), "
                        f"so spaces, brackets, commas, colons and folders do not work there.")
    if len(stem.encode()) > MAX_NAME_BYTES:
        raise SeFiError(f"The embedding name is {len(stem.encode())} bytes long; use at most {MAX_NAME_BYTES}.")
    return stem


def _metadata(identity: Identity, vector: str) -> dict[str, str]:
    return {
        "format": "textual inversion embedding (exported by SeFi-IDE)",
        "sefi_vector": vector,
        "sefi_family": identity.family,
        "sefi_placeholder": identity.placeholder,
        "sefi_init_word": identity.init_word,
        "sefi_stages": str(identity.num_stages),
        "sefi_reference_sha256": identity.reference_sha256,
        "sefi_pack_version": PACK_VERSION,
    }


def export_embedding(identity: Identity, folder: str | os.PathLike, name: str = "", overwrite: bool = False,
                     vector: str = EXPORTED) -> Path:
    """Write `folder/<name>.safetensors` atomically (a temporary file in the folder, then a rename: never half a
    file). An existing file with the same bytes is left as it is; one with other bytes is refused unless
    `overwrite`. The identity is only read."""
    if identity.strength != 1.0 or identity.region is not None:
        raise SeFiError("This identity carries per-use options from 'ID Embedding Options' (strength or region); an "
                        "embedding file holds the learned identity only. Connect the identity without that node.")
    validate_identity(identity, f"Identity '{identity.placeholder}'")
    stem = embedding_name(name, identity.placeholder)
    folder = Path(folder)
    path = folder / f"{stem}.safetensors"

    def keep_or_refuse(tmp: Path) -> bool:
        if not path.exists() or overwrite:
            return True
        if tmp.read_bytes() == path.read_bytes():
            return False  # already exported: nothing to change
        raise SeFiError(f"The embedding '{path.name}' already exists (another file). Choose another name or enable "
                        f"overwrite.")

    return write_safetensors_atomically(path, embedding_tensors(identity, vector), _metadata(identity, vector),
                                        verb="write", before_replace=keep_or_refuse)


def export_identity_files(files: list[Path], folder: str | os.PathLike,
                          overwrite: bool = False) -> tuple[list[Path], list[str]]:
    """The batch command's export: each identity file as `folder/<its stem>.safetensors`. Returns the embeddings
    written (or already there with the same bytes) and one message per file that failed; one failure never stops
    the others."""
    written, errors = [], []
    for file in files:
        try:
            written.append(export_embedding(load_identity(file), folder, Path(file).stem, overwrite=overwrite))
        except SeFiError as exc:
            errors.append(f"{Path(file).name}: {exc}")
    return written, errors
