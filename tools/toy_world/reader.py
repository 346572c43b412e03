"""The reader: which value of every attribute a picture shows (the ground truth for generated pictures).

A small CNN with one classification head per attribute, trained (train_reader.py) only on renders of TRAINED
identities, under the degradations of degrade.py, and validated on held-out identities. It looks at a 32 x 32
version of the picture: every attribute is drawn at the toy VAE's 8 x 8 cell scale, so finer detail carries nothing
the reader needs, and a coarse input reads crisp renders and the VAE's blocky pictures alike.

Eye colour cannot be seen when the eyes are closed; `visible` says which attributes a scene shows, and scores count
only those. A picture may show no subject at all (world v2): the `subject` head says whether a head is drawn, and
`read` reports it beside the attribute values (which mean nothing for a picture without a head).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attributes import ATTRIBUTES, visible  # visible: re-exported for the reader's users
from .render import SIZE

WEIGHTS_PATH = Path(__file__).with_name("reader.safetensors")
INPUT_SIZE = 32
SUBJECT = "subject"  # the extra head: is a head drawn at all
PRESENCE = ("absent", "present")
HEADS: dict[str, tuple[str, ...]] = {**ATTRIBUTES, SUBJECT: PRESENCE}


class ReaderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        widths = [3, 32, 48, 64, 96, 64]
        strides = [1, 2, 1, 2, 2]  # 32 -> 32 -> 16 -> 16 -> 8 -> 4
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for i, o, s in zip(widths, widths[1:], strides))
        self.hidden = nn.Linear(64 * 4 * 4, 128)
        self.heads = nn.ModuleDict({a: nn.Linear(128, len(v)) for a, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        x = F.relu(self.hidden(x.flatten(1)))
        return {a: head(x) for a, head in self.heads.items()}


def to_batch(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """B x 3 x 128 x 128 floats in [0, 1] from uint8 or float pictures, channels last (B x H x W x 3, ComfyUI's
    IMAGE layout) or first; other sizes are resized (area average) to 128."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x[None]
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="area" if x.shape[-1] > SIZE else "bilinear")
    return x


def prepare(batch: torch.Tensor) -> torch.Tensor:
    """The network's input: the 128 px batch area-averaged to 32 px, centred."""
    return (F.adaptive_avg_pool2d(batch, INPUT_SIZE) - 0.5) / 0.25


class Reader:
    """Loads the committed weights; `read` returns each picture's attribute values."""

    def __init__(self, path: Path = WEIGHTS_PATH) -> None:
        import safetensors.torch

        self.net = ReaderNet()
        self.net.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()})
        self.net.eval()

    @torch.no_grad()
    def probabilities(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """{attribute or 'subject': B x values} softmax probabilities."""
        x = to_batch(images)
        parts = [self.net(prepare(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
        return {a: torch.cat([p[a] for p in parts]).softmax(-1) for a in HEADS}

    def read(self, images: np.ndarray | torch.Tensor) -> list[dict[str, str]]:
        """Each picture's value per attribute, and `subject`: 'present' or 'absent' (no head drawn: its identity and
        expression values are then guesses, see `subject_present`)."""
        probs = self.probabilities(images)
        n = next(iter(probs.values())).shape[0]
        return [{a: HEADS[a][int(probs[a][i].argmax())] for a in HEADS} for i in range(n)]


def subject_present(read: dict[str, str]) -> bool:
    return read[SUBJECT] == "present"


def agreement(read: dict[str, str], truth: dict[str, str], attributes: list[str] | None = None) -> float:
    """Share of `attributes` (default: all that `truth` shows and names) read as in `truth`."""
    names = [a for a in (attributes or visible(truth)) if a in truth and a in visible(truth)]
    return sum(read[a] == truth[a] for a in names) / len(names) if names else float("nan")
