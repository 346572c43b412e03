"""The shared workflows in example_workflows/ (the template browser's files): valid against the running server,
runnable end to end over HTTP, and loadable (and queueable) in the real ComfyUI page in a headless Chromium.

The files are written by tools/make_workflows.py. SDXL workflows run here with the tiny SD1 checkpoint
substituted (no SDXL-detected checkpoint is small enough for CI): that proves their graphs; the SDXL code
path itself is covered by the in-process SDXL mechanism tests.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import harness
import pytest
import requests
from harness import PACK_ROOT
from helpers import run_prompt, wait_for_prompt

pytestmark = pytest.mark.server

WORKFLOWS = PACK_ROOT / "example_workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_DIR = WORKFLOWS / "api"
ARTIFACTS = PACK_ROOT / "test-artifacts"
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FILE_COMBOS = {"ckpt_name": (".safetensors", ".ckpt"), "image": (".png", ".jpg", ".jpeg", ".webp"),
               "identity_file": (".safetensors",)}  # choices depend on the user's files: check the kind only


def widget_slots(node_info: dict) -> list[tuple[str, str, dict]]:
    """(name, kind, options) per serialized widget value, from /object_info, in the frontend's order."""
    slots = []
    for section in ("required", "optional"):
        for name in node_info.get("input_order", {}).get(section, []):
            typ, *rest = node_info["input"][section][name]
            opts = rest[0] if rest else {}
            if isinstance(typ, list) or typ == "COMBO":
                kind, opts = "COMBO", {**opts, "choices": typ if isinstance(typ, list) else opts.get("options", [])}
            else:
                kind = typ
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            slots.append((name, kind, opts))
            if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                slots.append((name, "control", {}))
            if kind == "COMBO" and opts.get("image_upload"):
                slots.append((name, "upload", {}))
    return slots


