"""Where each caption word should look: world v2's grounding term (train.py --ground).

SD's words attend where their thing is drawn ("blue" on the eyes, "beach" on the background; Prompt-to-Prompt and
DAAM read this off SD's cross-attention maps). The toy UNet trained on the denoising loss alone did not get there in
6600 steps: its heads spread over the caption (each attribute word drew 0.02-0.08 of the head region's attention,
uniform is 0.013), read a summary from the padding columns, and learned the big regions (skin, hair colour, scene) but
not the small or placed ones (eyes, mark, expression and position near chance). The grounding term gives every word
of a training caption its region from the render's label map and rewards attention inside it over attention outside
(FastComposer's balanced localisation loss, arXiv 2305.10431, here for every word, not only the subject's).
"""
from __future__ import annotations

import numpy as np
import torch

from .attributes import SUBJECT_PROMPT, Scene
from .render import LABEL_SUBJECT, LABELS, render
from .tokens import load_token_ids

CELLS = 16  # the latent grid: 128 px / 8
_OBJECTS = (LABELS["hat"], LABELS["scarf"], LABELS["ball"])
# attribute -> the labels its value word should look at
REGIONS: dict[str, tuple[int, ...]] = {
    "face": LABEL_SUBJECT,
    "skin": (LABELS["skin"],),
    "hair_colour": (LABELS["hair"],),
    "hair_style": (LABELS["hair"],),
    "eyes": (LABELS["eye"],),
    "mark": (LABELS["mark"],),
    "expression": (LABELS["mouth"], LABELS["eye"]),
    "object": _OBJECTS,
    "position": LABEL_SUBJECT + _OBJECTS,  # the figure: where the head and its object are
    "scene": (LABELS["background"],),
}
SUBJECT_WORDS = ("face", "person")  # the opening's words (SUBJECT_PROMPT): the whole head


def label_cells(labels: np.ndarray) -> torch.Tensor:
    """uint8 (labels x 256): how many of each latent cell's 64 pixels show each label (128 x 128 label map)."""
    side = labels.shape[0] // CELLS
    onehot = labels[..., None] == np.arange(len(LABELS), dtype=labels.dtype)
    counts = onehot.reshape(CELLS, side, CELLS, side, len(LABELS)).sum((1, 3))
    return torch.from_numpy(counts.reshape(CELLS * CELLS, len(LABELS)).T.astype(np.uint8).copy())


def scene_cells(scene: Scene, memo: dict[int, torch.Tensor], key: int) -> torch.Tensor:
    """label_cells of the scene's render, memoised under `key` (a training run's data index)."""
    if key not in memo:
        memo[key] = label_cells(render(scene).labels)
    return memo[key]


def region_cover(cells: torch.Tensor, labels: tuple[int, ...]) -> torch.Tensor:
    """(256,) the share 0..1 of each latent cell that shows any of `labels` (cells: label_cells' counts)."""
    pixels_per_cell = int(cells.sum(0)[0])
    return cells[list(labels)].sum(0).float() / pixels_per_cell


def grounded_words(tokens: list[int], scene: Scene, cells: torch.Tensor,
                   ids: dict[str, int] | None = None, attributes: bool = True) -> list[tuple[int, torch.Tensor]]:
    """(token column, cell coverage 0..1 of its region) for each word of the caption `tokens` that names something
    the picture shows and covers at least part of a cell; with `attributes` False only the subject words.
    `ids`: load_token_ids(), read once by a training loop."""
    ids = ids or load_token_ids()
    out = []
    opening = tokens[1:1 + len(SUBJECT_PROMPT.split())]
    if scene.subject and opening == [ids[w] for w in SUBJECT_PROMPT.split()]:
        region = region_cover(cells, LABEL_SUBJECT)
        out += [(1 + SUBJECT_PROMPT.split().index(w), region) for w in SUBJECT_WORDS]
    for attribute in scene.shown if attributes else ():
        word = ids[scene.values[attribute]]
        if word not in tokens:
            continue
        region = region_cover(cells, REGIONS[attribute])
        if region.sum() > 0:
            out.append((tokens.index(word), region))
    return out


def grounding_loss(maps: list[torch.Tensor], words: list[list[tuple[int, torch.Tensor]]]) -> torch.Tensor:
    """FastComposer's balanced term: mean attention outside the region minus mean attention inside it, for each
    grounded word of each caption (`words[n]` for batch row n), over every layer and head; -1 at best, 0 for a map
    that ignores the region."""
    rows = [(n, col, region) for n, ws in enumerate(words) for col, region in ws]
    if not rows:
        return maps[0].new_zeros(())
    n = torch.tensor([r[0] for r in rows])
    col = torch.tensor([r[1] for r in rows])
    region = torch.stack([r[2] for r in rows])  # R x 256
    terms = []
    for probs in maps:  # B x heads x 256 x 77
        p = probs[n, :, :, col]  # R x heads x 256
        inside = (p * region[:, None]).sum(-1) / region.sum(-1)[:, None]
        outside = (p * (1 - region[:, None])).sum(-1) / (1 - region).sum(-1).clamp_min(1e-6)[:, None]
        terms.append((outside - inside).mean())
    return torch.stack(terms).mean()
