"""Writes docs/icon.png, the pack's icon for the ComfyUI registry: a head whose outline is drawn in the five stage
colours (the per-stage identity tokens).

    ~/.cache/sefi-ide/venv/bin/python tools/make_icon.py
"""
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
STAGE_COLOURS = ["#4C78A8", "#54A24B", "#EECA3B", "#F58518", "#E45756"]


def main() -> None:
    image = Image.new("RGBA", (SIZE, SIZE), (24, 26, 32, 255))
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(STAGE_COLOURS):  # five nested outlines: one per stage
        inset = 28 + i * 10
        draw.ellipse([inset + 14, inset - 6, SIZE - inset - 14, SIZE - inset + 10], outline=colour, width=7)
    draw.rounded_rectangle([78, 196, 178, 240], radius=20, fill="#E8E8E8")  # shoulders
    draw.ellipse([96, 88, 160, 160], fill="#E8E8E8")  # face
    out = Path(__file__).resolve().parents[1] / "docs" / "icon.png"
    image.save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
