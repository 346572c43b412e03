"""sefi_batch.py: learn a folder of photos and render jobs without a server, locally and on a local Ray cluster,
with ComfyUI as a library (its checkpoint loader, Load Image, samplers) and the nodes' own code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("comfy_host")
SETTINGS = json.dumps({"steps": 2, "resolution": 64})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three usable photos (one with a name to sanitise) and one blank image that must fail alone."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("Alice.png", "bob.png", "carol smith.png"):
        pixels = (rng.random((80, 72, 3)) * 120).astype("uint8")
        pixels[20:60, 15:55] += 120
        Image.fromarray(pixels).save(folder / name)
    Image.new("RGB", (80, 80), (200, 120, 90)).save(folder / "flat.png")
    return folder


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _learn(tiny_sd1_path, photos, out, *extra):
    from sefi_ide.cli.batch import main

    return main(["learn", "--checkpoint", str(tiny_sd1_path), "--photos", str(photos), "--out", str(out),
                 "--settings", SETTINGS, "--identities-per-pass", "1", *extra])


def test_learn_writes_one_identity_per_photo_records_the_bad_one_and_equals_the_nodes(
        tiny_sd1_path, photos, tmp_path, sd1, monkeypatch, capsys):
    import folder_paths
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.nodes.files import SaveIDEmbedding
    from sefi_ide.nodes.learn import TOKEN_OPTIONS, FaceAttentionLossTrainer

    import nodes as comfy_nodes

    out = tmp_path / "out"
    assert _learn(tiny_sd1_path, photos, out) == 1  # one failure: exit status 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["alice.safetensors", "bob.safetensors",
                                                                 "carol_smith.safetensors"]
    entries = {e["input"]: e for e in _manifest(out)}
    assert {k: e["status"] for k, e in entries.items()} == {"Alice.png": "done", "bob.png": "done",
                                                            "carol smith.png": "done", "flat.png": "failed"}
    assert "blank" in entries["flat.png"]["error"] and entries["Alice.png"]["output"] == "alice.safetensors"
    assert "3 done, 0 skipped (already done), 1 failed" in capsys.readouterr().out

    # the same photo through Load Image + the trainer node + Save ID Embedding gives the same bytes
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sefi_identities", ([str(tmp_path)], {".safetensors"}))
    model, clip, vae = sd1
    d = TrainSettings()
    with torch.inference_mode():
        image = comfy_nodes.LoadImage().load_image(str(photos / "bob.png"))[0]
        ident = FaceAttentionLossTrainer().train(
            model, clip, vae, image, "<bob>", 2, 0, d.init_word, d.reference_prompt, d.attn_lambda,
            next(iter(TOKEN_OPTIONS)), d.layers, d.num_stages, d.kv_split, d.lr, 64, d.color_jitter, d.flip_p,
            d.scale_min, d.scale_max, d.batch_size)[0]
        SaveIDEmbedding().save(ident, "node_bob", False, False)
    assert (tmp_path / "node_bob.safetensors").read_bytes() == (out / "bob.safetensors").read_bytes()

    # a rerun skips everything finished and retries only the failure
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert _learn(tiny_sd1_path, photos, out) == 1
    assert "0 done, 3 skipped (already done), 1 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before
    assert [e["input"] for e in _manifest(out)][4:] == ["flat.png"]


def test_render_makes_prompts_times_identities_with_the_prompt_in_the_png(tiny_sd1_path, photos, tmp_path, capsys):
    from sefi_ide.cli.batch import main

    ids = tmp_path / "ids"
    assert _learn(tiny_sd1_path, photos, ids) == 1
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([json.dumps({"prompt": "a photo of {id} at the beach", "steps": 2, "width": 64,
                                           "height": 64, "seed": 3}),
                               json.dumps({"prompt": "{id} reading a book", "steps": 2, "width": 64, "height": 64}),
                               json.dumps({"prompt": "no placeholder here"})]))
    out = tmp_path / "images"
    assert main(["render", "--checkpoint", str(tiny_sd1_path), "--identities", str(ids), "--jobs", str(jobs),
                 "--out", str(out)]) == 1  # the job without {id} fails, for each identity
    assert "6 done, 0 skipped (already done), 3 failed" in capsys.readouterr().out
    png = Image.open(out / "alice__0000.png")
    assert png.size == (64, 64)
    graph = json.loads(png.text["prompt"])
    assert graph["3"]["inputs"]["text"] == "a photo of <alice> at the beach" and graph["6"]["inputs"]["seed"] == 3
    assert json.loads(png.text["sefi"])["identity"] == "alice.safetensors"
    assert not np.array_equal(np.asarray(png), np.asarray(Image.open(out / "bob__0000.png")))


@pytest.fixture
def local_ray(tmp_path):
    ray = pytest.importorskip("ray")
    marker = tmp_path / "crashed-once"
    # one thread per worker whatever this process has (Ray passes OMP_NUM_THREADS on when it is set)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"SEFI_BATCH_CRASH_ONCE": str(marker),
                                                                            "OMP_NUM_THREADS": "1"}})
    try:
        yield marker
    finally:
        ray.shutdown()


def test_ray_gives_the_same_files_and_retries_a_worker_that_dies(tiny_sd1_path, photos, tmp_path, local_ray):
    """Byte-identical files: the local run uses one thread like each Ray worker (float32 results depend on the thread
    count)."""
    local = tmp_path / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _learn(tiny_sd1_path, photos, local) == 1
    finally:
        torch.set_num_threads(threads)
    distributed = tmp_path / "ray"
    assert _learn(tiny_sd1_path, photos, distributed, "--ray", "local") == 1
    assert local_ray.exists()  # a worker process died mid-task once; Ray restarted it and ran the task again
    for path in local.glob("*.safetensors"):
        assert (distributed / path.name).read_bytes() == path.read_bytes()
    assert sorted((e["input"], e["status"]) for e in _manifest(distributed)) == sorted(
        (e["input"], e["status"]) for e in _manifest(local))
