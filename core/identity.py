"""The learned identity and its shareable file: safetensors only, never pickle."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SeFiError

FORMAT_NAME = "sefi-ide-identity"
FORMAT_VERSION = 1
PACK_VERSION = "0.1.0"
MAX_STAGES = 10

# family -> text encoder name -> embedding width
FAMILY_ENCODERS: dict[str, dict[str, int]] = {
    "sd1": {"clip_l": 768},
    "sdxl": {"clip_l": 768, "clip_g": 1280},
}
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sdxl": "SDXL"}


@dataclass
class Identity:
    """Per-stage K/V identity tokens, one (S, d) pair per text encoder."""

    family: str
    placeholder: str
    init_word: str
    k: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    training: dict = field(default_factory=dict)
    reference_sha256: str = ""
    photos: int = 1  # how many photos of the person it was learned from
    # optional, to resume training: generator weights per encoder ("clip_l.<param>") and their design's version
    generator_state: dict[str, torch.Tensor] = field(default_factory=dict)
    generator_version: int = 0
    # optional, to resume exactly: Adam moments per generator parameter, and the steps already done
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    trained_steps: int = 0
    # |token| per stage for k and v and |e| of the init word, per encoder (see token_norms): an over-strong identity shows
    token_norms: dict = field(default_factory=dict)
    # per-use options (set by the "ID Embedding Options" node, never saved): 0 = the init word, 1 = as learned
    strength: float = 1.0
    region: torch.Tensor | None = None  # (H, W) in [0, 1]: where the identity's tokens may be attended to

    @property
    def num_stages(self) -> int:
        return next(iter(self.k.values())).shape[0]

    def check_family(self, model_family: str) -> None:
        if model_family != self.family:
            raise SeFiError(
                f"Identity '{self.placeholder}' was learned for {FAMILY_NAMES.get(self.family, self.family)} "
                f"but the model is {FAMILY_NAMES.get(model_family, model_family)}. Learn the identity again "
                f"on a {FAMILY_NAMES.get(model_family, model_family)} checkpoint, or use a "
                f"{FAMILY_NAMES.get(self.family, self.family)} checkpoint with it."
            )


def token_norms(k: dict[str, torch.Tensor], v: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """{encoder: {"init_word": |e|, "k": [|k_s|...], "v": [|v_s|...]}}, rounded to 4 decimals (stable bytes)."""
    def r(x: torch.Tensor) -> list[float]:
        return [round(float(n), 4) for n in x.detach().float().cpu().reshape(-1)]

    return {enc: {"init_word": r(base[enc].norm())[0], "k": r(k[enc].norm(dim=-1)), "v": r(v[enc].norm(dim=-1))}
            for enc in sorted(k)}


def norm_report(identity: Identity, base: dict[str, torch.Tensor]) -> str:
    """Token norms against the init word's, one line per encoder: a ratio far above 1 means an over-strong
    identity (lower its strength, or learn with fewer steps or a lower learning rate)."""
    norms = token_norms(identity.k, identity.v, base)
    lines = []
    for enc, n in norms.items():
        e = max(n["init_word"], 1e-8)
        ks = ", ".join(f"{x / e:.2f}" for x in n["k"])
        vs = ", ".join(f"{x / e:.2f}" for x in n["v"])
        lines.append(f"{enc}: |init word '{identity.init_word}'| = {n['init_word']:.4f}; |token| / |init word| per "
                     f"stage: k [{ks}], v [{vs}]")
    return "\n".join(lines)


def image_sha256(image: torch.Tensor) -> str:
    """SHA-256 of the reference image as 8-bit RGB, so the same photo gives the same hash."""
    data = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _tensors(identity: Identity, include_generator: bool) -> dict[str, torch.Tensor]:
    out = {}
    for enc in identity.k:
        out[f"k.{enc}"] = identity.k[enc].detach().float().cpu().contiguous()
        out[f"v.{enc}"] = identity.v[enc].detach().float().cpu().contiguous()
    if include_generator:
        for name, t in identity.generator_state.items():
            out[f"generator.{name}"] = t.detach().float().cpu().contiguous()
        for name, t in identity.optimizer_state.items():
            out[f"optimizer.{name}"] = t.detach().float().cpu().contiguous()
    return out


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors layout with a key-sorted header: the same identity gives the same bytes
    (the library's writer orders metadata keys by hash, so two saves can differ)."""
    header: dict = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = tensors[name].to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        f.writelines(blobs)
        f.flush()
        os.fsync(f.fileno())


