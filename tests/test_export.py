"""Identities as textual-inversion embeddings (issue 25 §2) on the real host: ComfyUI's own CLIP Text Encode reads
`embedding:NAME` from the exported file and builds exactly the conditioning the export promises; the file has the
keys, shapes and dtype the A1111 and kohya loaders take; the identity file is never touched; existing embeddings are
not overwritten silently; a failed write leaves no file. Plus node search aliases (issue 25 §3)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import CLOSE, random_identity, run_prompt
from sefi_ide.core.errors import SeFiError

pytestmark = pytest.mark.usefixtures("comfy_host")

TEXT = "a photo of {} at the beach, smiling"
WIDTHS = {"sd1": {"clip_l": 768}, "sdxl": {"clip_l": 768, "clip_g": 1280}}


@pytest.fixture(scope="module")
def host_embeddings(comfy_host, tmp_path_factory):
    """The host's `embeddings` models folder, pointed at a fresh folder for this module (as extra_model_paths.yaml
    would point it)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("embeddings")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(folder_paths.folder_names_and_paths, "embeddings",
                      ([str(folder)], folder_paths.supported_pt_extensions))
        yield folder


@pytest.fixture(scope="module")
def clips(host_embeddings, tiny_sd1_path):
    """CLIPs whose tokenizers read `embedding:NAME` from the host's embeddings folder, built as CheckpointLoaderSimple
    builds them (same weights as the `sd1` / `sdxl` fixtures)."""
    import comfy.sd
    import folder_paths
    import tiny_models

    folders = folder_paths.get_folder_paths("embeddings")
    with torch.inference_mode():
        sd1 = comfy.sd.load_checkpoint_guess_config(str(tiny_sd1_path), output_vae=False, output_clip=True,
                                                    output_model=False, embedding_directory=folders)[1]
        sdxl = tiny_models.random_text_encoder("sdxl", 1, embedding_directory=folders, num_hidden_layers=3,
                                               intermediate_size=512)
    return {"sd1": sd1, "sdxl": sdxl}


def _export(identity, name, overwrite=False):
    from sefi_ide.nodes.export import ExportIDEmbeddingAsTextualInversion

    return ExportIDEmbeddingAsTextualInversion().export(identity, name, overwrite)


def promised_token(identity) -> dict[str, torch.Tensor]:
    """What the docs promise the embedding holds: per text encoder, the mean of the K tokens over the stages."""
    return {enc: identity.k[enc].float().mean(0) for enc in identity.k}


@pytest.mark.smoke
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_embedding_in_a_plain_clip_text_encode_gives_the_conditioning_the_export_promises(clips, host_embeddings,
                                                                                          family):
    from sefi_ide.host.text import encode_variants, inject, mark_prompt

    import nodes as comfy_nodes

    clip = clips[family]
    ident = random_identity(clip, seed=3)  # every stage's K and V a different word: the mean is none of them
    out = _export(ident, f"alice_{family}")
    assert out["result"] == (f"embedding:alice_{family}",)
    assert (host_embeddings / f"alice_{family}.safetensors").is_file()
    token = promised_token(ident)

    text = TEXT.format(f"embedding:alice_{family}")
    # ComfyUI's tokenizer put exactly the promised vector in the placeholder's place, per text encoder
    for key, chunks in clip.tokenize(text).items():
        injected = [t[0] for t in chunks[0] if torch.is_tensor(t[0])]
        assert len(injected) == 1 and torch.equal(injected[0].float(), token[f"clip_{key}"]), key
    with torch.inference_mode():
        (cond, extra), = comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
        plain = comfy_nodes.CLIPTextEncode().encode(clip, TEXT.format(ident.init_word))[0][0][0]
        marked = mark_prompt(clip, TEXT.format("<alice>"), ["<alice>"])
        expected, pooled = encode_variants(clip, [inject(marked, {"<alice>": token})])
    assert cond.shape == expected.shape
    assert torch.allclose(cond.float(), expected.float(), **CLOSE)
    assert torch.allclose(extra["pooled_output"].float(), pooled.float(), **CLOSE)
    assert not torch.allclose(cond, plain, **CLOSE)  # the embedding was picked up, not skipped


def a1111_reads(data: dict) -> tuple[int, int]:
    """(vectors, width) as A1111's EmbeddingDatabase.load_from_file takes a safetensors file
    (modules/textual_inversion/textual_inversion.py): 'string_to_param', else SDXL 'clip_g' + 'clip_l', else exactly
    one tensor (2-D, or 1-D = one vector)."""
    if "string_to_param" in data:
        raise AssertionError("not written by the export")
    if "clip_g" in data and "clip_l" in data:
        assert data["clip_g"].shape[0] == data["clip_l"].shape[0]
        return data["clip_g"].shape[0], data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    assert len(data) == 1, "embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    emb = emb.unsqueeze(0) if emb.ndim == 1 else emb
    return emb.shape[0], emb.shape[-1]


