"""Prompts with placeholders through ComfyUI's own CLIP, with identity vectors injected as rows.

ComfyUI's tokenizer accepts a tensor in place of a token id (that is how `embedding:NAME` works), so
the placeholder's row of E is replaced without a second copy of the text encoder. Each placeholder
is swapped for a rare single-token marker word before tokenizing, then the marker positions are
replaced by the vectors.
"""
from __future__ import annotations

import contextlib
import copy
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.errors import SeFiError
from ..core.identity import FAMILY_NAMES
from .grad_scope import frozen_pass, grad_pass

ENCODER_OF_KEY = {"l": "clip_l", "g": "clip_g"}
KEY_OF_ENCODER = {v: k for k, v in ENCODER_OF_KEY.items()}
_MARKERS = ("sks", "ohwx", "zwx", "xqz", "bxq", "pqv", "jkz", "vzq")
_BAD_PLACEHOLDER_CHARS = set("()[]{}:\\,")


def detect_family(clip, model=None) -> str:
    """'sd1' or 'sdxl' from the CLIP's encoders (and the UNet's context width when given)."""
    if clip is None:
        raise SeFiError("No CLIP connected. Connect the CLIP output of your checkpoint loader.")
    keys = set(clip.tokenize("a").keys())
    family = {frozenset({"l"}): "sd1", frozenset({"l", "g"}): "sdxl"}.get(frozenset(keys))
    context_dim = None
    if model is not None:
        context_dim = model.model.model_config.unet_config.get("context_dim")
    expected_dim = {"sd1": 768, "sdxl": 2048}
    if family is None or (context_dim is not None and context_dim != expected_dim[family]):
        raise SeFiError(
            f"Unsupported model: text encoders {sorted(keys)}, UNet context width {context_dim}. SeFi-IDE supports "
            f"{FAMILY_NAMES['sd1']} (CLIP-L, 768) and {FAMILY_NAMES['sdxl']} (CLIP-L + OpenCLIP-G, 2048) "
            f"checkpoints, including their fine-tunes."
        )
    return family


def check_placeholder(placeholder: str) -> str:
    p = placeholder.strip()
    if not p or any(c.isspace() for c in p) or _BAD_PLACEHOLDER_CHARS & set(p):
        raise SeFiError(f"Placeholder {placeholder!r} must be one word without spaces or any of ( ) [ ] {{ }} : , "
                        f"- for example <alice>.")
    return p


def _ids(tokens: dict, key: str) -> list[list]:
    return [[t[0] for t in chunk] for chunk in tokens[key]]


def word_token_id(clip, word: str) -> dict[str, int]:
    """Token id of `word` in each encoder's vocabulary; the word must be exactly one token."""
    empty = clip.tokenize("")
    tokens = clip.tokenize(word)
    out = {}
    for key in tokens:
        ids = _ids(tokens, key)[0]
        end = _ids(empty, key)[0][1]
        body = ids[1: ids.index(end, 1)] if end in ids[1:] else ids[1:]
        if len(body) != 1 or not isinstance(body[0], int):
            raise SeFiError(f"The word {word!r} is {len(body)} tokens for the text encoder; choose a word that is a "
                            f"single token (for example 'person', 'man', 'woman').")
        out[key] = body[0]
    return out


def word_embedding(clip, word: str) -> dict[str, torch.Tensor]:
    """The word-embedding row of a one-token `word`, per text encoder (float32, CPU)."""
    out = {}
    for key, token_id in word_token_id(clip, word).items():
        enc = ENCODER_OF_KEY[key]
        table = getattr(clip.cond_stage_model, enc).transformer.get_input_embeddings()
        out[enc] = table.weight[token_id].detach().float().cpu().clone()
    return out


_PLACEHOLDER_LIKE = re.compile(r"<[A-Za-z0-9_\-]+>")


def unwired_placeholders(text: str, placeholders: list[str]) -> list[str]:
    """Words like <name> in the prompt that no connected identity provides."""
    return sorted({m for m in _PLACEHOLDER_LIKE.findall(text) if m not in placeholders})


@dataclass
class MarkedPrompt:
    """A tokenized prompt with the token positions of each placeholder, per tokenizer key."""

    tokens: dict
    positions: dict[str, dict[str, list[tuple[int, int]]]]  # placeholder -> key -> [(chunk, index)]

    def num_tokens(self) -> int:
        return len(next(iter(self.tokens.values()))) * 77