def save_identity(identity: Identity, path: str | os.PathLike, overwrite: bool = False,
                  include_generator: bool = True) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename (never half a file)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SeFiError(f"'{path.name}' already exists. Choose another name or enable overwrite.")
    validate_identity(identity, str(path))
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "family": identity.family,
        "stages": str(identity.num_stages),
        "placeholder": identity.placeholder,
        "init_word": identity.init_word,
        "training": json.dumps(identity.training, sort_keys=True),
        "reference_sha256": identity.reference_sha256,
        "pack_version": PACK_VERSION,
        "trained_steps": str(identity.trained_steps),
        "photos": str(identity.photos),
        "token_norms": json.dumps(identity.token_norms, sort_keys=True),
    }
    if include_generator and identity.generator_state:
        metadata["generator_version"] = str(identity.generator_version)
    return write_safetensors_atomically(path, _tensors(identity, include_generator), metadata)


def write_safetensors_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                                 verb: str = "save", before_replace: Callable[[Path], bool] | None = None) -> Path:
    """A temporary file in the same folder, then a rename: never half a file. `before_replace(tmp)` may refuse (raise
    SeFiError) or return False to keep the file already there; the temporary file is always removed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:20]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        _write_safetensors(tmp, tensors, metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() creates the host's own files (mkstemp gives 0600)
        if before_replace is None or before_replace(Path(tmp)):
            os.replace(tmp, path)
    except OSError as exc:  # the message names the file, never the server's folders
        raise SeFiError(f"Could not {verb} '{path.name}': {exc.strerror or exc}. Check the disk and the name.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask() -> int:
    """The process umask, read without setting it where the OS allows (os.umask() sets it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


MAX_NAME_CHARS = 200  # file systems allow 255 bytes per name; leave room for the temp-file prefix and suffix


def identity_file_name(filename: str) -> str:
    """A user's file name -> 'name.safetensors', refusing names that would be hidden, empty or too long."""
    name = filename.strip()
    stem = name.removesuffix(".safetensors")
    leaf = stem.replace("\\", "/").rsplit("/", 1)[-1]
    if not leaf.strip() or leaf.startswith("."):
        raise SeFiError(f"The file name {filename!r} is empty or starts with a dot (a hidden file that 'Load ID "
                        f"Embedding' would never list). Enter a name such as 'alice'.")
    if len(leaf.encode()) > MAX_NAME_CHARS:
        raise SeFiError(f"The file name is {len(leaf.encode())} bytes long; use at most {MAX_NAME_CHARS}.")
    return stem + ".safetensors"


def validate_identity(identity: Identity, where: str) -> None:
    """Every field and tensor shape, with a message naming `where` and the problem."""
    if identity.family not in FAMILY_ENCODERS:
        raise SeFiError(f"{where}: unknown model family '{identity.family}' (supported: sd1, sdxl).")
    encoders = FAMILY_ENCODERS[identity.family]
    if set(identity.k) != set(encoders) or set(identity.v) != set(encoders):
        raise SeFiError(f"{where}: a {identity.family} identity needs k/v tokens for {sorted(encoders)}, "
                        f"found k: {sorted(identity.k)}, v: {sorted(identity.v)}.")
    stages = None
    for enc, width in encoders.items():
        for kind, table in (("k", identity.k), ("v", identity.v)):
            t = table[enc]
            if t.ndim != 2 or t.shape[1] != width or not 1 <= t.shape[0] <= MAX_STAGES:
                raise SeFiError(f"{where}: tensor '{kind}.{enc}' has shape {tuple(t.shape)}, expected "
                                f"(stages 1..{MAX_STAGES}, {width}). The file is damaged or not an identity.")
            if stages is not None and t.shape[0] != stages:
                raise SeFiError(f"{where}: tensors disagree on the number of stages.")
            stages = t.shape[0]
            if not torch.isfinite(t).all():
                raise SeFiError(f"{where}: tensor '{kind}.{enc}' contains NaN or infinity.")
    if not identity.placeholder or any(c.isspace() for c in identity.placeholder):
        raise SeFiError(f"{where}: placeholder '{identity.placeholder}' must be one word with no spaces.")


def load_identity(path: str | os.PathLike) -> Identity:
    """Read and check an identity file; every problem names the file."""
    from safetensors import safe_open

    path = Path(path)
    name = path.name
    if path.suffix != ".safetensors":
        raise SeFiError(f"'{name}': identity files are .safetensors only (other formats are never read).")
    if not path.is_file():
        raise SeFiError(f"'{name}': file not found.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error types for truncation/corruption
        raise SeFiError(f"'{name}': not a readable safetensors file ({exc}). It may be truncated or "
                        f"corrupted; save or download it again.") from exc
    if meta.get("format") != FORMAT_NAME:
        raise SeFiError(f"'{name}': not a SeFi-IDE identity file (format is '{meta.get('format')}').")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise SeFiError(f"'{name}': format_version '{meta.get('format_version')}' is not a number.") from None
    if version > FORMAT_VERSION:
        raise SeFiError(f"'{name}': written by a newer pack (format version {version}, this pack reads up "
                        f"to {FORMAT_VERSION}). Update the SeFi-IDE node pack.")
    family = meta.get("family", "")
    encoders = FAMILY_ENCODERS.get(family)
    if encoders is None:
        raise SeFiError(f"'{name}': unknown model family '{family}' (supported: sd1, sdxl).")
    for key in [f"{kind}.{enc}" for enc in encoders for kind in ("k", "v")]:
        if key not in tensors:
            raise SeFiError(f"'{name}': missing tensor '{key}'.")
    generator_state = {k[len("generator."):]: t for k, t in tensors.items() if k.startswith("generator.")}
    identity = Identity(
        family=family,
        placeholder=meta.get("placeholder", ""),
        init_word=_meta_str(meta, "init_word", name),
        k={enc: tensors[f"k.{enc}"].float() for enc in encoders},
        v={enc: tensors[f"v.{enc}"].float() for enc in encoders},
        training=_meta_json_object(meta, "training", name),
        reference_sha256=_meta_str(meta, "reference_sha256", name),
        generator_state=generator_state,
        # files from before the version field hold the version-1 generator
        generator_version=_meta_int(meta, "generator_version", name, default=1 if generator_state else 0),
        optimizer_state={k[len("optimizer."):]: t for k, t in tensors.items() if k.startswith("optimizer.")},
        trained_steps=_meta_int(meta, "trained_steps", name, default=0),
        photos=_meta_int(meta, "photos", name, default=1),
        token_norms=_meta_json_object(meta, "token_norms", name),
    )
    _meta_str(meta, "pack_version", name)
    for key in ("reference_prompt", "layers", "init_word", "placeholder"):  # the ones the nodes read back
        if not isinstance(identity.training.get(key, ""), str):
            raise _meta_damaged(name, f"training.{key}", identity.training[key], "a text")
    validate_identity(identity, f"'{name}'")
    if _meta_int(meta, "stages", name, default=-1) != identity.num_stages:
        raise SeFiError(f"'{name}': metadata says {meta.get('stages')} stages but the tensors hold "
                        f"{identity.num_stages}.")
    return identity


def _meta_damaged(name: str, key: str, value, expected: str) -> SeFiError:
    return SeFiError(f"'{name}': metadata '{key}' is {value!r}, expected {expected}. The file is damaged; save or "
                     f"download it again.")


def _meta_str(meta: dict, key: str, name: str) -> str:
    value = meta.get(key, "")
    if len(value) > 10_000:
        raise _meta_damaged(name, key, value[:40] + "...", "a short text")
    return value


def _meta_int(meta: dict, key: str, name: str, default: int) -> int:
    value = meta.get(key)
    if value is None or value == "":
        return default
    if not value.isdigit() or len(value) > 9:
        raise _meta_damaged(name, key, value, "a whole number >= 0")
    return int(value)


def _meta_json_object(meta: dict, key: str, name: str) -> dict:
    value = meta.get(key, "{}") or "{}"
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise _meta_damaged(name, key, value[:40], "a JSON object") from None
    if not isinstance(parsed, dict):
        raise _meta_damaged(name, key, value[:40], "a JSON object")
    return parsed


def safe_child_path(folder: str | os.PathLike, filename: str) -> Path:
    """`folder/filename`, refusing names that would escape `folder` (path traversal)."""
    folder = Path(folder).resolve()
    if not filename or filename != filename.strip() or "\x00" in filename:
        raise SeFiError(f"Invalid identity file name {filename!r}.")
    candidate = (folder / filename).resolve()
    if candidate.parent != folder and folder not in candidate.parents:
        raise SeFiError(f"Identity file name {filename!r} points outside the identities folder; "
                        f"use a plain file name.")
    return candidate
