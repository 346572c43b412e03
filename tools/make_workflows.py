"""Writes the shared workflows: `example_workflows/<name>.json` (UI format: what ComfyUI's template browser lists
and a user drags onto the page) and `example_workflows/api/<name>.json` (API format, what POST /prompt takes), both
from one description per graph. The template browser titles an extension's templates by their file names and
shows `<name>.jpg` beside each as its picture (tools/make_pictures.py), so the names are titles, numbered in the
order a newcomer should try them.

    ~/.cache/sefi-ide/venv/bin/python tools/make_workflows.py

Widget order, control widgets (seed) and defaults come from the live node definitions (ComfyUI's and
this pack's INPUT_TYPES), so the files match what the installed frontend expects. The files are written on the
REFERENCE_HOST below (`.ci/setup_env.sh` builds it: `~/.cache/sefi-ide/venv`); newer hosts' core nodes may have
gained output slots (0.28: Save / Preview Image pass their images on), which the frontend adds on load, and the
tests check that each file loads on every host CI runs.
"""
from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"
sys.path.insert(0, str(ROOT / "tests"))

REFERENCE_HOST = "0.3.75"  # the ComfyUI whose node definitions the files are written from
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # frontend nodes: no server class, not in the API format
COL = 430  # column width on the canvas
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its `pos`
GAP = 24  # space between a node and the title bar of the node below it
IMAGE_AREA = 200  # image widgets (Load / Preview / Save Image) draw the picture inside the node
# the page's canvas at 1280x720 minus the menu and tab bars at the top: the saved view must show every node there
VIEW = {"left": 20, "top": 110, "width": 1240, "height": 590}

SD1_CKPT = "v1-5-pruned-emaonly.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
NEGATIVE = "blurry, lowres, deformed, watermark, text"
PROMPTS = {  # the paper's kinds of edit: a scene, an action with an object, facial attributes
    "scene": "a photo of <id> standing in front of the Eiffel Tower at golden hour",
    "action": "a photo of <id> holding a basketball in a gym",
    "eyes_closed": "a close-up photo of <id> with eyes closed, soft light",
    "old": "a photo of <id> as an old person, grey hair, wrinkles",
}


def node_specs() -> dict[str, type]:
    import harness

    harness.import_comfy_in_process()
    import nodes as core

    pack = harness.load_pack_entry_point()
    return {**core.NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS}


def _input_list(cls) -> list[tuple[str, object, dict]]:
    spec = cls.INPUT_TYPES()
    return [(name, s[0], s[1] if len(s) > 1 else {}) for sec in ("required", "optional")
            for name, s in spec.get(sec, {}).items()]


def widget_slots(cls) -> list[tuple[str, str, dict]]:
    """(input name, kind, options) for each serialized widget value, in the frontend's order. kind is the
    input's type, or "control" for the control_after_generate value that follows a seed."""
    slots = []
    for name, typ, opts in _input_list(cls):
        kind = "COMBO" if isinstance(typ, list) else typ
        if kind not in WIDGET_TYPES or opts.get("forceInput"):
            continue
        slots.append((name, kind, opts if not isinstance(typ, list) else {**opts, "choices": typ}))
        control = opts.get("control_after_generate", name in ("seed", "noise_seed"))
        if kind == "INT" and control:
            slots.append((name, "control", {}))
        if kind == "COMBO" and opts.get("image_upload"):
            slots.append((name, "upload", {}))
    return slots


def link_inputs(cls) -> list[tuple[str, str]]:
    return [(name, typ) for name, typ, opts in _input_list(cls)
            if not isinstance(typ, list) and (typ not in WIDGET_TYPES or opts.get("forceInput"))]


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    values: dict
    links: dict  # input name -> (Node, output slot)
    title: str | None = None
    size: tuple[float, float] = (340, 120)
    color: str | None = None
    outputs_used: dict = field(default_factory=dict)  # slot -> [link ids]


