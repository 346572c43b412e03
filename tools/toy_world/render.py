"""Draws a scene: a cartoon head at 128 x 128 pixels, plus a label map of what each pixel shows.

Why 128 px: the SD VAE downsamples by 8, so the diffusion model works on a 16 x 16 latent. At 64 px (8 x 8 latent)
the whole face would span about 4 latent cells and eyes, mouth and marks would fall below one cell; at 256 px the
UNet's cost per picture is 4x that of 128 px, too much to train on two CPU cores. So every attribute here is drawn
as a region of at least about one 8 x 8 cell: it must survive the VAE's 8 x 8 grid (see degrade.vae_roundtrip).

Shapes are tested per pixel on a 2x supersampled grid and averaged down (anti-aliased edges); the label map takes
the centre sample of each pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .attributes import Scene

SIZE = 128
SUPERSAMPLE = 2

# label map values: what a pixel shows (LABEL_SUBJECT: the subject, i.e. the head without worn/held objects)
LABELS = {"background": 0, "hair": 1, "skin": 2, "eye": 3, "mouth": 4, "mark": 5, "hat": 6, "scarf": 7, "ball": 8}
LABEL_SUBJECT = (LABELS["hair"], LABELS["skin"], LABELS["eye"], LABELS["mouth"], LABELS["mark"])

SKIN = {"pale": (245, 212, 186), "tan": (205, 150, 100), "dark": (115, 72, 48)}
HAIR = {"blonde": (250, 215, 60), "ginger": (215, 90, 25), "black": (28, 24, 24), "pink": (245, 120, 195)}
IRIS = {"blue": (35, 100, 235), "green": (30, 165, 60), "brown": (120, 62, 22)}
FRECKLE = (165, 85, 45)
EARRING = (235, 30, 60)
HAT = (95, 45, 160)
SCARF = (20, 150, 140)
BALL, BALL_SEAM = (250, 140, 25), (60, 30, 10)
MOUTH_SMILE, TEETH, MOUTH_OPEN, LINE = (185, 25, 45), (250, 250, 245), (45, 10, 20), (40, 25, 25)
WHITE, PUPIL = (250, 250, 250), (15, 15, 20)
# (top colour, bottom colour, share of the height that is top)
SCENES = {
    "beach": ((140, 205, 250), (225, 200, 150), 0.55),
    "forest": ((55, 125, 60), (30, 85, 40), 0.5),
    "snow": ((230, 236, 246), (250, 250, 252), 0.6),
    "night": ((30, 40, 110), (20, 28, 80), 0.5),
}
FACE_X = {"left": 38.0, "center": 64.0, "right": 90.0}
FACE_Y = 70.0
# face half-width, half-height and outline exponent (2: ellipse, larger: squarer)
FACE_SHAPE = {"round": (28.0, 30.0, 2.0), "oval": (21.0, 34.0, 2.0), "square": (29.0, 29.0, 6.0)}


@dataclass(frozen=True)
class Render:
    image: np.ndarray  # uint8, H x W x 3
    labels: np.ndarray  # uint8, H x W, values of LABELS

    @property
    def subject_mask(self) -> np.ndarray:
        """bool H x W: pixels of the subject's head (hair, skin, eyes, mouth, marks; not hat, scarf or ball)."""
        return np.isin(self.labels, LABEL_SUBJECT)


class _Canvas:
    def __init__(self, size: int) -> None:
        n = size * SUPERSAMPLE
        self.rgb = np.zeros((n, n, 3), np.float32)
        self.labels = np.zeros((n, n), np.uint8)
        # pixel-centre coordinates in 128-px units, whatever the output size
        ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
        self.y = (ys + 0.5) * (SIZE / n)
        self.x = (xs + 0.5) * (SIZE / n)

    def paint(self, where: np.ndarray, colour: tuple[float, float, float] | np.ndarray, label: int) -> None:
        self.rgb[where] = colour
        self.labels[where] = label

    def blob(self, cx: float, cy: float, a: float, b: float, power: float = 2.0) -> np.ndarray:
        """Inside a super-ellipse of half-axes a, b (power 2: ellipse)."""
        return np.abs((self.x - cx) / a) ** power + np.abs((self.y - cy) / b) ** power <= 1.0

    def box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return (self.x >= x0) & (self.x < x1) & (self.y >= y0) & (self.y < y1)


