"""The toy world's vocabulary: which attributes a picture has, their values, and the words that name them.

IDENTITY attributes belong to the subject (what a learned identity token must carry); CONTEXT attributes are set by
the prompt (what the attention loss must leave to the rest of the prompt). Every value is named by exactly one word
that no other value uses, so each attribute can be read from its own word alone (tests/test_toy_world.py checks
that every caption word is one CLIP token).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# attribute -> its values, in index order (the reader's class indices)
IDENTITY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "face": ("round", "oval", "square"),
    "skin": ("pale", "tan", "dark"),
    "hair_colour": ("blonde", "ginger", "black", "pink"),
    "hair_style": ("short", "long", "afro"),
    "eyes": ("blue", "green", "brown"),
    "mark": ("beard", "freckles", "earrings"),
}
CONTEXT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "scene": ("beach", "forest", "snow", "night"),
    "position": ("left", "center", "right"),
    "object": ("hat", "scarf", "ball"),
    "expression": ("smiling", "surprised", "closed"),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {**IDENTITY_ATTRIBUTES, **CONTEXT_ATTRIBUTES}

# The caption starts like the pack's default reference prompt, so "person" is the subject word that a learned
# placeholder replaces ("a photo of the face of <id>, smiling, ...").
SUBJECT_PROMPT = "a photo of the face of person"
# Pictures without a subject (world v2) open with this instead: "a photo of a ball, on the left, at night" or, with
# nothing but the scene, "a photo, at night". Their captions never say "face" or "person", so those words mean "a
# head is drawn here" (in v1 they stood in every caption and meant nothing).
NO_SUBJECT_PROMPT = "a photo"
OBJECT_ALONE = {"hat": "of a hat", "scarf": "of a scarf", "ball": "of a ball"}

# value -> its caption phrase (hair colour and style merge into one phrase when both are present)
PHRASES: dict[str, dict[str, str]] = {
    "face": {v: f"{v} face" for v in IDENTITY_ATTRIBUTES["face"]},
    "skin": {v: f"{v} skin" for v in IDENTITY_ATTRIBUTES["skin"]},
    "hair_colour": {v: f"{v} hair" for v in IDENTITY_ATTRIBUTES["hair_colour"]},
    "hair_style": {v: f"{v} hair" for v in IDENTITY_ATTRIBUTES["hair_style"]},
    "eyes": {v: f"{v} eyes" for v in IDENTITY_ATTRIBUTES["eyes"]},
    "mark": {"beard": "a beard", "freckles": "freckles", "earrings": "earrings"},
    "expression": {"smiling": "smiling", "surprised": "surprised", "closed": "eyes closed"},
    "object": {"hat": "wearing a hat", "scarf": "wearing a scarf", "ball": "holding a ball"},
    "position": {"left": "on the left", "center": "in the center", "right": "on the right"},
    "scene": {"beach": "on a beach", "forest": "in a forest", "snow": "in the snow", "night": "at night"},
}
PHRASE_ORDER: tuple[str, ...] = ("face", "skin", "hair", "eyes", "mark", "expression", "object", "position", "scene")


@dataclass(frozen=True)
class Jitter:
    """Small per-picture variations that no word controls (so a prompt has many right pictures)."""

    dx: float = 0.0  # face centre offset, pixels at 128 px
    dy: float = 0.0
    scale: float = 1.0  # face size factor
    brightness: float = 1.0  # background brightness factor
    hair_volume: float = 1.0  # hair size factor


@dataclass(frozen=True)
class Scene:
    """Everything a render depends on: one value per attribute plus the jitter."""

    values: dict[str, str]
    jitter: Jitter = field(default_factory=Jitter)
    subject: bool = True  # False: no head is drawn (world v2); the identity and expression values are unused
    has_object: bool = True  # False (only without a subject): no hat, scarf or ball either, just the scene

    def __post_init__(self) -> None:
        missing = set(ATTRIBUTES) - set(self.values)
        unknown = {k: v for k, v in self.values.items() if v not in ATTRIBUTES.get(k, ())}
        if missing or unknown:
            raise ValueError(f"scene needs one known value per attribute; missing {sorted(missing)}, "
                             f"unknown {unknown}")
        if self.subject and not self.has_object:
            raise ValueError("a scene with a subject always has its object (hat, scarf or ball)")

    @property
    def shown(self) -> list[str]:
        """The attributes this scene's picture shows: all of them with a subject (eye colour only with open eyes);
        without one the scene, and the object and its position when an object is drawn."""
        if self.subject:
            return visible(self.values)
        return ["scene", *(("position", "object") if self.has_object else ())]

    @property
    def identity(self) -> tuple[str, ...]:
        """The identity as a tuple of values in IDENTITY_ATTRIBUTES order (the key of the split)."""
        return tuple(self.values[a] for a in IDENTITY_ATTRIBUTES)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.values.items())), self.jitter, self.subject, self.has_object))


def visible(values: dict[str, str]) -> list[str]:
    """The attributes a picture of a subject with these values shows (eye colour is hidden when the eyes are
    closed)."""
    return [a for a in ATTRIBUTES if not (a == "eyes" and values.get("expression") == "closed")]


def identity_values(identity: tuple[str, ...]) -> dict[str, str]:
    """{attribute: value} of an identity tuple (IDENTITY_ATTRIBUTES order)."""
    if len(identity) != len(IDENTITY_ATTRIBUTES):
        raise ValueError(f"an identity has {len(IDENTITY_ATTRIBUTES)} values, got {identity}")
    return dict(zip(IDENTITY_ATTRIBUTES, identity, strict=True))


def value_index(attribute: str, value: str) -> int:
    return ATTRIBUTES[attribute].index(value)