class Graph:
    def __init__(self, specs: dict):
        self.specs = specs
        self.nodes: list[Node] = []

    def add(self, type_: str, col: float, y: float, title: str | None = None, **inputs) -> Node:
        links = {k: v for k, v in inputs.items() if isinstance(v, tuple)}
        values = {k: v for k, v in inputs.items() if not isinstance(v, tuple)}
        node = Node(len(self.nodes) + 1, type_, (col * COL, y), values, links, title)
        if type_ in FRONTEND_ONLY:
            node.size, node.color = (360, 60 + 17 * values["text"].count("\n") + 17 * len(values["text"]) // 52), "#432"
        else:
            cls = self.specs[type_]
            unknown = set(inputs) - {n for n, _, _ in _input_list(cls)}
            if unknown:
                raise ValueError(f"{type_} has no input(s) {sorted(unknown)}")
            multiline = any(o.get("multiline") for _, k, o in widget_slots(cls) if k == "STRING")
            height = 46 + 24 * (len(link_inputs(cls)) + len(widget_slots(cls))) + (90 if multiline else 0)
            if type_ in ("LoadImage", "PreviewImage", "SaveImage"):
                height += IMAGE_AREA
            node.size = (400 if multiline else 340, height)
        self.nodes.append(node)
        return node

    def note(self, col: float, y: float, text: str, title: str = "Read me") -> Node:
        return self.add("Note", col, y, title=title, text=text)

    # --- serialisation -------------------------------------------------------------------
    def _widgets_values(self, node: Node) -> list:
        if node.type in FRONTEND_ONLY:
            return [node.values["text"]]
        out = []
        for name, kind, opts in widget_slots(self.specs[node.type]):
            if kind == "control":
                out.append(node.values.get(f"{name}_control", "randomize"))
            elif kind == "upload":
                out.append("image")
            elif name in node.values:
                out.append(node.values[name])
            elif "default" in opts:
                out.append(opts["default"])
            elif kind == "COMBO" and opts["choices"]:
                out.append(opts["choices"][0])
            else:
                raise ValueError(f"{node.type}.{name} needs a value")
        return out

    def _order(self) -> list[Node]:
        done: list[Node] = []
        while len(done) < len(self.nodes):
            for n in self.nodes:
                if n not in done and all(src in done for src, _ in n.links.values()):
                    done.append(n)
        return done

    def _settle(self) -> None:
        """Per column, top to bottom: push each node down until its title bar clears the node above by GAP."""
        for x in {n.pos[0] for n in self.nodes}:
            column = sorted((n for n in self.nodes if n.pos[0] == x), key=lambda n: n.pos[1])
            for above, below in itertools.pairwise(column):
                lowest = above.pos[1] + above.size[1] + GAP + TITLE_HEIGHT
                if below.pos[1] < lowest:
                    below.pos = (x, lowest)

    def _view(self) -> dict:
        """LiteGraph's saved view (screen = (pos + offset) * scale) framing every node, title bars included."""
        left = min(n.pos[0] for n in self.nodes)
        top = min(n.pos[1] - TITLE_HEIGHT for n in self.nodes)
        right = max(n.pos[0] + n.size[0] for n in self.nodes)
        bottom = max(n.pos[1] + n.size[1] for n in self.nodes)
        scale = round(min(1.0, VIEW["width"] / (right - left), VIEW["height"] / (bottom - top)) - 0.005, 2)
        return {"scale": scale, "offset": [round(VIEW["left"] / scale - left, 1), round(VIEW["top"] / scale - top, 1)]}

    def ui(self) -> dict:
        self._settle()
        order = {n.id: i for i, n in enumerate(self._order())}
        links, node_json = [], {}
        for n in self.nodes:
            node_json[n.id] = {
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {},
                "order": order[n.id], "mode": 0, "inputs": [], "outputs": [],
                "properties": {} if n.type in FRONTEND_ONLY else {"Node name for S&R": n.type},
                "widgets_values": self._widgets_values(n)}
            if n.title:
                node_json[n.id]["title"] = n.title
            if n.color:
                node_json[n.id].update(color=n.color, bgcolor="#653")
            if n.type not in FRONTEND_ONLY:
                cls = self.specs[n.type]
                names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
                node_json[n.id]["outputs"] = [{"name": nm, "type": t, "slot_index": i, "links": []}
                                              for i, (nm, t) in enumerate(zip(names, cls.RETURN_TYPES))]
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            for slot, (name, typ) in enumerate(link_inputs(self.specs[n.type])):
                link_id = None
                if name in n.links:
                    src, src_slot = n.links[name]
                    link_id = len(links) + 1
                    links.append([link_id, src.id, src_slot, n.id, slot, typ])
                    node_json[src.id]["outputs"][src_slot]["links"].append(link_id)
                node_json[n.id]["inputs"].append({"name": name, "type": typ, "link": link_id})
        return {"last_node_id": len(self.nodes), "last_link_id": len(links),
                "nodes": [node_json[n.id] for n in self.nodes], "links": links, "groups": [], "config": {},
                "extra": {"ds": self._view()}, "version": 0.4}

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            cls = self.specs[n.type]
            values = self._widgets_values(n)
            inputs = {}
            for (name, kind, _), value in zip(widget_slots(cls), values):
                if kind not in ("control", "upload"):
                    inputs[name] = value
            for name, (src, slot) in n.links.items():
                inputs[name] = [str(src.id), slot]
            out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
        return out


# --- the workflows ------------------------------------------------------------------------------
def _generate_branch(g: Graph, ckpt: Node, identity: dict, negative: Node, latent: Node, text: str, prefix: str,
                     y: float, col: int = 2) -> None:
    apply = g.add("ApplyPerStageIDTokens", col, y, model=(ckpt, 0), clip=(ckpt, 1), text=text, **identity)
    sample = g.add("KSampler", col + 1, y, model=(apply, 0), positive=(apply, 1), negative=(negative, 0),
                   latent_image=(latent, 0), seed=42, steps=30, cfg=7.0, sampler_name="dpmpp_2m",
                   scheduler="karras")
    decode = g.add("VAEDecode", col + 2, y, samples=(sample, 0), vae=(ckpt, 2))
    g.add("SaveImage", col + 3, y, images=(decode, 0), filename_prefix=f"sefi/{prefix}")


def learn(specs, family: str, subject: str = "face") -> Graph:
    ckpt_name, file = (SD1_CKPT, "my_person") if family == "sd1" else (SDXL_CKPT, "my_person_sdxl")
    if subject == "pet":
        file = "my_pet"
    g = Graph(specs)
    what = "face photo" if subject == "face" else "photo of your pet (subject: pet)"
    g.note(0, 0, f"""Learn an identity from ONE {what} ({'SD1.x' if family == 'sd1' else 'SDXL'}).

1. Checkpoint: pick an {'SD1.x (e.g. v1-5-pruned-emaonly)' if family == 'sd1' else 'SDXL-family (SDXL base, or any SDXL fine-tune)'} \
epsilon-prediction checkpoint.
2. Load Image: your photo, {'face' if subject == 'face' else 'the pet'} clearly visible; a square crop around the \
head works best.{' More photos of the same subject can go to more_photos.' if subject != 'face' else ''}
3. Learn: placeholder is the word you will write in prompts ({'<id>' if subject == 'face' else '<my_pet>'}). \
400 steps is the default; \
lower it for a quick try, raise it (e.g. 800) if the likeness is weak. The progress bar shows the steps and, every 10 steps, where the token attends on the photo; Cancel keeps a resumable '-stopped' file. The loss curve appears when it is done.
4. Save: writes models/sefi_identities/{file}.safetensors (SD1 ~30 KB, SDXL ~75 KB). It refuses to overwrite an \
existing file unless you switch 'overwrite' on.
The heat map shows where the learned token attends on the reference: it should sit on the face.""")
    ckpt = g.add("CheckpointLoaderSimple", 1, 0, ckpt_name=ckpt_name)
    image = g.add("LoadImage", 1, 180, title="Face photo" if subject == "face" else "Pet photo", image="example.png")
    ident = g.add("LearnIDEmbedding", 2, 0, model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2), image=(image, 0),
                  placeholder="<id>" if subject == "face" else "<my_pet>", steps=400, seed=0, subject=subject)
    g.add("SaveIDEmbedding", 3, 0, identity=(ident, 0), filename=file)
    heat = g.add("IDAttentionHeatmap", 3, 220, model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2), image=(image, 0),
                 identity=(ident, 0), resolution=512 if family == "sd1" else 1024)
    g.add("PreviewImage", 4, 220, images=(heat, 0))
    g.add("PreviewImage", 2, 320, title="Loss curve", images=(ident, 1))
    return g