def _draw_head(c: _Canvas, v: dict[str, str], cx: float, cy: float, fa: float, fb: float, power: float,
               vol: float) -> None:
    """The subject: hair, face, mark, eyes and mouth around (cx, cy), face half-axes fa, fb."""
    hair, skin = HAIR[v["hair_colour"]], SKIN[v["skin"]]
    # hair behind the head
    style = v["hair_style"]
    if style == "short":
        behind = c.blob(cx, cy - 3, fa + 4 * vol, fb + 7 * vol, power) & (c.y < cy)
    elif style == "long":
        behind = c.blob(cx, cy - 3, fa + 9 * vol, fb + 8 * vol) & (c.y < cy)
        behind |= c.box(cx - fa - 9 * vol, cy - 4, cx + fa + 9 * vol, cy + fb + 6 * vol)
    else:  # afro: a big round volume
        behind = c.blob(cx, cy - 10, fa + 16 * vol, fb + 15 * vol)
    c.paint(behind, hair, LABELS["hair"])

    face = c.blob(cx, cy, fa, fb, power)
    c.paint(face, skin, LABELS["skin"])
    # fringe: the top of the face is hair
    c.paint(face & (c.y < cy - 0.55 * fb), hair, LABELS["hair"])

    mark = v["mark"]
    if mark == "beard":
        beard = (c.blob(cx, cy + 2, fa + 1, fb + 4, power) & (c.y > cy + 0.12 * fb)) & ~face | (face & (c.y > cy + 0.12 * fb))
        c.paint(beard, tuple(0.85 * np.array(hair)), LABELS["mark"])
    elif mark == "freckles":
        for side in (-1, 1):
            for fx, fy in ((0.30, 0.18), (0.48, 0.22), (0.62, 0.14), (0.40, 0.34), (0.56, 0.36)):
                c.paint(c.blob(cx + side * fx * fa, cy + fy * fb, 3.0, 3.0) & face, FRECKLE, LABELS["mark"])
    else:  # earrings hang at the sides of the face
        for side in (-1, 1):
            c.paint(c.blob(cx + side * (fa + 1.0), cy + 0.22 * fb, 4.5, 5.0), EARRING, LABELS["mark"])

    # eyes
    ex, ey = 0.42 * fa, cy - 0.14 * fb
    for side in (-1, 1):
        x = cx + side * ex
        if v["expression"] == "closed":
            c.paint(c.box(x - 6.5, ey - 0.5, x + 6.5, ey + 2.0), LINE, LABELS["eye"])
        else:
            c.paint(c.blob(x, ey, 7.0, 7.0), WHITE, LABELS["eye"])
            c.paint(c.blob(x, ey, 5.0, 5.0), IRIS[v["eyes"]], LABELS["eye"])
            c.paint(c.blob(x, ey, 1.8, 1.8), PUPIL, LABELS["eye"])

    # mouth
    my = cy + 0.45 * fb
    if v["expression"] == "smiling":
        grin = c.blob(cx, my - 2, 0.5 * fa, 9.0) & (c.y >= my - 2)
        c.paint(grin, MOUTH_SMILE, LABELS["mouth"])
        c.paint(grin & (c.y < my + 1.5), TEETH, LABELS["mouth"])
    elif v["expression"] == "surprised":
        c.paint(c.blob(cx, my, 6.0, 8.0), MOUTH_OPEN, LABELS["mouth"])
    else:
        c.paint(c.box(cx - 6, my - 1, cx + 6, my + 1.5), LINE, LABELS["mouth"])


def render(scene: Scene, size: int = SIZE) -> Render:
    """The picture of `scene` and its label map (deterministic: the same scene gives the same bytes)."""
    v, j = scene.values, scene.jitter
    c = _Canvas(size)
    top, bottom, share = SCENES[v["scene"]]
    c.paint(c.y < SIZE * share, np.clip(np.array(top) * j.brightness, 0, 255), LABELS["background"])
    c.paint(c.y >= SIZE * share, np.clip(np.array(bottom) * j.brightness, 0, 255), LABELS["background"])
    if v["scene"] == "night":  # a few stars: detail below the VAE's cell size, background all the same
        for sx, sy in ((12, 14), (30, 40), (100, 10), (118, 48), (80, 30), (8, 100), (122, 110)):
            c.paint(c.blob(sx, sy, 1.2, 1.2), (250, 245, 200), LABELS["background"])

    cx, cy = FACE_X[v["position"]] + j.dx, FACE_Y + j.dy
    fa, fb, power = FACE_SHAPE[v["face"]]
    fa, fb = fa * j.scale, fb * j.scale
    if scene.subject:
        _draw_head(c, v, cx, cy, fa, fb, power, j.hair_volume)

    # worn or held object (without a subject: the same object alone where the head would be, if any)
    obj = v["object"] if scene.has_object else None
    if obj == "hat":
        top_y = cy - fb
        c.paint(c.box(cx - fa - 10, top_y - 3, cx + fa + 10, top_y + 4), HAT, LABELS["hat"])
        c.paint(c.box(cx - 0.8 * fa, top_y - 27, cx + 0.8 * fa, top_y - 2), HAT, LABELS["hat"])
    elif obj == "scarf":
        band = c.blob(cx, cy + fb + 3, fa + 5, 7.5, 4.0)
        c.paint(band | c.box(cx + 0.2 * fa, cy + fb + 3, cx + 0.2 * fa + 9, cy + fb + 22), SCARF, LABELS["scarf"])
    elif obj == "ball":  # held towards the middle of the frame
        side = -1 if v["position"] == "right" else 1
        bx, by = cx + side * (fa + 15), cy + fb - 4
        ball = c.blob(bx, by, 11.0, 11.0)
        c.paint(ball, BALL, LABELS["ball"])
        c.paint(ball & ((np.abs(c.x - bx) < 0.9) | (np.abs(c.y - by) < 0.9)), BALL_SEAM, LABELS["ball"])

    n = size * SUPERSAMPLE
    image = c.rgb.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    labels = c.labels[SUPERSAMPLE // 2:n:SUPERSAMPLE, SUPERSAMPLE // 2:n:SUPERSAMPLE]
    return Render(np.clip(np.rint(image), 0, 255).astype(np.uint8), labels.copy())