def mark_prompt(clip, text: str, placeholders: list[str]) -> MarkedPrompt:
    """Tokenize `text`, recording where each placeholder is; every placeholder must occur."""
    unknown = unwired_placeholders(text, placeholders)
    if unknown:
        raise SeFiError(f"The prompt names {', '.join(unknown)} but no connected identity has that placeholder "
                        f"(connected: {', '.join(placeholders)}). Connect the identity or fix the spelling.")
    missing = [p for p in placeholders if p not in text]
    if missing:
        raise SeFiError(f"The prompt does not contain the placeholder(s) {', '.join(missing)}. Write them in the "
                        f"prompt where the person goes, e.g. 'a photo of {missing[0]} at the beach'.")
    markers: dict[str, str] = {}
    marker_ids: dict[str, dict[str, int]] = {}  # placeholder -> tokenizer key -> the marker's token id
    candidates = [m for m in _MARKERS if m not in text.lower()]
    for p in placeholders:
        while candidates:
            m = candidates.pop(0)
            try:
                marker_ids[p] = word_token_id(clip, m)
            except SeFiError:
                continue
            markers[p] = m
            break
        else:
            raise SeFiError("Too many placeholders in one prompt (at most 8).")
    marked_text = text
    for p in sorted(placeholders, key=len, reverse=True):  # longest first: '<ab>' before '<a>'
        marked_text = marked_text.replace(p, f" {markers[p]} ")
    tokens = clip.tokenize(marked_text)
    positions: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for p in placeholders:
        ids = marker_ids[p]
        positions[p] = {}
        for key, chunks in tokens.items():
            found = [(c, i) for c, chunk in enumerate(chunks) for i, t in enumerate(chunk) if t[0] == ids[key]]
            if len(found) != text.count(p):
                raise SeFiError(f"Could not locate placeholder {p} in the tokenized prompt; make sure it is a "
                                f"separate word (spaces around it).")
            positions[p][key] = found
    return MarkedPrompt(tokens, positions)


def inject(marked: MarkedPrompt, rows: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Tokens with each placeholder's positions replaced by its vector: rows[placeholder][encoder]."""
    tokens = copy.copy(marked.tokens)
    tokens = {key: [list(chunk) for chunk in chunks] for key, chunks in tokens.items()}
    for p, by_key in marked.positions.items():
        for key, places in by_key.items():
            vec = rows[p][ENCODER_OF_KEY[key]]
            for c, i in places:
                tokens[key][c][i] = (vec,) + tuple(tokens[key][c][i][1:])
    return tokens


def _clone_saved_activations(t: torch.Tensor) -> torch.Tensor:
    # ComfyUI's CLIP adds residuals in place (x += ...), which autograd rejects; saving a copy of each
    # activation at save time makes the backward pass valid without touching the host's code.
    return t.clone() if (t.requires_grad and t.grad_fn is not None) else t


def encode_variants(clip, variants: list[dict], every_pooled: bool = False,
                    output_device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode several token dicts of equal length in one text-encoder call; contexts (V, T, D) and the pooled
    output of the first (1, D), or with `every_pooled` of each variant (V, D). One variant is encoded exactly as
    CLIPTextEncode encodes a prompt. Differentiable w.r.t. injected vectors when gradients are enabled.
    `output_device`: where the outputs go (default: the host's intermediate device, as CLIPTextEncode's).
    """
    merged = {key: [chunk for v in variants for chunk in v[key]] for key in variants[0]}
    with (_pooled_rows(clip) if every_pooled else contextlib.nullcontext([])) as pooled_calls, \
            (host_outputs_on(output_device) if output_device is not None else contextlib.nullcontext()):
        if not torch.is_grad_enabled():
            cond, pooled = clip.encode_from_tokens(merged, return_pooled=True)
        else:
            with frozen_pass():  # before the swap, the host's way: the encode below finds the weights in place
                clip.load_model()
            with torch.autograd.graph.saved_tensors_hooks(_clone_saved_activations, lambda t: t):
                cond, pooled = grad_pass(clip.cond_stage_model,
                                         lambda: clip.encode_from_tokens(merged, return_pooled=True))
    if every_pooled:
        if len(pooled_calls) != 1 or pooled_calls[0] is None:
            raise SeFiError(f"Expected one pooled text-encoder output, got {len(pooled_calls)}.")
        sections = len(next(iter(merged.values()))) // len(variants)  # 77-token sections per variant
        pooled = pooled_calls[0][::sections][:len(variants)].to(pooled)  # each variant's first section
    return cond.reshape(len(variants), -1, cond.shape[-1]), pooled


@contextlib.contextmanager
def _pooled_rows(clip) -> Iterator[list[torch.Tensor]]:
    """The pooled output of EVERY section of the text-encoder call made inside. The host returns only the first
    section's; the sub-model it takes it from (SDXL: OpenCLIP-G) computes all of them, so a forward hook there
    reads them (the same tensors, in the autograd graph)."""
    model = clip.cond_stage_model
    source = getattr(model, "clip_g", None) or getattr(model, getattr(model, "clip", ""), None)
    if source is None:
        raise SeFiError(f"This text encoder ({type(model).__name__}) has no per-row pooled output to read.")
    calls: list[torch.Tensor] = []
    handle = source.register_forward_hook(lambda module, args, out: calls.append(out[1]))
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def host_outputs_on(device: torch.device) -> Iterator[None]:
    """The host's text encoder hands its outputs to `comfy.model_management.intermediate_device()`: the CPU unless
    ComfyUI runs with --gpu-only. In a training step that is a copy to the CPU and back that the host waits on,
    forward and backward, every step. Inside this block, and for this thread only, that device is `device`, so the
    outputs stay where the UNet runs. The host's function is put back on exit unless something replaced it
    meanwhile; ours then passes every call through."""
    import comfy.model_management

    host_device = comfy.model_management.intermediate_device
    thread = threading.get_ident()
    active = True

    def intermediate_device() -> torch.device:
        return device if active and threading.get_ident() == thread else host_device()

    comfy.model_management.intermediate_device = intermediate_device
    try:
        yield
    finally:
        active = False
        if comfy.model_management.intermediate_device is intermediate_device:
            comfy.model_management.intermediate_device = host_device