def generate(specs, family: str) -> Graph:
    ckpt_name, file, size = ((SD1_CKPT, "my_person.safetensors", 512) if family == "sd1"
                             else (SDXL_CKPT, "my_person_sdxl.safetensors", 1024))
    g = Graph(specs)
    g.note(0, 0, f"""Put a learned identity into any prompt ({'SD1.x' if family == 'sd1' else 'SDXL'}).

- Checkpoint: the same family the identity was learned on ({'SD1.x' if family == 'sd1' else 'SDXL'}); \
other fine-tunes of that family work too.
- Load ID Embedding: pick the file the 'Learn a face and save it ({'SD1' if family == 'sd1' else 'SDXL'})' \
template saved.
- Write <id> (the identity's placeholder) where the person goes. Each branch is one prompt: a scene, an \
action with an object, and two facial attributes.
- Apply Per-Stage ID Tokens gives the MODEL and positive CONDITIONING to an ordinary KSampler; LoRAs, \
ControlNets and other conditioning compose as usual.""")
    ckpt = g.add("CheckpointLoaderSimple", 1, 0, ckpt_name=ckpt_name)
    ident = g.add("LoadIDEmbedding", 1, 160, identity_file=file)
    negative = g.add("CLIPTextEncode", 1, 280, title="Negative", text=NEGATIVE, clip=(ckpt, 1))
    latent = g.add("EmptyLatentImage", 1, 520, width=size, height=size, batch_size=1)
    for i, (name, text) in enumerate(PROMPTS.items()):
        _generate_branch(g, ckpt, {"identity": (ident, 0)}, negative, latent, text, name, i * 330)
    return g


