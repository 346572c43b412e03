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


@pytest.mark.smoke
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
    before = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(photos))  # the photo as a graph's Load Image reads it: from input/
    try:
        image = comfy_nodes.LoadImage().load_image("bob.png")[0]
    finally:
        folder_paths.set_input_directory(before)
    with torch.inference_mode():
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


@pytest.mark.smoke
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


def _photo_kinds(folder):
    """Photos whose decoding differs between hosts or from naive reading: EXIF-rotated JPEG, RGBA, 16-bit grey,
    palette with a transparent colour."""
    from PIL import Image

    rng = np.random.default_rng(5)
    pixels = (rng.random((70, 90, 3)) * 255).astype("uint8")
    pixels[:20, :30] = (250, 20, 20)  # a corner that shows where the rotation put it
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(pixels).save(folder / "rotated.jpg", exif=exif, quality=90)
    alpha = (rng.random((70, 90)) * 255).astype("uint8")
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(folder / "alpha.png")
    Image.fromarray((rng.random((70, 90)) * 65535).astype("uint16")).save(folder / "grey16.png")
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    return ["rotated.jpg", "alpha.png", "grey16.png", "palette.png"]


@pytest.mark.smoke
def test_the_batch_command_reads_a_photo_from_any_folder_as_this_hosts_load_image_does(tmp_path):
    """ComfyUI 0.28 decodes with PyAV (other JPEG pixels, 16-bit read properly) and refuses paths outside input/:
    the batch command gets exactly what Load Image gives a graph on the same host, from any folder."""
    import shutil

    import folder_paths
    from sefi_ide.host.images import read_photo

    import nodes as comfy_nodes

    inputs, elsewhere = tmp_path / "input", tmp_path / "elsewhere"
    inputs.mkdir()
    elsewhere.mkdir()
    before = folder_paths.get_input_directory()
    for name in _photo_kinds(inputs):
        shutil.copy(inputs / name, elsewhere / name)
        folder_paths.set_input_directory(str(inputs))
        try:
            expected = comfy_nodes.LoadImage().load_image(name)[0]
        finally:
            folder_paths.set_input_directory(before)
        got = read_photo(elsewhere / name)
        assert got.shape == expected.shape and torch.equal(got, expected), name
        assert folder_paths.get_input_directory() == before  # ComfyUI's input folder is put back
    assert read_photo(elsewhere / "rotated.jpg").shape[1:3] == (90, 70)  # EXIF rotation applied


@pytest.mark.smoke
def test_relative_folders_damaged_photos_and_replaced_photos(tiny_sd1_path, tmp_path, monkeypatch, caplog):
    """`--photos photos/` is the caller's folder (not ComfyUI's input/); a damaged photo's error names the file and
    the problem; a photo replaced under the same name is learned again, not skipped by its name."""
    from PIL import Image
    from sefi_ide.cli.batch import main

    (tmp_path / "photos").mkdir()
    rng = np.random.default_rng(1)
    face = (rng.random((80, 80, 3)) * 255).astype("uint8")
    Image.fromarray(face).save(tmp_path / "photos" / "Ann Lee.png")
    Image.fromarray(face).save(tmp_path / "whole.jpg")
    (tmp_path / "photos" / "broken.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:600])  # cut short
    monkeypatch.chdir(tmp_path)

    def learn():
        return main(["learn", "--checkpoint", str(tiny_sd1_path), "--photos", "photos", "--out", "out",
                     "--settings", SETTINGS, "--identities-per-pass", "1"])

    assert learn() == 1
    entries = {e["input"]: e for e in _manifest(tmp_path / "out")}
    assert entries["Ann Lee.png"]["status"] == "done", entries["Ann Lee.png"]["error"]
    broken = entries["broken.jpg"]
    assert broken["status"] == "failed" and str(tmp_path / "photos" / "broken.jpg") in broken["error"]
    assert "damaged" in broken["error"], broken["error"]
    first = (tmp_path / "out" / "ann_lee.safetensors").read_bytes()

    assert learn() == 1  # unchanged: skipped
    assert [e["input"] for e in _manifest(tmp_path / "out")][2:] == ["broken.jpg"]
    Image.fromarray(255 - face).save(tmp_path / "photos" / "Ann Lee.png")  # another photo, same name
    assert learn() == 1
    assert [e["input"] for e in _manifest(tmp_path / "out")][3:] == ["Ann Lee.png", "broken.jpg"]
    assert (tmp_path / "out" / "ann_lee.safetensors").read_bytes() != first


@pytest.mark.smoke
def test_an_identity_file_changed_after_rendering_is_rendered_again(tiny_sd1_path, sd1, tmp_path, capsys):
    from helpers import random_identity
    from sefi_ide.cli.batch import main
    from sefi_ide.core.identity import load_identity, save_identity

    clip = sd1[1]
    ids = tmp_path / "ids"
    ids.mkdir()
    save_identity(random_identity(clip, seed=0, placeholder="<ann>"), ids / "ann.safetensors")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "{id} at the beach", "steps": 1, "width": 64, "height": 64}))

    def render():
        return main(["render", "--checkpoint", str(tiny_sd1_path), "--identities", str(ids), "--jobs", str(jobs),
                     "--out", str(tmp_path / "images")])

    assert render() == 0 and "1 done, 0 skipped" in capsys.readouterr().out
    first = (tmp_path / "images" / "ann__0000.png").read_bytes()
    assert render() == 0 and "0 done, 1 skipped" in capsys.readouterr().out
    changed = load_identity(ids / "ann.safetensors")
    changed.k["clip_l"] = changed.k["clip_l"] * -3.0
    save_identity(changed, ids / "ann.safetensors", overwrite=True)
    assert render() == 0 and "1 done, 0 skipped" in capsys.readouterr().out
    assert (tmp_path / "images" / "ann__0000.png").read_bytes() != first