def kohya_reads(data: dict, sdxl: bool) -> list[torch.Tensor]:
    """The text encoders' rows as kohya's sd-scripts take them (gen_img: SD1 the first tensor, SDXL 'clip_l' and
    'clip_g'; each 2-D (vectors, width))."""
    rows = [data["clip_l"], data["clip_g"]] if sdxl else [next(iter(data.values()))]
    assert all(r.ndim == 2 and r.shape[0] == rows[0].shape[0] for r in rows)
    return rows


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_file_loads_in_the_shapes_a1111_and_kohya_expect(clips, host_embeddings, family):
    from safetensors import safe_open
    from safetensors.torch import load_file

    ident = random_identity(clips[family], seed=4)
    _export(ident, f"shapes_{family}")
    path = host_embeddings / f"shapes_{family}.safetensors"
    data = load_file(str(path))
    expected = {"sd1": {"emb_params": (1, 768)}, "sdxl": {"clip_l": (1, 768), "clip_g": (1, 1280)}}[family]
    assert {k: tuple(t.shape) for k, t in data.items()} == expected
    assert all(t.dtype == torch.float32 for t in data.values())
    assert a1111_reads(data) == (1, {"sd1": 768, "sdxl": 2048}[family])
    rows = kohya_reads(data, family == "sdxl")
    token = promised_token(ident)
    assert [tuple(r.shape) for r in rows] == [(1, w) for w in WIDTHS[family].values()]
    assert all(torch.equal(r[0], token[enc]) for r, enc in zip(rows, WIDTHS[family]))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["sefi_placeholder"] == "<alice>" and meta["sefi_family"] == family
    assert meta["sefi_vector"] == "mean of K over stages"