def two_identities(specs) -> Graph:
    g = Graph(specs)
    g.note(0, 0, """Two people in one image (SD1.x; for SDXL pick an SDXL checkpoint and identities).

- Learn each person with the 'Learn a face and save it (SD1)' template under its own placeholder and file name: <alice> -> alice, \
<bob> -> bob (a shared placeholder is refused).
- Write both placeholders in the prompt. Up to four identities can be connected.
- To place each person on one side, put an 'ID Embedding Options' node between a loader and the apply \
node and give it a mask (e.g. from a Load Image Mask node).""")
    ckpt = g.add("CheckpointLoaderSimple", 1, 0, ckpt_name=SD1_CKPT)
    alice = g.add("LoadIDEmbedding", 1, 160, title="Load ID Embedding (<alice>)", identity_file="alice.safetensors")
    bob = g.add("LoadIDEmbedding", 1, 280, title="Load ID Embedding (<bob>)", identity_file="bob.safetensors")
    negative = g.add("CLIPTextEncode", 1, 400, title="Negative", text=NEGATIVE, clip=(ckpt, 1))
    latent = g.add("EmptyLatentImage", 1, 640, width=768, height=512, batch_size=1)
    _generate_branch(g, ckpt, {"identity": (alice, 0), "identity_2": (bob, 0)}, negative, latent,
                     "a photo of <alice> and <bob> sitting on a park bench, smiling", "two_people", 0)
    return g


def learn_and_generate(specs) -> Graph:
    g = Graph(specs)
    g.note(0, 0, """The quickest way to try SeFi-IDE (SD1.x): learn from one photo and generate in one run.

1. Pick an SD1.x checkpoint and your face photo.
2. Queue. Learning runs once (~400 steps); changing only the prompt afterwards reuses the learned identity.
3. To keep the identity, connect a 'Save ID Embedding' node to the learn node's output.""")
    ckpt = g.add("CheckpointLoaderSimple", 0, 420, ckpt_name=SD1_CKPT)
    image = g.add("LoadImage", 1, 0, title="Face photo", image="example.png")
    ident = g.add("LearnIDEmbedding", 1, 400, model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2), image=(image, 0),
                  placeholder="<id>", steps=400, seed=0)
    negative = g.add("CLIPTextEncode", 2, 380, title="Negative", text=NEGATIVE, clip=(ckpt, 1))
    latent = g.add("EmptyLatentImage", 2, 640, width=512, height=512, batch_size=1)
    _generate_branch(g, ckpt, {"identity": (ident, 0)}, negative, latent, PROMPTS["action"], "quick", 0, col=2)
    return g


# file names = the template browser's titles (no '-' or '_': its descriptions turn them into spaces)
QUICK_START = "1 Learn a face and use it at once (SD1)"
LEARN_SD1 = "2 Learn a face and save it (SD1)"
GENERATE_SD1 = "3 Put a saved face in any prompt (SD1)"
TWO_PEOPLE = "4 Two people in one picture (SD1)"
LEARN_SDXL = "5 Learn a face and save it (SDXL)"
GENERATE_SDXL = "6 Put a saved face in any prompt (SDXL)"
LEARN_PET = "7 Learn a pet (SD1)"


def all_workflows(specs) -> dict[str, Graph]:
    return {
        QUICK_START: learn_and_generate(specs),
        LEARN_SD1: learn(specs, "sd1"),
        GENERATE_SD1: generate(specs, "sd1"),
        TWO_PEOPLE: two_identities(specs),
        LEARN_SDXL: learn(specs, "sdxl"),
        GENERATE_SDXL: generate(specs, "sdxl"),
        LEARN_PET: learn(specs, "sd1", subject="pet"),
    }


def main() -> None:
    specs = node_specs()
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    for name, graph in all_workflows(specs).items():
        (OUT / f"{name}.json").write_text(json.dumps(graph.ui(), indent=1, ensure_ascii=False) + "\n")
        (OUT / "api" / f"{name}.json").write_text(json.dumps(graph.api(), indent=1, ensure_ascii=False) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
