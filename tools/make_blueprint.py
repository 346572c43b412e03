"""Writes the subgraph blueprint `subgraphs/Learn a face and use it.json` with the real frontend: loads template 1 in
the page, converts its learn-and-sample part into a subgraph with the frontend's own `convertToSubgraph`, chooses the
subgraph's inputs and outputs, and serializes it as the frontend's "publish subgraph" does (the format ComfyUI's
/global_subgraphs serves from `custom_nodes/<pack>/subgraphs/*.json`). Run it on the newest host:

    COMFYUI_PATH=~/.cache/sefi-ide/comfyui-0.33.0 ~/.cache/sefi-ide/venv-0.33.0/bin/python tools/make_blueprint.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

NAME = "Learn a face and use it"
OUT = ROOT / "subgraphs" / f"{NAME}.json"
TEMPLATE = ROOT / "example_workflows" / "1 Learn a face and use it at once (SD1).json"
DESCRIPTION = ("Learn a person from one face photo and draw them in a prompt (SeFi-IDE): Learn ID Embedding, Apply "
               "Per-Stage ID Tokens, KSampler and VAE Decode in one node. Connect an SD1.x or SDXL checkpoint's "
               "MODEL/CLIP/VAE and one face photo; write the placeholder in the prompt.")
SEARCH_ALIASES = ["identity", "face", "person", "one photo", "consistent character", "sefi"]
INSIDE = ["LearnIDEmbedding", "CLIPTextEncode", "EmptyLatentImage", "ApplyPerStageIDTokens", "KSampler", "VAEDecode"]
# the blueprint node's inputs in order: (name, [(inner node type, its input)]); widget inputs show as its widgets
INPUTS = [("model", [("LearnIDEmbedding", "model"), ("ApplyPerStageIDTokens", "model")]),
          ("clip", [("LearnIDEmbedding", "clip"), ("ApplyPerStageIDTokens", "clip"), ("CLIPTextEncode", "clip")]),
          ("vae", [("LearnIDEmbedding", "vae"), ("VAEDecode", "vae")]),
          ("face_photo", [("LearnIDEmbedding", "image")]),
          ("placeholder", [("LearnIDEmbedding", "placeholder")]), ("steps", [("LearnIDEmbedding", "steps")]),
          ("prompt", [("ApplyPerStageIDTokens", "text")]), ("negative", [("CLIPTextEncode", "text")]),
          ("seed", [("KSampler", "seed")])]
OUTPUTS = [("images", "VAEDecode", 0), ("identity", "LearnIDEmbedding", 0)]  # (name, inner node type, its output)

BUILD = """
const [inside, inputs, outputs, name, description, aliases] = arguments;
const g = window.app.graph;
const {node, subgraph: sg} = g.convertToSubgraph(new Set(g._nodes.filter(n => inside.includes(n.type))));
for (const input of [...sg.inputs]) sg.removeInput(input);  // named and ordered below instead
for (const output of [...sg.outputs]) sg.removeOutput(output);
const find = type => sg.nodes.find(n => n.type === type);
for (const [label, targets] of inputs) {
  const slots = targets.map(([type, input]) => [find(type), find(type).inputs.find(i => i.name === input)]);
  const added = sg.addInput(label, slots[0][1].type);
  for (const [inner, slot] of slots) added.connect(slot, inner);
}
for (const [label, type, index] of outputs) sg.addOutput(label, find(type).outputs[index].type).connect(
  find(type).outputs[index], find(type));
sg.name = node.title = name;
sg.description = description;
node.pos = [0, 0];
const {nodes, subgraphs} = window.app.canvas._serializeItems([node]);
return {revision: 0, last_node_id: node.id, last_link_id: 0, nodes, links: [], version: 0.4,
        definitions: {subgraphs}, extra: {BlueprintDescription: description, BlueprintSearchAliases: aliases}};
"""


def main() -> None:
    import harness

    browser = harness.chromium()
    if browser is None:
        sys.exit("needs chromium and chromedriver")
    host = harness.find_comfyui()
    with tempfile.TemporaryDirectory() as base, harness.comfy_server(host, Path(base), {}) as server:
        try:
            harness.open_comfyui_page(browser, server["url"])
            assert browser.execute_async_script(harness.LOAD_GRAPH, json.loads(TEMPLATE.read_text())) == "ok"
            blueprint = browser.execute_script(BUILD, INSIDE, INPUTS, OUTPUTS, NAME, DESCRIPTION, SEARCH_ALIASES)
        finally:
            browser.quit()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(blueprint, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
