"""Pictures of a learning run: the loss curve (an IMAGE output) and the live attention preview (progress bar)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .heatmap import colorize

WIDTH, HEIGHT, MARGIN = 768, 384, 48
SERIES = (("L_LDM", (76, 120, 168)), ("λ·L_attn", (84, 162, 75)), ("total", (228, 87, 86)))  # total drawn last
LEGEND_BOTTOM = MARGIN // 2 + 20  # the legend row ends here; below it only the curves
PREVIEW_SIDE = 512  # the live preview's side; also the max size handed to ComfyUI, which scales any picture to it


def loss_curve(history: list[dict], attn_lambda: float) -> torch.Tensor:
    """IMAGE (1, H, W, 3): total loss, L_LDM and λ·L_attn per step, on one linear axis from 0."""
    from PIL import Image, ImageDraw

    values = {"total": [r["loss"] for r in history], "L_LDM": [r["ldm"] for r in history],
              "λ·L_attn": [attn_lambda * r["attn"] for r in history]}
    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))
    top = max([max(v) for v in values.values() if v] + [1e-12])
    steps = [r["step"] for r in history]
    first, last = (steps[0], steps[-1]) if steps else (0, 1)

    def point(step: int, value: float) -> tuple[float, float]:
        fx = (step - first) / max(1, last - first)
        return x0 + fx * (x1 - x0), y1 - (value / top) * (y1 - y0)

    for i, (name, colour) in enumerate(SERIES):
        pts = [point(s, v) for s, v in zip(steps, values[name])]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
        lx = x0 + 8 + 130 * i
        draw.rectangle([lx, y0 + 8, lx + 14, y0 + 16], fill=colour)  # legend swatch
        draw.text((lx + 20, y0 + 6), name, fill=(60, 60, 60))
    draw.text((x0, y1 + 8), f"step {first}", fill=(80, 80, 80))
    draw.text((x1 - 70, y1 + 8), f"step {last}", fill=(80, 80, 80))
    draw.text((4, y0), f"{top:.3g}", fill=(80, 80, 80))
    draw.text((4, y1 - 10), "0", fill=(80, 80, 80))
    return torch.from_numpy(np.asarray(image).copy()).float().div(255).unsqueeze(0)


def attention_preview(reference: torch.Tensor, attention: torch.Tensor, size: int = PREVIEW_SIDE):
    """PIL image: the placeholder token's attention (H, W) over the (1,3,R,R) reference, the heat-map node's colours."""
    from PIL import Image

    heat = F.interpolate(attention[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    photo = F.interpolate(reference.float().cpu(), size=(size, size), mode="bilinear", align_corners=False)[0]
    mixed = (0.5 * photo.permute(1, 2, 0) + 0.5 * colorize(heat)).clamp(0, 1)
    return Image.fromarray((mixed * 255).round().to(torch.uint8).numpy())