def test_export_reads_the_identity_only_and_never_overwrites_silently(clips, host_embeddings, tmp_path):
    from sefi_ide.core.identity import load_identity, save_identity

    clip = clips["sd1"]
    identity_file = save_identity(random_identity(clip, seed=5), tmp_path / "alice.safetensors",
                                  include_generator=False)
    before = identity_file.read_bytes()
    ident = load_identity(identity_file)
    k, v = ident.k["clip_l"].clone(), ident.v["clip_l"].clone()
    _export(ident, "")  # empty name: the placeholder's word
    path = host_embeddings / "alice.safetensors"
    assert identity_file.read_bytes() == before
    assert torch.equal(ident.k["clip_l"], k) and torch.equal(ident.v["clip_l"], v)

    first, stamp = path.read_bytes(), path.stat().st_mtime_ns
    _export(ident, "alice")  # the same contents again: left as it is, no error
    assert path.read_bytes() == first and path.stat().st_mtime_ns == stamp
    other = random_identity(clip, seed=6)
    with pytest.raises(SeFiError, match="'alice.safetensors' already exists.*overwrite"):
        _export(other, "alice")
    assert path.read_bytes() == first
    _export(other, "alice", overwrite=True)
    assert path.read_bytes() != first
    assert not [p.name for p in host_embeddings.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("name", ["two words", "(alice)", "alice,bob", "alice:1.2", "../alice", "sub/alice", ".alice",
                                  "-alice", "a" * 201])
def test_bad_embedding_names_are_refused_with_a_message(clips, host_embeddings, name):
    before = sorted(host_embeddings.iterdir())
    with pytest.raises(SeFiError, match="embedding name"):
        _export(random_identity(clips["sd1"]), name)
    assert sorted(host_embeddings.iterdir()) == before


def test_no_identity_or_per_use_options_are_refused(clips, host_embeddings):
    from sefi_ide.nodes.options import IDEmbeddingOptions

    with pytest.raises(SeFiError, match="No identity connected"):
        _export(None, "nobody")
    weaker = IDEmbeddingOptions().configure(random_identity(clips["sd1"]), 0.5)[0]
    with pytest.raises(SeFiError, match="ID Embedding Options"):
        _export(weaker, "weaker")
    bracket_only = random_identity(clips["sd1"], placeholder="<>")
    with pytest.raises(SeFiError, match="Enter a name"):
        _export(bracket_only, "")
    assert not [p for p in host_embeddings.iterdir() if p.stem in ("nobody", "weaker")]


def test_a_failed_write_keeps_the_old_embedding_and_leaves_no_partial_file(clips, host_embeddings, monkeypatch):
    from sefi_ide.core import identity as identity_module

    _export(random_identity(clips["sd1"], seed=7), "kept")
    path = host_embeddings / "kept.safetensors"
    original = path.read_bytes()
    real_write = identity_module._write_safetensors  # the one atomic writer of identities and embeddings

    def write_half_then_fail(target, tensors, metadata):
        real_write(target, tensors, metadata)
        with open(target, "r+b") as f:
            f.truncate(40)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(identity_module, "_write_safetensors", write_half_then_fail)
    with pytest.raises(SeFiError, match="Could not write 'kept.safetensors': No space left"):
        _export(random_identity(clips["sd1"], seed=8), "kept", overwrite=True)
    with pytest.raises(SeFiError, match="Could not write 'fresh.safetensors'"):
        _export(random_identity(clips["sd1"], seed=8), "fresh")
    assert path.read_bytes() == original
    assert not [p.name for p in host_embeddings.iterdir() if p.name.startswith((".kept", ".fresh", "fresh"))]


ISSUE_WORDS = {"identity", "face", "person", "textual inversion", "embedding", "personalization",
               "consistent character"}


def test_every_node_has_search_aliases_with_the_words_people_search_for():
    """ComfyUI's node search matches `search_aliases`, which current servers fill from a classic node's SEARCH_ALIASES
    (server.py node_info: getattr(cls, 'SEARCH_ALIASES', [])): every node of the pack has them."""
    import harness

    pack = harness.load_pack_entry_point("sefi_ide_aliases")
    words: set[str] = set()
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        aliases = getattr(cls, "SEARCH_ALIASES", [])
        assert aliases and all(isinstance(a, str) and a.strip() == a and a for a in aliases), name
        assert {"identity", "face", "person"} <= set(aliases), name
        json.dumps(list(aliases))  # what /object_info sends
        words |= set(aliases)
    assert ISSUE_WORDS <= words, sorted(ISSUE_WORDS - words)
    learn, apply = pack.NODE_CLASS_MAPPINGS["LearnIDEmbedding"], pack.NODE_CLASS_MAPPINGS["ApplyPerStageIDTokens"]
    assert ISSUE_WORDS <= set(learn.SEARCH_ALIASES) and ISSUE_WORDS <= set(apply.SEARCH_ALIASES)


@pytest.fixture
def one_photo(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = (np.random.default_rng(1).random((80, 72, 3)) * 120).astype("uint8")
    pixels[20:60, 15:55] += 120
    Image.fromarray(pixels).save(folder / "Dana Lee.png")
    return folder


def test_batch_command_exports_each_learned_identity(tiny_sd1_path, one_photo, tmp_path, capsys):
    from safetensors.torch import load_file
    from sefi_ide.cli.batch import main
    from sefi_ide.core.identity import load_identity
    from sefi_ide.core.textual_inversion import embedding_tensors

    out, folder = tmp_path / "ids", tmp_path / "emb"
    args = ["learn", "--checkpoint", str(tiny_sd1_path), "--photos", str(one_photo), "--out", str(out), "--settings",
            json.dumps({"steps": 1, "resolution": 64}), "--identities-per-pass", "1", "--export-embeddings",
            str(folder)]
    assert main(args) == 0
    assert "embeddings: 1 in" in capsys.readouterr().out
    identity_bytes = (out / "dana_lee.safetensors").read_bytes()
    written = load_file(str(folder / "dana_lee.safetensors"))
    expected = embedding_tensors(load_identity(out / "dana_lee.safetensors"))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)

    assert main(args) == 0  # a rerun: the identity is skipped, its embedding (same bytes) kept
    assert "0 done, 1 skipped" in capsys.readouterr().out
    (folder / "dana_lee.safetensors").write_bytes(b"someone else")
    assert main(args) == 1  # another file of that name: reported, not overwritten
    assert "embeddings: 0 in" in capsys.readouterr().out
    assert (folder / "dana_lee.safetensors").read_bytes() == b"someone else"
    assert main([*args, "--overwrite-embeddings"]) == 0
    assert load_file(str(folder / "dana_lee.safetensors")).keys() == {"emb_params"}
    assert (out / "dana_lee.safetensors").read_bytes() == identity_bytes


def _save_sd1_identity(server, placeholder: str, file_name: str, seed: int):
    """A small random SD1 identity, saved in the server's identity folder for Load ID Embedding; returned."""
    from sefi_ide.core.identity import Identity, save_identity

    g = torch.Generator().manual_seed(seed)
    ident = Identity(family="sd1", placeholder=placeholder, init_word="person",
                     k={"clip_l": torch.randn(5, 768, generator=g) * 0.02},
                     v={"clip_l": torch.randn(5, 768, generator=g) * 0.02})
    save_identity(ident, server["base"] / "models" / "sefi_identities" / file_name, include_generator=False)
    return ident


@pytest.mark.server
@pytest.mark.smoke
def test_export_node_over_http_feeds_clip_text_encode(server):
    from sefi_ide.core.identity import save_identity

    ident = _save_sd1_identity(server, "<erin>", "erin_http.safetensors", seed=0)
    export = {"load": {"class_type": "LoadIDEmbedding", "inputs": {"identity_file": "erin_http.safetensors"}},
              "export": {"class_type": "ExportIDEmbeddingAsTextualInversion",
                         "inputs": {"identity": ["load", 0], "name": "", "overwrite": False}}}
    entry = run_prompt(server, export)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["export"]["text"] == ["erin.safetensors -> write embedding:erin in a prompt"]
    assert (server["base"] / "models" / "embeddings" / "erin.safetensors").is_file()

    # a plain graph: the server's own checkpoint loader and CLIP Text Encode read embedding:erin
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd1.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of embedding:erin and embedding:nobody",
                                                           "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
    }
    entry = run_prompt(server, graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = server["log"].read_text()
    assert "embedding:nobody does not exist" in log  # the host reports embeddings it cannot find ...
    assert "embedding:erin does not exist" not in log  # ... and found ours

    ident.k["clip_l"] += 0.01  # another identity under a name that exists: refused with the pack's message
    save_identity(ident, server["base"] / "models" / "sefi_identities" / "erin_other.safetensors",
                  include_generator=False)
    export["load"]["inputs"]["identity_file"] = "erin_other.safetensors"
    export["export"]["inputs"]["name"] = "erin"
    entry = run_prompt(server, export)
    assert entry["status"]["status_str"] == "error"
    message = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")["exception_message"]
    assert "'erin.safetensors' already exists" in message

    import requests

    info = requests.get(f"{server['url']}/object_info/ExportIDEmbeddingAsTextualInversion", timeout=30).json()
    for section in info["ExportIDEmbeddingAsTextualInversion"]["input"].values():
        for inp, spec in section.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), inp


