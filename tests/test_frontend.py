"""The pack as the ComfyUI frontend shows it (issue 33 items 3-5), against a real server and a headless Chromium:

- help pages: `web/docs/<NodeName>.md`, one per node, served at `/extensions/<pack folder>/docs/` (WEB_DIRECTORY) where
  the frontend's node help looks, and shown by the page's own "Node Info" help;
- the Vue node renderer ("Nodes 2.0", setting `Comfy.VueNodes.Enabled`): every node draws with its widgets and
  tooltips, template 1 loads and queues;
- the subgraph blueprint `subgraphs/Learn a face and use it.json`: listed by /global_subgraphs, loaded by the page as a
  node, and run from it.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import harness
import pytest
import requests
from harness import PACK_ROOT
from test_docs import github_anchors, links
from test_workflows import ARTIFACTS, WIDGET_TYPES, WORKFLOWS, _maker, _small_ui, object_info, upload_face, wait_for

pytestmark = pytest.mark.server
__all__ = ["object_info"]  # the fixture, shared with test_workflows

HELP = PACK_ROOT / "web" / "docs"
PACK_DIR = "ComfyUI-SeFi-IDE"  # the folder harness.comfy_server links the pack as: the frontend's <pack> in URLs
REPO = "https://github.com/sefi-ide/ComfyUI-SeFi-IDE/blob/main/"
BLUEPRINT = PACK_ROOT / "subgraphs" / "Learn a face and use it.json"
VUE_SETTING = "Comfy.VueNodes.Enabled"
PINIA = "const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;"


def ours(object_info: dict) -> dict[str, dict]:
    return {k: v for k, v in object_info.items() if v["python_module"] == f"custom_nodes.{PACK_DIR}"}


def section(text: str, heading: str) -> str:
    m = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    return m.group(1) if m else ""


def listed(text: str, heading: str) -> set[str]:
    """The names a section's list items start with: `- **a**, **b** (TYPE...): ...`."""
    items = re.findall(r"^- ((?:\*\*\w+\*\*(?:, )?)+)", section(text, heading), re.MULTILINE)
    return {name for item in items for name in re.findall(r"\*\*(\w+)\*\*", item)}


def host_name(server) -> str:
    stats = requests.get(f"{server['url']}/system_stats", timeout=30).json()["system"]
    return f"ComfyUI {stats.get('comfyui_version', '?')}"


def browser():
    b = harness.chromium()
    if b is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return b


def add_node(b, node_type: str, pos=(200, 260)) -> int:
    return b.execute_script("""const g = window.app.graph; g.clear();
        const n = window.LiteGraph.createNode(arguments[0]); n.pos = arguments[1]; g.add(n);
        window.app.canvas.ds.offset = [0, 0]; window.app.canvas.ds.scale = 0.8;
        window.app.canvas.selectNode(n); window.app.canvas.setDirty(true, true); return n.id;""", node_type, pos)


def poll(b, script: str, timeout: float = 20, *args):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = b.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.3)
    return None


# --- help pages ---------------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_every_node_has_a_help_page_naming_its_inputs_and_outputs(object_info):
    nodes = ours(object_info)
    assert nodes, "the pack's nodes are not in /object_info"
    assert sorted(p.stem for p in HELP.glob("*.md")) == sorted(nodes), "one page per node, named <NodeName>.md"
    for name, info in nodes.items():
        text = (HELP / f"{name}.md").read_text()
        title = info["display_name"].removesuffix(" (SeFi-IDE)")
        assert text.startswith(f"# {title}\n"), f"{name}.md: first line must be '# {title}'"
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        got = listed(text, "Inputs")
        assert got == set(inputs), f"{name}.md: Inputs lists {sorted(got)}, the node has {sorted(inputs)}"
        got = listed(text, "Outputs")
        assert got == set(info["output_name"]), f"{name}.md: Outputs lists {sorted(got)}"
        assert section(text, "What to expect").strip(), f"{name}.md: no 'What to expect'"


