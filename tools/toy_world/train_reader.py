"""Trains the reader on renders of trained identities and reports its per-attribute accuracy on held-out ones.

    OMP_NUM_THREADS=1 ~/.cache/sefi-ide/venv/bin/python -m tools.toy_world.train_reader [--steps N]

Writes tools/toy_world/reader.safetensors (fp16). Deterministic for a given seed and thread count.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import degrade
from .attributes import ATTRIBUTES
from .reader import HEADS, SUBJECT, WEIGHTS_PATH, Reader, ReaderNet, prepare
from .render import render
from .world import held_out_identities, scenes, trained_identities

TRAIN_SEED, VALIDATION_SEED = 1, 2
NO_SUBJECT = 0.2  # share of pictures without a head (world v2), as the checkpoint trains on


def render_set(seed: int, count: int, identities: list[tuple[str, ...]], no_subject: float = NO_SUBJECT
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Pictures (uint8 B x 3 x H x W), value indices per head, and per head whether the picture shows it (eye
    colour with open eyes only; without a subject only the scene and, if drawn, the object and its position)."""
    pictures, targets, shown = [], {a: [] for a in HEADS}, {a: [] for a in HEADS}
    for scene in scenes(seed, count, identities, no_subject=no_subject):
        pictures.append(render(scene).image)
        for a, values in ATTRIBUTES.items():
            targets[a].append(values.index(scene.values[a]))
            shown[a].append(a in scene.shown)
        targets[SUBJECT].append(int(scene.subject))
        shown[SUBJECT].append(True)
    images = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()
    return images, {a: torch.tensor(t) for a, t in targets.items()}, {a: torch.tensor(s) for a, s in shown.items()}


def loss_of(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], shown: dict[str, torch.Tensor]
            ) -> torch.Tensor:
    total = logits["face"].new_zeros(())
    for a in HEADS:  # nothing to learn from what a picture does not show (a closed eye's colour, an absent head)
        per_item = F.cross_entropy(logits[a], targets[a], reduction="none")
        total = total + (per_item * shown[a]).mean()
    return total


def train(steps: int, batch: int, count: int, seed: int = TRAIN_SEED, log: Callable[[str], None] = print) -> ReaderNet:
    torch.manual_seed(seed)
    images, targets, shown = render_set(seed, count, trained_identities())
    # augment at 64 px (4x cheaper than 128 px; the reader looks at 32 px anyway)
    images = F.avg_pool2d(images.float(), 2).round().to(torch.uint8)
    net = ReaderNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = degrade.random_degradation(images[idx].float() / 255, gen)
        loss = loss_of(net(prepare(x)), {a: t[idx] for a, t in targets.items()}, {a: s[idx] for a, s in shown.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return net


DEGRADATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "clean": lambda x, g: x,
    "vae 8x8 cells": lambda x, g: degrade.vae_roundtrip(x),
    "blur sigma 1.5": lambda x, g: degrade.blur(x, 1.5),
    "noise sigma 0.05": lambda x, g: degrade.add_noise(x, 0.05, g),
    "colour +-8 %": lambda x, g: degrade.colour_shift(x, 1 + 0.08 * (2 * torch.rand(len(x), 3, generator=g) - 1),
                                                        0.03 * (2 * torch.rand(len(x), 3, generator=g) - 1)),
    "offset 4 px": lambda x, g: degrade.shift(x, 4 * torch.sign(torch.rand(len(x), generator=g) - 0.5),
                                              4 * torch.sign(torch.rand(len(x), generator=g) - 0.5)),
    "all of them": lambda x, g: degrade.add_noise(degrade.blur(degrade.vae_roundtrip(degrade.shift(x, 3.0, -3.0)), 1.0),
                                                  0.05, g),
}


def evaluate(reader: Reader, count: int, seed: int = VALIDATION_SEED) -> dict[str, dict[str, float]]:
    """{degradation: {head: accuracy}} on renders of held-out identities (each head over the pictures that show it;
    `subject` over all: a head drawn or not)."""
    images, targets, shown = render_set(seed, count, held_out_identities())
    x = images.float() / 255
    out = {}
    for name, fn in DEGRADATIONS.items():
        probs = reader.probabilities(fn(x, torch.Generator().manual_seed(seed)))
        out[name] = {a: float((probs[a].argmax(-1) == targets[a])[shown[a]].float().mean()) for a in HEADS}
    return out


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    head = "| degradation | " + " | ".join(HEADS) + " | mean |"
    lines = [head, "|" + "---|" * (len(HEADS) + 2)]
    for name, row in results.items():
        cells = " | ".join(f"{100 * row[a]:.1f}" for a in HEADS)
        lines.append(f"| {name} | {cells} | {100 * np.mean(list(row.values())):.1f} |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--count", type=int, default=12000, help="renders of trained identities to train on")
    parser.add_argument("--validate", type=int, default=2000, help="renders of held-out identities to score")
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args()
    import safetensors.torch

    net = train(args.steps, args.batch, args.count)
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(args.out),
                                metadata={"format": "pt"})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    print(markdown_table(evaluate(Reader(args.out), args.validate)))


if __name__ == "__main__":
    main()