def _cached_nodes(entry: dict) -> set[str]:
    """The nodes the host took from its cache instead of running (its 'execution_cached' message)."""
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


@pytest.mark.server
def test_export_node_writes_again_when_its_file_was_deleted_or_changed(server):
    """Issue 32 item 4: the same inputs with the exported file as written are taken from the host's cache; the
    file deleted or changed makes the host run the export again (every time: the newer hosts' caches keep older
    results), which rewrites it, or refuses another file when overwrite is off."""
    _save_sd1_identity(server, "<gus>", "gus_rerun.safetensors", seed=9)
    path = server["base"] / "models" / "embeddings" / "gus_rerun.safetensors"

    def run(overwrite: bool) -> tuple[dict, bool]:
        graph = {"load": {"class_type": "LoadIDEmbedding", "inputs": {"identity_file": "gus_rerun.safetensors"}},
                 "export": {"class_type": "ExportIDEmbeddingAsTextualInversion",
                            "inputs": {"identity": ["load", 0], "name": "gus_rerun", "overwrite": overwrite}}}
        entry = run_prompt(server, graph)
        return entry, "export" in _cached_nodes(entry)

    entry, cached = run(True)
    assert entry["status"]["status_str"] == "success" and not cached, entry["status"]
    written = path.read_bytes()
    assert run(True)[1]  # unchanged: nothing to do
    for _ in range(2):  # deleted, twice: exported again each time
        path.unlink()
        entry, cached = run(True)
        assert entry["status"]["status_str"] == "success" and not cached and path.read_bytes() == written
        assert run(True)[1]
    path.write_bytes(b"changed by hand")
    entry, cached = run(True)
    assert entry["status"]["status_str"] == "success" and not cached and path.read_bytes() == written
    assert run(True)[1]

    assert not run(False)[1]  # another input value: runs (the file is the same: kept)
    assert run(False)[1]
    path.write_bytes(b"someone else")
    entry, _ = run(False)
    assert entry["status"]["status_str"] == "error"  # overwrite off: the other file is reported, not kept silently
    message = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")["exception_message"]
    assert "'gus_rerun.safetensors' already exists" in message and path.read_bytes() == b"someone else"