@pytest.mark.smoke
def test_help_page_links_work_in_the_frontend_and_on_github():
    """The frontend prefixes relative pictures with the help folder's URL but leaves links as they are (relative
    links would point into the ComfyUI page): pictures are relative and exist, links are absolute."""
    for page in sorted(HELP.glob("*.md")):
        text = page.read_text()
        for target in links(text):
            if re.search(r"!\[[^\]]*\]\(" + re.escape(target), text):
                assert not re.match(r"[a-z]+:|/", target) and (HELP / target).is_file(), f"{page.name}: {target}"
                continue
            assert target.startswith("https://"), f"{page.name}: {target} is relative: broken in the frontend"
            if target.startswith(REPO):  # this repository's docs: the file and heading exist
                path, _, anchor = target.removeprefix(REPO).partition("#")
                assert (PACK_ROOT / path).is_file(), f"{page.name}: {target}: no such file"
                assert not anchor or anchor in github_anchors((PACK_ROOT / path).read_text()), f"{page.name}: {target}"


@pytest.mark.smoke
def test_the_server_serves_each_help_page_where_the_frontend_looks(server, object_info):
    """The frontend's NodeHelpService asks /extensions/<pack>/docs/<NodeName>/<locale>.md, then
    /extensions/<pack>/docs/<NodeName>.md, <pack> from the node's python_module (custom_nodes.<folder>); an answer
    typed text/html counts as missing."""
    for name, info in ours(object_info).items():
        pack = info["python_module"].split(".")[1]
        r = requests.get(f"{server['url']}/extensions/{pack}/docs/{name}.md", timeout=30)
        assert r.ok and "text/html" not in r.headers.get("content-type", ""), f"{name}: {r.status_code}"
        assert r.content == (HELP / f"{name}.md").read_bytes()
    for picture in HELP.glob("*.jpg"):
        r = requests.get(f"{server['url']}/extensions/{PACK_DIR}/docs/{picture.name}", timeout=30)
        assert r.ok and r.content == picture.read_bytes(), picture.name


HELP_SHOWN = """const h = document.querySelector('.node-help-content h1');
if (!h || h.innerText.trim() !== arguments[0]) return null;
const box = h.closest('.node-help-content');
return {headings: [...box.querySelectorAll('h2')].map(e => e.innerText.trim()),
        images: [...box.querySelectorAll('img')].map(i => i.getAttribute('src'))};"""
PICTURES_LOADED = "return [...document.querySelectorAll('.node-help-content img')].every(i => i.complete && i.naturalWidth)"


@pytest.mark.smoke
def test_the_pages_node_info_shows_each_help_page(server, object_info):
    """Select the node, press the selection toolbox's "Node Info" (the newest frontend opens its side panel's Info
    tab, older ones the node library's help): the rendered page is ours, pictures loaded."""
    requests.post(f"{server['url']}/settings/Comfy.TutorialCompleted", json=True, timeout=30)
    b = browser()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        harness.open_comfyui_page(b, server["url"])
        for name, info in ours(object_info).items():
            title = info["display_name"].removesuffix(" (SeFi-IDE)")  # the first line of its page
            add_node(b, name)
            shown = None
            for _ in range(3):  # the button toggles a panel some frontends keep open between nodes
                buttons = poll(b, "return [...document.querySelectorAll(\"button[aria-label='Node Info']\")]"
                                  ".filter(e => e.offsetParent)", 10)
                assert buttons, f"{host_name(server)}: no 'Node Info' button in the selection toolbox"
                buttons[0].click()
                shown = poll(b, HELP_SHOWN, 6, title)
                if shown:
                    break
            assert shown, f"{name}: the node help did not show {title!r} ({host_name(server)})"
            assert {"Inputs", "Outputs", "What to expect"} <= set(shown["headings"]), shown
            pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (HELP / f"{name}.md").read_text())  # in order
            assert shown["images"] == [f"/extensions/{PACK_DIR}/docs/{p}" for p in pictures]
            assert poll(b, PICTURES_LOADED, 10), f"{name}: a picture did not load"
            if name == "LearnIDEmbedding":
                b.save_screenshot(str(ARTIFACTS / "help-LearnIDEmbedding.png"))
    finally:
        b.quit()
