"""Scenes from a seed, their captions, and the fixed split of identities into trained and held-out."""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .attributes import (
    ATTRIBUTES,
    CONTEXT_ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    NO_SUBJECT_PROMPT,
    OBJECT_ALONE,
    PHRASE_ORDER,
    PHRASES,
    SUBJECT_PROMPT,
    Jitter,
    Scene,
    identity_values,
)

SPLIT_PATH = Path(__file__).with_name("split.json")
SPLIT_SEED = 24  # the number; changing it changes split.json (a test checks they agree)
HELD_OUT_SHARE = 0.1


def all_identities() -> list[tuple[str, ...]]:
    """Every combination of identity values, in a fixed order (972 of them)."""
    return list(itertools.product(*IDENTITY_ATTRIBUTES.values()))


def make_split(seed: int = SPLIT_SEED, share: float = HELD_OUT_SHARE) -> dict[str, list[list[str]]]:
    """Held-out identities drawn at random, redrawn until every pair of their values also occurs among the trained
    identities (a held-out identity is a new combination of seen parts, never an unseen part)."""
    identities = all_identities()
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(identities))
        held = sorted(identities[i] for i in order[: round(share * len(identities))])
        held_set = set(held)
        trained = [i for i in identities if i not in held_set]
        seen_pairs = {(a, b, i[a], i[b]) for i in trained for a in range(len(i)) for b in range(a + 1, len(i))}
        if all((a, b, i[a], i[b]) in seen_pairs for i in held for a in range(len(i)) for b in range(a + 1, len(i))):
            return {"attributes": list(IDENTITY_ATTRIBUTES), "seed": seed, "held_out": [list(i) for i in held]}


def write_split(path: Path = SPLIT_PATH) -> None:
    split = make_split()
    rows = ",\n".join("  " + json.dumps(i) for i in split["held_out"])
    path.write_text(f'{{"attributes": {json.dumps(split["attributes"])}, "seed": {split["seed"]},\n'
                    f' "held_out": [\n{rows}\n]}}\n')


def held_out_identities(path: Path = SPLIT_PATH) -> list[tuple[str, ...]]:
    """The held-out identities as committed in split.json (never used to train the checkpoint or the reader)."""
    data = json.loads(path.read_text())
    if data["attributes"] != list(IDENTITY_ATTRIBUTES):
        raise ValueError(f"{path} was written for attributes {data['attributes']}; rewrite it with write_split()")
    return [tuple(i) for i in data["held_out"]]


def trained_identities(path: Path = SPLIT_PATH) -> list[tuple[str, ...]]:
    held = set(held_out_identities(path))
    return [i for i in all_identities() if i not in held]


def sample_jitter(rng: np.random.Generator) -> Jitter:
    return Jitter(dx=float(rng.uniform(-3, 3)), dy=float(rng.uniform(-3, 3)), scale=float(rng.uniform(0.96, 1.04)),
                  brightness=float(rng.uniform(0.92, 1.08)), hair_volume=float(rng.uniform(0.9, 1.1)))


def sample_scene(rng: np.random.Generator, identity: tuple[str, ...] | None = None,
                 context: dict[str, str] | None = None, subject: bool = True, has_object: bool = True) -> Scene:
    """A scene with the given identity / context values; anything not given is drawn uniformly from `rng`."""
    values = {a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()}
    if identity is not None:
        values.update(identity_values(identity))
    values.update(context or {})
    return Scene(values, sample_jitter(rng), subject=subject, has_object=has_object or subject)


def scenes(seed: int, count: int, identities: list[tuple[str, ...]] | None = None,
           no_subject: float = 0.0) -> Iterator[Scene]:
    """`count` scenes from `seed`; identities drawn from `identities` (default: all), contexts uniform. A share
    `no_subject` of them has no head (half of those an object alone, half just the scene). With no_subject 0 the
    scenes are those of world v1 for the same seed."""
    rng = np.random.default_rng(seed)
    pool = identities or all_identities()
    for _ in range(count):
        identity = pool[int(rng.integers(len(pool)))]
        if no_subject and rng.random() < no_subject:
            yield sample_scene(rng, identity, subject=False, has_object=bool(rng.random() < 0.5))
        else:
            yield sample_scene(rng, identity)


def all_contexts() -> list[dict[str, str]]:
    return [dict(zip(CONTEXT_ATTRIBUTES, c, strict=True)) for c in itertools.product(*CONTEXT_ATTRIBUTES.values())]


def caption(values: dict[str, str], subject: str = SUBJECT_PROMPT, omit: Iterable[str] = ()) -> str:
    """The caption of a scene's values in plain words, leaving out the attributes in `omit` (a prompt may name any
    subset). `subject` replaces the opening ("a photo of the face of <id>" for a learned identity)."""
    omit = set(omit)
    unknown = omit - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes to omit: {sorted(unknown)}")
    parts = [subject]
    for slot in PHRASE_ORDER:
        if slot == "hair":
            colour = values.get("hair_colour") if "hair_colour" not in omit else None
            style = values.get("hair_style") if "hair_style" not in omit else None
            if colour and style:
                parts.append(f"{style} {colour} hair")
            elif colour or style:
                parts.append(PHRASES["hair_colour"][colour] if colour else PHRASES["hair_style"][style])
        elif slot not in omit and slot in values:
            parts.append(PHRASES[slot][values[slot]])
    return ", ".join(parts)


def scene_caption(scene: Scene, omit: Iterable[str] = ()) -> str:
    """The caption of what `scene` shows: `caption` for a scene with a subject; without one "a photo of a ball, on the
    left, at night" (an object alone: object, position, scene) or "a photo, at night" (just the scene), never
    "face" or "person". Leaving out the object leaves out its position too ("a photo, at night")."""
    if scene.subject:
        return caption(scene.values, omit=omit)
    omit = set(omit)
    shown = [a for a in scene.shown if a not in omit and not (a == "position" and "object" in omit)]
    opening = NO_SUBJECT_PROMPT
    if "object" in shown:
        opening = f"{NO_SUBJECT_PROMPT} {OBJECT_ALONE[scene.values['object']]}"
    parts = [opening] + [PHRASES[a][scene.values[a]] for a in ("position", "scene") if a in shown]
    return ", ".join(parts)


def caption_words(text: str) -> list[str]:
    """The words and commas of a caption, as CLIP's tokenizer splits them (lower case, commas separate)."""
    return text.replace(",", " , ").split()
