"""CLIP token ids of the world's words, so captions tokenize without ComfyUI (tokens.json; a test compares it with
ComfyUI's own SD1 tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

from .attributes import PHRASES, SUBJECT_PROMPT
from .world import caption_words

TOKENS_PATH = Path(__file__).with_name("tokens.json")
START, END = 49406, 49407  # CLIP's start / end-of-text ids; SD1 pads with END
CONTEXT_LENGTH = 77


def vocabulary() -> list[str]:
    """Every word (and the comma) that a caption can contain, sorted."""
    words = set(caption_words(SUBJECT_PROMPT)) | {","}
    for phrases in PHRASES.values():
        for phrase in phrases.values():
            words |= set(caption_words(phrase))
    return sorted(words)


def write_token_ids(clip_vocab_json: Path, path: Path = TOKENS_PATH) -> None:
    """tokens.json from CLIP's BPE vocabulary (ComfyUI's comfy/sd1_tokenizer/vocab.json); fails on a word that is
    not one token."""
    vocab = json.loads(Path(clip_vocab_json).read_text())
    missing = [w for w in vocabulary() if f"{w}</w>" not in vocab]
    if missing:
        raise ValueError(f"not single CLIP tokens: {missing}")
    path.write_text(json.dumps({w: vocab[f"{w}</w>"] for w in vocabulary()}, indent=0) + "\n")


def load_token_ids(path: Path = TOKENS_PATH) -> dict[str, int]:
    return json.loads(path.read_text())


def tokenize(text: str, ids: dict[str, int] | None = None) -> list[int]:
    """The 77 token ids SD1's tokenizer gives a caption of world words: start, one id per word, end, end-padding."""
    ids = ids or load_token_ids()
    words = caption_words(text)
    if len(words) > CONTEXT_LENGTH - 2:
        raise ValueError(f"caption has {len(words)} tokens, more than {CONTEXT_LENGTH - 2}")
    body = [ids[w] for w in words]
    return [START, *body] + [END] * (CONTEXT_LENGTH - 1 - len(body))


def text_token_ids() -> list[int]:
    """The rows the text encoder trains: start, end, and every world word's id (sorted)."""
    return sorted({START, END, *load_token_ids().values()})