def check_value(where: str, name: str, kind: str, opts: dict, value) -> None:
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {name}={value!r} is not an int"
        assert opts.get("min", -2**63) <= value <= opts.get("max", 2**63), f"{where}: {name}={value} out of range"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {name}={value!r}"
        assert opts.get("min", -1e308) <= value <= opts.get("max", 1e308), f"{where}: {name}={value} out of range"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {name}={value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {name}={value!r} is not a string"
    elif kind == "COMBO":
        if name in FILE_COMBOS:
            assert isinstance(value, str) and value.endswith(FILE_COMBOS[name]), f"{where}: {name}={value!r}"
        else:
            assert value in opts["choices"], f"{where}: {name}={value!r} not in {opts['choices']}"
    elif kind == "control":
        assert value in CONTROL_VALUES, f"{where}: control value {value!r}"
    elif kind == "upload":
        assert value == "image", f"{where}: upload widget value {value!r}"


def api_file(ui_path: Path) -> dict:
    return json.loads((API_DIR / ui_path.name).read_text())


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return requests.get(f"{server['url']}/object_info", timeout=60).json()


def _maker():
    import importlib.util

    if "make_workflows" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_workflows", PACK_ROOT / "tools" / "make_workflows.py")
        maker = importlib.util.module_from_spec(spec)
        sys.modules["make_workflows"] = maker  # its dataclasses look their module up
        spec.loader.exec_module(maker)
    return sys.modules["make_workflows"]


def test_the_pack_ships_the_workflows_a_newcomer_needs():
    from PIL import Image

    m = _maker()
    names = [p.stem for p in UI_FILES]
    assert names == [m.QUICK_START, m.LEARN_SD1, m.GENERATE_SD1, m.TWO_PEOPLE, m.LEARN_SDXL, m.GENERATE_SDXL,
                     m.LEARN_PET]  # sorted by name = the order to try them (the browser's A-Z sort)
    assert {p.stem for p in API_DIR.glob("*.json")} == set(names)
    for name in names:  # the browser shows the name as the title and as the description ('-' and '_' as spaces)
        assert name[0].isdigit() and not set(name) & set("-_"), name
        thumbnail = WORKFLOWS / f"{name}.jpg"  # the card's picture
        assert thumbnail.is_file(), f"{thumbnail.name}: run tools/make_pictures.py"
        with Image.open(thumbnail) as picture:
            assert picture.format == "JPEG" and picture.size == (400, 400)


def _without_unlinked_outputs(ui: dict) -> dict:
    """The file as a host that adds or lacks unconnected output slots of core nodes loads it."""
    nodes = [{**n, "outputs": [o for o in n.get("outputs", []) if o.get("links")]} for n in ui["nodes"]]
    return {**ui, "nodes": nodes}


def test_the_files_are_what_tools_make_workflows_writes(comfy_host):
    """Both formats come from one description; a hand edit or a node change not regenerated shows up here. The files
    are written on make_workflows.REFERENCE_HOST: there they match exactly; on another host every difference must be
    an unconnected output slot of a node (0.28's Save / Preview Image gained one), which the frontend reconciles on
    load (that each file loads on this host is test_workflow_file_is_valid_against_the_running_server)."""
    from comfyui_version import __version__ as host_version

    maker = _maker()
    graphs = maker.all_workflows(maker.node_specs())
    assert set(graphs) == {p.stem for p in UI_FILES}
    pinned = host_version == maker.REFERENCE_HOST
    for name, graph in graphs.items():
        saved, made = json.loads((WORKFLOWS / f"{name}.json").read_text()), graph.ui()
        if pinned:
            assert saved == made, name
        else:
            assert _without_unlinked_outputs(saved) == _without_unlinked_outputs(made), (name, host_version)
        assert json.loads((API_DIR / f"{name}.json").read_text()) == graph.api(), name


@pytest.mark.smoke
@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_workflow_file_is_valid_against_the_running_server(path, object_info):
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4 and isinstance(ui["nodes"], list) and isinstance(ui["links"], list)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert any(n["type"] in FRONTEND_ONLY and n["widgets_values"][0].strip() for n in ui["nodes"]), "no Note node"
    api = api_file(path)
    assert set(api) == {str(i) for i, n in nodes.items() if n["type"] not in FRONTEND_ONLY}

    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        where = f"{path.name} node {node['id']} ({node['type']})"
        assert node["type"] in object_info, f"{where}: unknown node type"
        info = object_info[node["type"]]
        slots = widget_slots(info)
        assert len(node["widgets_values"]) == len(slots), f"{where}: {len(node['widgets_values'])} widget values " \
                                                          f"for {[s[0] for s in slots]}"
        for (name, kind, opts), value in zip(slots, node["widgets_values"]):
            check_value(where, name, kind, opts, value)
        # the API node holds the same values, every required input, and links to existing outputs
        api_node = api[str(node["id"])]
        assert api_node["class_type"] == node["type"]
        for (name, kind, _), value in zip(slots, node["widgets_values"]):
            if kind not in ("control", "upload"):
                assert api_node["inputs"][name] == value, f"{where}: API value of {name} differs"
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert set(api_node["inputs"]) <= set(declared), f"{where}: undeclared inputs"
        missing = set(info["input"].get("required", {})) - set(api_node["inputs"])
        assert not missing, f"{where}: required inputs not set: {missing}"
        for value in api_node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src = api[value[0]]
                assert value[1] < len(object_info[src["class_type"]]["output"]), f"{where}: bad link {value}"

    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, f"{path.name}: link {link_id} is inconsistent"
        assert out["type"] == inp["type"] == typ
        assert object_info[nodes[src]["type"]]["output"][src_slot] == typ
        dst_info = object_info[nodes[dst]["type"]]["input"]
        assert {**dst_info.get("required", {}), **dst_info.get("optional", {})}[inp["name"]][0] == typ


def test_the_template_browser_lists_our_workflows(server):
    templates = requests.get(f"{server['url']}/workflow_templates", timeout=30).json()
    ours = next(v for k, v in templates.items() if k == "ComfyUI-SeFi-IDE")
    assert sorted(ours) == sorted(p.stem for p in UI_FILES)
    for path in UI_FILES:  # names with spaces and brackets are served (the browser asks for them URL-encoded)
        served = requests.get(f"{server['url']}/api/workflow_templates/ComfyUI-SeFi-IDE/{path.name}", timeout=30)
        assert served.ok and served.json() == json.loads(path.read_text())
        picture = requests.get(f"{server['url']}/api/workflow_templates/ComfyUI-SeFi-IDE/{path.stem}.jpg", timeout=30)
        assert picture.ok and picture.content == path.with_suffix(".jpg").read_bytes()


# --- running them --------------------------------------------------------------------------------------
def upload_face(server) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray((rng.random((96, 96, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    r = requests.post(f"{server['url']}/upload/image", files={"image": ("sefi_face.png", buf.getvalue())},
                      data={"overwrite": "true"}, timeout=30)
    assert r.ok, r.text
    return r.json()["name"]


SMALL = {  # (class, input) -> value: the tiny checkpoint and small sizes/steps
    ("CheckpointLoaderSimple", "ckpt_name"): "tiny-sd1.safetensors",
    ("LearnIDEmbedding", "steps"): 1,  # it trains at the native 512 px: the slow part of these runs
    ("KSampler", "steps"): 2,
    ("EmptyLatentImage", "width"): 64,
    ("EmptyLatentImage", "height"): 64,
    ("IDAttentionHeatmap", "resolution"): 64,
    ("SaveIDEmbedding", "overwrite"): True,  # the session's server is shared with other tests
}


def small(graph: dict, face: str, extra: dict | None = None) -> dict:
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        for (cls, name), value in {**SMALL, ("LoadImage", "image"): face}.items():
            if node["class_type"] == cls:
                node["inputs"][name] = value
        for (cls, name), value in (extra or {}).items():
            if node["class_type"] == cls:
                node["inputs"][name] = value
    return graph


def run(server, graph: dict, timeout: float = 600) -> dict:
    return _succeeded(run_prompt(server, graph, timeout))


def wait_for(server, prompt_id: str, timeout: float = 600) -> dict:
    return _succeeded(wait_for_prompt(server, prompt_id, timeout))


def _succeeded(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    return entry


def two_identities_setup(face: str) -> dict:
    """Learns <alice> and <bob> quickly (64 px, one step) and saves them as alice / bob."""
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}},
             "img": {"class_type": "LoadImage", "inputs": {"image": face}}}
    for who in ("alice", "bob"):
        graph[f"learn_{who}"] = {"class_type": "FaceAttentionLossTrainer", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["img", 0],
            "placeholder": f"<{who}>", "steps": 1, "seed": 0, "init_word": "person",
            "reference_prompt": "a photo of the face of {word}", "attn_lambda": 0.003,
            "token_option": "3: all 77 token maps (paper's best)", "layers": "auto", "stages": 5, "kv_split": True,
            "lr": 0.005, "resolution": 64, "color_jitter": 0.2, "flip_p": 0.5, "scale_min": 0.8, "scale_max": 1.2,
            "batch_size": 1}}
        graph[f"save_{who}"] = {"class_type": "SaveIDEmbedding", "inputs": {
            "identity": [f"learn_{who}", 0], "filename": who, "overwrite": True, "include_generator": False}}
    return graph


def assert_outputs_on_disk(server, graph: dict, entry: dict) -> None:
    for node_id, node in graph.items():
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            images = entry["outputs"][node_id]["images"]
            folder = "output" if node["class_type"] == "SaveImage" else "temp"
            assert images and all((server["base"] / folder / i["subfolder"] / i["filename"]).is_file() for i in images)
        if node["class_type"] == "SaveIDEmbedding":
            name = node["inputs"]["filename"]
            assert (server["base"] / "models" / "sefi_identities" / f"{name}.safetensors").is_file()


LITEGRAPH_TITLE = 30  # LiteGraph draws the title bar above a node's pos
PAGE = (1280, 720)  # the browser test's window; the menu and tab bars take the top 100 px of it
PAGE_TOP = 100


def _rect(node: dict) -> tuple[float, float, float, float]:
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - LITEGRAPH_TITLE, x + w, y + h


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_no_two_nodes_overlap_and_the_saved_view_shows_every_node(path):
    nodes = json.loads(path.read_text())["nodes"]
    rects = [(n["type"], _rect(n)) for n in nodes]
    for i, (ta, a) in enumerate(rects):
        for tb, b in rects[i + 1:]:  # at least 10 px apart, title bars included
            apart = a[2] + 10 <= b[0] or b[2] + 10 <= a[0] or a[3] + 10 <= b[1] or b[3] + 10 <= a[1]
            assert apart, f"{path.name}: {ta} {a} overlaps or touches {tb} {b}"
    view = json.loads(path.read_text())["extra"]["ds"]
    scale, (ox, oy) = view["scale"], view["offset"]
    assert scale >= 0.4, f"{path.name}: saved zoom {scale} is too small to read"
    for typ, (x0, y0, x1, y1) in rects:  # screen = (pos + offset) * scale
        assert 0 <= (x0 + ox) * scale and (x1 + ox) * scale <= PAGE[0], f"{path.name}: {typ} off screen"
        assert PAGE_TOP <= (y0 + oy) * scale and (y1 + oy) * scale <= PAGE[1], f"{path.name}: {typ} off screen"


def test_every_workflow_runs_end_to_end_over_http(server):
    face = upload_face(server)
    ran = set()

    m = _maker()

    def run_file(stem: str) -> None:
        graph = small(api_file(WORKFLOWS / f"{stem}.json"), face)
        assert_outputs_on_disk(server, graph, run(server, graph))
        ran.add(stem)

    run_file(m.LEARN_SD1)  # saves my_person, which the generate workflow loads
    run_file(m.GENERATE_SD1)
    run_file(m.LEARN_SDXL)
    run_file(m.GENERATE_SDXL)
    run(server, two_identities_setup(face))  # alice and bob, which the two-people workflow loads
    run_file(m.TWO_PEOPLE)
    run_file(m.QUICK_START)
    run_file(m.LEARN_PET)
    assert ran == {p.stem for p in UI_FILES}


# --- in the real page ------------------------------------------------------------------------------------
def _browser():
    browser = harness.chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: .ci/setup_env.sh installs them (apt)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return browser


LOAD = harness.LOAD_GRAPH
FIT_VIEW = "try { window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) {}"
STATE = """return {
  dialogs: [...document.querySelectorAll('.p-dialog')].map(e => e.innerText.slice(0, 300)),
  nodes: window.app.graph._nodes.map(n => ({id: n.id, type: n.type,
     registered: !!window.LiteGraph.registered_node_types[n.type],
     widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}))};"""


def _small_ui(ui: dict, object_info: dict, face: str) -> dict:
    """The UI workflow with the same small overrides as the HTTP run, written into widgets_values."""
    ui = json.loads(json.dumps(ui))
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        for i, (name, kind, _) in enumerate(widget_slots(object_info[node["type"]])):
            # a new seed: the page's run must execute, not come back from the HTTP test's cache
            value = {**SMALL, ("LoadImage", "image"): face, ("KSampler", "seed"): 7}.get((node["type"], name))
            if value is not None and kind not in ("control", "upload"):
                node["widgets_values"][i] = value
    return ui


def test_workflows_load_in_the_real_page_and_one_runs_from_it(server, object_info):
    requests.post(f"{server['url']}/settings/Comfy.TutorialCompleted", json=True, timeout=30)  # no welcome dialog
    face = upload_face(server)
    browser = _browser()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        harness.open_comfyui_page(browser, server["url"])
        for path in UI_FILES:
            assert browser.execute_async_script(LOAD, json.loads(path.read_text())) == "ok"
            browser.execute_script(FIT_VIEW)
            time.sleep(1.5)
            state = browser.execute_script(STATE)
            browser.save_screenshot(str(ARTIFACTS / f"workflow-{path.stem}.png"))
            assert state["dialogs"] == [], f"{path.name}: dialog shown: {state['dialogs']}"
            assert all(n["registered"] for n in state["nodes"]), f"{path.name}: missing node types"
            api = api_file(path)
            for n in state["nodes"]:
                if n["type"] in FRONTEND_ONLY:
                    continue
                for name, value in api[str(n["id"])]["inputs"].items():
                    if not isinstance(value, list):  # a widget: the page shows the value the file holds
                        assert n["widgets"][name] == value, f"{path.name} node {n['id']}: {name}"

        # queue the quickest workflow from the page itself and wait for its images
        quick = WORKFLOWS / f"{_maker().QUICK_START}.json"
        before = set(requests.get(f"{server['url']}/history", timeout=30).json())
        assert browser.execute_async_script(LOAD, _small_ui(json.loads(quick.read_text()), object_info, face)) == "ok"
        time.sleep(1)
        browser.execute_async_script("const done = arguments[arguments.length - 1];"
                                     "window.app.queuePrompt(0, 1).then(() => done('ok'), e => done('' + e));")
        deadline = time.time() + 600
        new = set()
        while not new:
            assert time.time() < deadline, "the prompt queued from the page never reached the history"
            time.sleep(1)
            new = set(requests.get(f"{server['url']}/history", timeout=30).json()) - before
        entry = wait_for(server, new.pop())
        saved = [o for o in entry["outputs"].values() if o.get("images")]
        assert saved and all((server["base"] / "output" / i["subfolder"] / i["filename"]).is_file()
                             for i in saved[0]["images"])
        browser.save_screenshot(str(ARTIFACTS / "workflow-queued-from-page.png"))
    finally:
        browser.quit()


def test_the_cards_come_from_our_route_where_the_host_serves_only_the_json(comfy_host):
    """Newer ComfyUI (0.38) answers /workflow_templates/<pack>/<file> with the .json templates only, from a handler
    registered after custom nodes' routes. Our route, first, serves our .jpg cards and nothing else."""
    import asyncio
    from urllib.parse import quote

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from sefi_ide.nodes.template_cards import add_card_route

    routes = web.RouteTableDef()
    add_card_route(routes, "ComfyUI-SeFi-IDE")  # at import of the pack: before the host's own routes

    @routes.get("/workflow_templates/{module_name}/{filename}")
    async def host_json_only(request):  # upstream 0.38's get_workflow_template_file, in short
        if not request.match_info["filename"].endswith(".json"):
            raise web.HTTPNotFound()
        return web.json_response({"from": "host"})

    names = [n for p in UI_FILES for n in (p.stem + ".jpg", p.name)]
    bad = ["missing.jpg", "../README.jpg", "..%2F..%2Fdocs%2Fworkflow.jpg", "icon.png"]

    async def get_all() -> dict[str, tuple[int, bytes]]:
        app = web.Application()
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            out = {}
            for name in names + bad:
                response = await client.get(f"/workflow_templates/ComfyUI-SeFi-IDE/{quote(name)}")
                out[name] = (response.status, await response.read())
            return out

    got = asyncio.run(get_all())
    for path in UI_FILES:
        assert got[path.stem + ".jpg"] == (200, path.with_suffix(".jpg").read_bytes())
        assert got[path.name] == (200, b'{"from": "host"}')  # the templates stay the host's
    for name in bad:
        assert got[name][0] == 404, name
