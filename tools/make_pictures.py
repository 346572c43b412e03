"""Pictures from the real ComfyUI page: each template's card picture (`example_workflows/<name>.jpg`, 400x400,
what ComfyUI's template browser shows for an extension's template) and the pictures of the README and
docs/nodes.md (`docs/*.png`).

    ~/.cache/sefi-ide/venv/bin/python tools/make_pictures.py

Starts the pinned test ComfyUI with this pack (tests/harness.py), opens its page in headless Chromium, loads each
workflow at a readable zoom in an area of the canvas that no menu covers, and crops the screenshot to the nodes.
The Load Image nodes show ComfyUI's own input/example.png (the workflows' default image). Needs chromium and
chromedriver (`.ci/setup_env.sh` installs them).
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))
import harness
import make_workflows

WORKFLOWS = ROOT / "example_workflows"
DOCS = ROOT / "docs"
THUMBNAIL = 400  # the template browser's cards are square; ComfyUI's own templates use 400 px
SCALE = 0.85  # canvas zoom of the pictures: LiteGraph draws node text only above ~0.6
LEFT, TOP, MARGIN = 90, 160, 24  # place the graph right of the side bar and below the menus
NOTE_COLUMN = make_workflows.COL  # every workflow's first column holds its note: not on the card
CARD_SOURCE = 760  # at most this many pixels of the picture go into a card (still readable at 400)
README_PICTURES = {make_workflows.QUICK_START: "workflow.png", make_workflows.LEARN_SD1: "workflow-learn.png"}
PAGE_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                 "Comfy.Graph.CanvasMenu": False}

BOUNDS = """const nodes = window.app.graph._nodes, title = window.LiteGraph.NODE_TITLE_HEIGHT;
const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - title));
const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
"""  # the nodes' bounding box in graph units, title bars included
NODE_EXTENT = BOUNDS + "return [x1 - x0, y1 - y0];"
PLACE = BOUNDS + """const [scale, left, top] = arguments;
const ds = window.app.canvas.ds;
ds.scale = scale;
ds.offset = [left / scale - x0, top / scale - y0];
window.app.canvas.setDirty(true, true);
const rect = window.app.canvas.canvas.getBoundingClientRect();
return [rect.left + left, rect.top + top, rect.left + left + (x1 - x0) * scale, rect.top + top + (y1 - y0) * scale];"""


def picture(browser, graph: dict):
    """The graph as the page draws it, cropped to its nodes (PIL image, CSS pixels)."""
    from PIL import Image

    if browser.execute_async_script(harness.LOAD_GRAPH, graph) != "ok":
        raise RuntimeError("the page refused the workflow")
    width, height = browser.execute_script(NODE_EXTENT)
    # the viewport must hold the whole graph at SCALE beside the menus: resize the window, then load again
    browser.set_window_size(int(width * SCALE + LEFT + 2 * MARGIN + 60), int(height * SCALE + TOP + 2 * MARGIN + 200))
    time.sleep(1)
    browser.execute_async_script(harness.LOAD_GRAPH, graph)
    time.sleep(1)
    box = browser.execute_script(PLACE, SCALE, LEFT, TOP)
    time.sleep(1.5)  # the canvas and the DOM widgets (text boxes) follow on the next frames
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    css_size = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    if shot.width != css_size[0]:  # a high-density screen: work in CSS pixels
        shot = shot.resize(css_size, Image.Resampling.LANCZOS)
    x0, y0, x1, y1 = (round(v) for v in box)
    return shot.crop((max(0, x0 - MARGIN), max(0, y0 - MARGIN), min(shot.width, x1 + MARGIN),
                      min(shot.height, y1 + MARGIN)))


def thumbnail(image):
    """A 400x400 card: the top of the graph right of its note column (the photo and the pack's nodes), square."""
    from PIL import Image

    skip = round(NOTE_COLUMN * SCALE)
    side = min(image.height, image.width - skip, CARD_SOURCE)
    return image.crop((skip, 0, skip + side, side)).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)


def main() -> None:
    import requests

    host = harness.find_comfyui()
    base = Path(tempfile.mkdtemp(prefix="sefi-pictures-"))
    (base / "input").mkdir()
    shutil.copy(host / "input" / "example.png", base / "input" / "example.png")
    browser = harness.chromium()
    if browser is None:
        raise SystemExit("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    try:
        with harness.comfy_server(host, base, {}) as server:
            for key, value in PAGE_SETTINGS.items():
                requests.post(f"{server['url']}/settings/{key}", json=value, timeout=30).raise_for_status()
            harness.open_comfyui_page(browser, server["url"])
            for path in sorted(WORKFLOWS.glob("*.json")):
                image = picture(browser, json.loads(path.read_text()))
                thumbnail(image).save(path.with_suffix(".jpg"), quality=88, optimize=True)
                print("wrote", path.with_suffix(".jpg").name, image.size)
                if path.stem in README_PICTURES:
                    image.save(DOCS / README_PICTURES[path.stem], optimize=True)
                    print("wrote", README_PICTURES[path.stem])
    finally:
        browser.quit()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
