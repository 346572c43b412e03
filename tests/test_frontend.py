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


def frontend_name(server, b) -> str:
    """'ComfyUI 0.3.75 (frontend 1.32.9)': the host and the frontend version the page reports."""
    return f"{host_name(server)} (frontend {b.execute_script('return window.__COMFYUI_FRONTEND_VERSION__') or '?'})"


def browser():
    b = harness.chromium()
    if b is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return b


def add_node(b, node_type: str, pos=(200, 260)) -> int:
    """The node alone on the canvas, selected; ids are never reused (the Vue renderer keys its nodes by id)."""
    return b.execute_script("""const g = window.app.graph; for (const n of [...g._nodes]) g.remove(n);
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
INFO_BUTTON = "return [...document.querySelectorAll(\"button[data-testid='info-button']\")].filter(e => e.offsetParent)"
LIBRARY_HELP = PINIA + """
if (pinia._s.get('sidebarTab').activeSidebarTabId !== 'node-library')
  window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
const help = pinia._s.get('nodeHelp');
if (help) help.openHelp(pinia._s.get('nodeDef').nodeDefsByName[arguments[0]]);"""
PICTURES_LOADED = "return [...document.querySelectorAll('.node-help-content img')].every(i => i.complete && i.naturalWidth)"


@pytest.mark.smoke
def test_the_pages_node_info_shows_each_help_page(server, object_info):
    """Select the node, press the selection toolbox's "Node Info" (the newest frontend opens its side panel's Info
    tab, 1.32 the node library's help; 1.25 has no such button: its node library's help store is opened as the
    library's own help button does): the rendered page is ours, pictures loaded."""
    requests.post(f"{server['url']}/settings/Comfy.TutorialCompleted", json=True, timeout=30)
    b = browser()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        harness.open_comfyui_page(b, server["url"])
        for name, info in ours(object_info).items():
            title = info["display_name"].removesuffix(" (SeFi-IDE)")  # the first line of its page
            add_node(b, name, pos=(650, 300))  # right of the node library (1.32 shows the help in it, over the canvas)
            shown = None
            for _ in range(3):  # the button toggles a panel some frontends keep open between nodes
                buttons = poll(b, INFO_BUTTON, 5)
                if buttons:
                    buttons[0].click()
                else:  # frontend 1.25 (ComfyUI 0.3.52): no Node Info button; its node library's help instead
                    b.execute_script(LIBRARY_HELP, name)
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


# --- the Vue node renderer ----------------------------------------------------------------------------------------
WIDGET_NAME = """const widgetName = w => (w.querySelector('[data-testid="widget-layout-field-label"], label')?.innerText || '').trim();
"""
VUE_NODE = WIDGET_NAME + """const el = document.querySelector(`[data-node-id="${arguments[0]}"]`);
if (!el) return null;
const widgetsBox = el.querySelector('[data-testid="node-widgets"]');
return {title: el.querySelector('[data-testid="node-title"]')?.innerText.trim(),
        widgets: [...el.querySelectorAll('[data-testid="node-widget"]')].map(widgetName),
        slots: [...el.querySelectorAll('[data-pd-tooltip]')].filter(e => !widgetsBox?.contains(e)
                 && e.querySelector('[data-testid="slot-connection-dot"]')).map(e => e.innerText.trim())};"""
HOVER_TARGET = WIDGET_NAME + """const [id, name, kind] = arguments;
const el = document.querySelector(`[data-node-id="${id}"]`);
const widgetsBox = el.querySelector('[data-testid="node-widgets"]');
if (kind === 'widget') {
  const w = [...el.querySelectorAll('[data-testid="node-widget"]')].find(w => widgetName(w) === name);
  return w && [...w.querySelectorAll('[data-pd-tooltip]')].find(e => !e.querySelector('[data-testid="slot-connection-dot"]'));
}
const slots = [...el.querySelectorAll('[data-pd-tooltip]')].filter(e => !widgetsBox?.contains(e)
  && e.querySelector('[data-testid="slot-connection-dot"]') && e.innerText.trim() === name);
return kind === 'output' ? slots.at(-1) : slots[0];  // the outputs follow the inputs (model in, model out)"""
INTO_VIEW = """const r = arguments[0].getBoundingClientRect(), ds = window.app.canvas.ds;
if (r.top > 120 && r.bottom < window.innerHeight - 40) return false;
ds.offset[1] -= (r.top - window.innerHeight / 2) / ds.scale; window.app.canvas.setDirty(true, true); return true;"""
TOOLTIP_IS = "return [...document.querySelectorAll('.p-tooltip')].some(e => e.innerText.trim().startsWith(arguments[0]))"
TOOLTIP = "return [...document.querySelectorAll('.p-tooltip')].map(e => e.innerText.trim()).filter(t => t).join(' ')"


def is_widget(spec: list) -> bool:
    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")


@pytest.fixture
def vue_page(server):
    """A Chromium page with the Vue node renderer on; the setting is put back for the session's other tests."""
    url = server["url"]
    requests.post(f"{url}/settings/Comfy.TutorialCompleted", json=True, timeout=30)
    requests.post(f"{url}/settings/{VUE_SETTING}", json=True, timeout=30)
    b = browser()
    try:
        harness.open_comfyui_page(b, url)
        registered = b.execute_script(PINIA + f"return !!pinia._s.get('setting').settingsById['{VUE_SETTING}'];")
        if not registered:
            pytest.skip(f"{host_name(server)}: its frontend has no '{VUE_SETTING}' setting (the Vue node renderer "
                        "arrived in frontend 1.27)")
        yield b
    finally:
        b.quit()
        requests.post(f"{url}/settings/{VUE_SETTING}", json=False, timeout=30)


def test_vue_renderer_draws_every_node_with_its_widgets_and_tooltips(server, object_info, vue_page):
    from selenium.webdriver.common.action_chains import ActionChains

    b = vue_page
    canvas = b.find_element("css selector", "#graph-canvas")
    # The test reads the data-testid markers of frontend 1.45+'s Vue nodes (node-widget, slot-connection-dot, ...);
    # a core node tells whether this frontend draws them (1.32 and 1.41 draw Vue nodes without them)
    core = add_node(b, "KSampler", pos=(150, 160))
    assert poll(b, "return document.querySelector(`[data-node-id=\"${arguments[0]}\"]`)", 20, core), \
        f"KSampler: no Vue node element ({frontend_name(server, b)})"
    if not poll(b, "return document.querySelector(`[data-node-id=\"${arguments[0]}\"] [data-testid=\"node-widget\"]`)",
                5, core):
        pytest.skip(f"{frontend_name(server, b)}: its Vue node renderer draws widgets and slots without the "
                    "data-testid markers this test reads (frontend 1.45+; a core KSampler has none either)")
    for name, info in ours(object_info).items():
        node_id = add_node(b, name, pos=(150, 160))
        drawn = poll(b, VUE_NODE, 20, node_id)
        assert drawn, f"{name}: no Vue node element ({host_name(server)})"
        assert drawn["title"] == info["display_name"]
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        widgets = [n for n in info["input_order"]["required"] + info["input_order"].get("optional", [])
                   if is_widget(inputs[n])]
        assert drawn["widgets"] == widgets, f"{name}: widgets drawn {drawn['widgets']}"
        sockets = [n for n in inputs if n not in widgets] + info["output_name"]
        assert sorted(drawn["slots"]) == sorted(sockets), f"{name}: slots drawn {drawn['slots']}"
        hovers = [(n, "widget" if n in widgets else "input", inputs[n][1]["tooltip"]) for n in inputs]
        hovers += [(n, "output", tip) for n, tip in zip(info["output_name"], info.get("output_tooltips", []))]
        for label, kind, expected in hovers:
            target = b.execute_script(HOVER_TARGET, node_id, label, kind)
            assert target, f"{name}: no {kind} '{label}' drawn"
            if b.execute_script(INTO_VIEW, target):
                time.sleep(0.5)  # the canvas moved: the Vue nodes follow on the next frame
            ActionChains(b).move_to_element(target).perform()
            shown = poll(b, TOOLTIP_IS, 5, expected)
            assert shown, f"{name}.{label}: tooltip {b.execute_script(TOOLTIP)!r}, not {expected!r}"
            ActionChains(b).move_to_element_with_offset(canvas, -100, 100).perform()  # empty canvas: the tooltip goes
            assert poll(b, "return !document.querySelector('.p-tooltip')", 5), f"{name}.{label}: tooltip stays"
    b.save_screenshot(str(ARTIFACTS / "vue-node.png"))


def test_vue_renderer_loads_and_queues_template_1(server, object_info, vue_page):
    """Template 1 made small (tiny checkpoint, 1 step, a face uploaded before the page opens) loads, draws and queues;
    then the real template loads with no dialog. The small one first: the page's screenshot (docs/vue-nodes.png) then
    shows no notice left from the real template (its face photo is not on this server: "Media input missing")."""
    b = vue_page
    quick = json.loads((WORKFLOWS / f"{_maker().QUICK_START}.json").read_text())
    ids = [n["id"] for n in quick["nodes"]]
    all_drawn = "return arguments[0].every(id => document.querySelector(`[data-node-id=\"${id}\"]`))"

    face = upload_face(server)
    harness.open_comfyui_page(b, server["url"])  # again: Load Image lists only the files there when the page opened
    before = set(requests.get(f"{server['url']}/history", timeout=30).json())
    small = _small_ui(quick, object_info, face)
    small["nodes"] = [{**n, "widgets_values": [*n["widgets_values"]]} for n in small["nodes"]]
    for n in small["nodes"]:  # a seed of its own: this run must execute, not come from another test's cache
        if n["type"] == "KSampler":
            n["widgets_values"][0] = 11
    assert b.execute_async_script(harness.LOAD_GRAPH, small) == "ok"
    b.execute_script(PINIA + "pinia._s.get('rightSidePanel')?.closePanel();"
                     "window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    assert poll(b, all_drawn, 20, ids)
    time.sleep(2)
    ARTIFACTS.mkdir(exist_ok=True)
    b.save_screenshot(str(ARTIFACTS / "vue-template-1.png"))  # docs/vue-nodes.png is a copy of it
    assert b.execute_async_script("const done = arguments[arguments.length - 1];"
                                  "window.app.queuePrompt(0, 1).then(() => done('ok'), e => done('' + e));") == "ok"
    prompt_id = wait_new_prompt(server, before)

    assert b.execute_async_script(harness.LOAD_GRAPH, quick) == "ok"
    b.execute_script("window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    assert poll(b, all_drawn, 20, ids)
    assert b.execute_script("return [...document.querySelectorAll('.p-dialog')].length") == 0

    entry = wait_for(server, prompt_id)
    saved = [o for o in entry["outputs"].values() if o.get("images")]
    assert saved and all((server["base"] / "output" / i["subfolder"] / i["filename"]).is_file()
                         for i in saved[0]["images"])


def wait_new_prompt(server, before: set, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = set(requests.get(f"{server['url']}/history", timeout=30).json()) - before
        if new:
            return new.pop()
        time.sleep(1)
    raise AssertionError("the prompt queued from the page never reached the history")


# --- the subgraph blueprint ---------------------------------------------------------------------------------------
BLUEPRINT_NAME = BLUEPRINT.stem
PLACE_BLUEPRINT = PINIA + """const [type, face] = arguments;
const bp = pinia._s.get('subgraph').getBlueprint(type);  // what the node library's "add" does with a blueprint
const g = window.app.graph; g.clear();
const added = window.app.canvas._deserializeItems({nodes: bp.nodes, subgraphs: bp.definitions?.subgraphs},
                                                  {position: [450, 150]});
const node = added.nodes.values().next().value;
const make = (t, pos, values) => { const n = window.LiteGraph.createNode(t); n.pos = pos; g.add(n);
  for (const [k, v] of Object.entries(values)) n.widgets.find(w => w.name === k).value = v; return n; };
const ckpt = make('CheckpointLoaderSimple', [0, 100], {ckpt_name: 'tiny-sd1.safetensors'});
const photo = make('LoadImage', [0, 300], {image: face});
const images = make('SaveImage', [900, 100], {filename_prefix: 'sefi/blueprint'});
const keep = make('SaveIDEmbedding', [900, 450], {filename: 'blueprint_person', overwrite: true});
[0, 1, 2].forEach(i => ckpt.connect(i, node, i));
photo.connect(0, node, 3);
node.connect(0, images, 0);
node.connect(1, keep, 0);
node.widgets.find(w => w.name === 'steps').value = 1;
node.widgets.find(w => w.name === 'seed').value = 12;
const inner = t => node.subgraph.nodes.find(n => n.type === t);
for (const w of inner('EmptyLatentImage').widgets) if (['width', 'height'].includes(w.name)) w.value = 64;
inner('KSampler').widgets.find(w => w.name === 'steps').value = 2;
return {type: node.type, title: node.title, inputs: node.inputs.map(i => i.name),
        outputs: node.outputs.map(o => o.name), widgets: (node.widgets || []).map(w => w.name)};"""


def test_the_blueprint_file_is_a_frontend_subgraph():
    """The layout the frontend's blueprint loader reads: one node whose type is the id of the one subgraph defined."""
    bp = json.loads(BLUEPRINT.read_text())
    (node,) = bp["nodes"]
    (subgraph,) = bp["definitions"]["subgraphs"]
    assert node["type"] == subgraph["id"] and subgraph["name"] == BLUEPRINT_NAME
    assert [i["name"] for i in subgraph["inputs"]] == [i["name"] for i in node["inputs"]]
    assert {n["type"] for n in subgraph["nodes"]} >= {"LearnIDEmbedding", "ApplyPerStageIDTokens", "KSampler"}


def test_the_blueprint_is_listed_loaded_as_a_node_and_runs(server):
    listing = requests.get(f"{server['url']}/global_subgraphs", timeout=30)
    if listing.status_code == 404:
        pytest.skip(f"{host_name(server)} has no /global_subgraphs (app/subgraph_manager.py): it does not load "
                    "subgraph blueprints from packs")
    entries = {k: v for k, v in listing.json().items() if v["info"]["node_pack"] == f"custom_nodes.{PACK_DIR}"}
    assert [v["name"] for v in entries.values()] == [BLUEPRINT_NAME], entries
    (entry_id,) = entries
    served = requests.get(f"{server['url']}/global_subgraphs/{entry_id}", timeout=30).json()
    assert served["source"] == "custom_node" and served["data"] == BLUEPRINT.read_text()

    requests.post(f"{server['url']}/settings/Comfy.TutorialCompleted", json=True, timeout=30)
    face = upload_face(server)
    b = browser()
    try:
        harness.open_comfyui_page(b, server["url"])
        definition = poll(b, PINIA + "const d = [...pinia._s.get('subgraph').subgraphBlueprints]"
                                     ".find(d => d.display_name === arguments[0]"
                                     " && d.name.startsWith('SubgraphBlueprint.'));"
                                     "return d && {type: d.name, module: d.python_module, name: d.display_name, "
                                     "description: d.description, category: d.category};", 20, BLUEPRINT_NAME)
        assert definition, f"the page did not load the blueprint ({frontend_name(server, b)})"
        bp = json.loads(BLUEPRINT.read_text())
        node_type = definition.pop("type")  # SubgraphBlueprint.<the server's id of the file>
        assert node_type == f"SubgraphBlueprint.{entry_id}"
        # python_module: "blueprint" (frontend 1.41+); 1.32 puts the pack's own module there (info.node_pack)
        assert definition.pop("module") in ("blueprint", f"custom_nodes.{PACK_DIR}"), frontend_name(server, b)
        assert definition == {"name": BLUEPRINT_NAME, "category": "Subgraph Blueprints",
                              "description": bp["extra"]["BlueprintDescription"]}
        placed = b.execute_script(PLACE_BLUEPRINT, node_type, face)
        assert placed["inputs"] == ["model", "clip", "vae", "face_photo", "placeholder", "steps", "prompt",
                                    "negative", "seed"]
        assert placed["outputs"] == ["images", "identity"]
        assert {"placeholder", "steps", "prompt", "negative", "seed"} <= set(placed["widgets"])
        time.sleep(1)
        b.save_screenshot(str(ARTIFACTS / "blueprint.png"))
        before = set(requests.get(f"{server['url']}/history", timeout=30).json())
        assert b.execute_async_script("const done = arguments[arguments.length - 1];"
                                      "window.app.queuePrompt(0, 1).then(() => done('ok'), e => done('' + e));") == "ok"
        entry = wait_for(server, wait_new_prompt(server, before))
    finally:
        b.quit()
    prompt = entry["prompt"][2]  # what the page sent: the subgraph expanded into the pack's and core nodes
    assert {n["class_type"] for n in prompt.values()} >= {"LearnIDEmbedding", "ApplyPerStageIDTokens", "KSampler",
                                                          "VAEDecode", "SaveImage", "SaveIDEmbedding"}
    learn = next(n for n in prompt.values() if n["class_type"] == "LearnIDEmbedding")
    assert learn["inputs"]["steps"] == 1  # the blueprint node's widget reached the node inside
    images = [i for o in entry["outputs"].values() for i in o.get("images", [])]
    assert images and all((server["base"] / "output" / i["subfolder"] / i["filename"]).is_file() for i in images)
    assert (server["base"] / "models" / "sefi_identities" / "blueprint_person.safetensors").is_file()
