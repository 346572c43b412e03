"""sefi_batch.py: learn a folder of photos and render jobs without a server, locally and on a local Ray cluster,
with ComfyUI as a library (its checkpoint loader, Load Image, samplers) and the nodes' own code."""
from __future__ import annotations

import json
import os
from pathlib import Path

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


# --- reruns: what is redone, what is skipped, and why (issue 32 item 1) ---------------------------------------------

def _reasons(out: str) -> dict[str, str]:
    """The per-item lines a run prints before it starts: '  <input>: <why>' (new items print none)."""
    return dict(line.strip().split(": ", 1) for line in out.splitlines() if line.startswith("  "))


def _stamps(folder, pattern):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern)}


@pytest.fixture
def own_checkpoint(tiny_sd1_path, tmp_path):
    """A copy of the tiny checkpoint this test may touch (the session's copy is shared)."""
    import shutil

    copy = tmp_path / "ckpt" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy2(tiny_sd1_path, copy)  # same bytes and modification time, another path
    return copy


def test_a_learn_rerun_redoes_exactly_the_photos_whose_inputs_changed_and_says_why(
        tiny_sd1_path, own_checkpoint, tmp_path, capsys, monkeypatch):
    """The fingerprint of a learned identity covers the photo, the settings (normalised), the checkpoint (path, size,
    modification time) and the identity file format: changing one redoes exactly the photos it touches; a run
    whose inputs are all the same (settings spelled differently included) skips every photo."""
    from sefi_ide.cli.batch import main
    from sefi_ide.core import identity as identity_module

    photos, out = tmp_path / "photos", tmp_path / "ids"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for name in ("ann.png", "ben.png"):
        Image.fromarray((rng.random((72, 72, 3)) * 255).astype("uint8")).save(photos / name)
    settings = {"steps": 1, "resolution": 64}

    def learn(checkpoint=tiny_sd1_path, **changes) -> dict[str, str]:
        before = _stamps(out, "*.safetensors")
        assert main(["learn", "--checkpoint", str(checkpoint), "--photos", str(photos), "--out", str(out),
                     "--settings", json.dumps({**settings, **changes}), "--identities-per-pass", "1"]) == 0
        text = capsys.readouterr().out
        after = _stamps(out, "*.safetensors")
        rewritten = {name for name in after if before.get(name) != after[name]}
        return {"why": _reasons(text), "rewritten": rewritten, "text": text}

    both = {"ann.safetensors", "ben.safetensors"}
    assert learn()["rewritten"] == both
    run = learn(lr=5e-3, seed=0, token_option=3)  # the defaults spelled out, in another order: the same settings
    assert run["why"] == {"ann.png": "skipped (already done)", "ben.png": "skipped (already done)"}
    assert run["rewritten"] == set() and "0 done, 2 skipped (already done)" in run["text"]

    run = learn(steps=2)
    assert run["why"] == {"ann.png": "redone: settings changed (steps)", "ben.png": "redone: settings changed (steps)"}
    assert run["rewritten"] == both and "2 done, 0 skipped" in run["text"]
    settings["steps"] = 2

    Image.fromarray((rng.random((72, 72, 3)) * 255).astype("uint8")).save(photos / "ann.png")  # another photo
    run = learn()
    assert run["why"] == {"ann.png": "redone: photo changed", "ben.png": "skipped (already done)"}
    assert run["rewritten"] == {"ann.safetensors"}

    (out / "ben.safetensors").unlink()
    run = learn()
    assert run["why"] == {"ann.png": "skipped (already done)", "ben.png": "redone: output file missing"}
    assert run["rewritten"] == {"ben.safetensors"}

    run = learn(own_checkpoint)  # the same weights at another path: another checkpoint for all it knows
    assert set(run["why"].values()) == {"redone: checkpoint changed (path)"} and run["rewritten"] == both
    stat = own_checkpoint.stat()
    os.utime(own_checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # rewritten in place
    run = learn(own_checkpoint)
    assert set(run["why"].values()) == {"redone: checkpoint changed (mtime_ns)"} and run["rewritten"] == both
    assert set(learn(own_checkpoint)["why"].values()) == {"skipped (already done)"}

    monkeypatch.setattr(identity_module, "FORMAT_VERSION", identity_module.FORMAT_VERSION + 1)  # a pack update
    run = learn(own_checkpoint)
    assert set(run["why"].values()) == {"redone: identity file format changed"} and run["rewritten"] == both


def test_a_render_rerun_redoes_exactly_the_images_whose_inputs_changed_and_says_why(
        sd1, tiny_sd1_path, own_checkpoint, tmp_path, capsys, monkeypatch):
    """A rendered image's fingerprint covers the identity file, the job (defaults filled in) and the checkpoint;
    `--identities` relative to the caller's folder is planned as an absolute path (a Ray worker may run
    elsewhere)."""
    from helpers import random_identity
    from sefi_ide.cli.batch import main, plan_render
    from sefi_ide.core.identity import save_identity

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ids").mkdir()
    save_identity(random_identity(sd1[1], seed=0, placeholder="<ann>"), tmp_path / "ids" / "ann.safetensors")
    jobs = tmp_path / "jobs.jsonl"
    job = {"prompt": "{id} at the beach", "steps": 1, "width": 64, "height": 64}

    def render(lines, checkpoint=tiny_sd1_path) -> dict:
        jobs.write_text("\n".join(json.dumps(line) for line in lines))
        before = _stamps(tmp_path / "images", "*.png")
        assert main(["render", "--checkpoint", str(checkpoint), "--identities", "ids", "--jobs", str(jobs),
                     "--out", "images"]) == 0
        after = _stamps(tmp_path / "images", "*.png")
        return {"why": _reasons(capsys.readouterr().out),
                "rewritten": {name for name in after if before.get(name) != after[name]}}

    both = {"ann__0000.png", "ann__0001.png"}
    assert render([job, {**job, "seed": 1}])["rewritten"] == both
    run = render([{**job, "cfg": 7, "sampler": "euler"}, {"seed": 1, **job}])  # same jobs, spelled differently
    assert run["why"] == {"ann.safetensors#0": "skipped (already done)", "ann.safetensors#1": "skipped (already done)"}
    assert run["rewritten"] == set()
    run = render([job, {**job, "seed": 2}])
    assert run["why"] == {"ann.safetensors#0": "skipped (already done)",
                          "ann.safetensors#1": "redone: job changed (seed)"}
    assert run["rewritten"] == {"ann__0001.png"}
    run = render([job, {**job, "seed": 2}], own_checkpoint)
    assert set(run["why"].values()) == {"redone: checkpoint changed (path)"} and run["rewritten"] == both
    save_identity(random_identity(sd1[1], seed=1, placeholder="<ann>"), tmp_path / "ids" / "ann.safetensors",
                  overwrite=True)
    run = render([job, {**job, "seed": 2}], own_checkpoint)
    assert set(run["why"].values()) == {"redone: identity file changed"} and run["rewritten"] == both

    items = plan_render(Path("ids"), jobs, own_checkpoint)
    assert {i.source for i in items} == {str((tmp_path / "ids" / "ann.safetensors").resolve())}


def test_a_manifest_cut_by_a_killed_run_or_edited_by_hand_is_read_without_losing_lines(tmp_path, caplog):
    """A last line cut without its newline does not swallow the next entry; a JSON line without "input" is
    skipped with a warning naming the line."""
    from sefi_ide.cli.batch import Manifest

    good = {"input": "a.png", "sha256": "1", "status": "done", "output": "a.safetensors"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(good) + '\n{"status": "done"}\n[1, 2]\n\n'
                                             '{"input": "b.png", "sha25')
    with caplog.at_level("WARNING", logger="sefi_batch"):
        manifest = Manifest(tmp_path)
    assert set(manifest.last) == {"a.png"}
    warnings = [r.getMessage() for r in caplog.records]
    assert any('line 2 has no "input"' in w for w in warnings) and any('line 3 has no "input"' in w for w in warnings)
    assert any("line 5 is not JSON" in w for w in warnings)

    manifest.record({"input": "c.png", "sha256": "3", "status": "done", "output": "c.safetensors"})
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["input"] == "c.png" and lines[-2] == '{"input": "b.png", "sha25'
    assert set(Manifest(tmp_path).last) == {"a.png", "c.png"}


def test_settings_are_checked_as_the_learn_node_does_and_normalised(comfy_host):
    from sefi_ide.cli.batch import fingerprint, normalised_settings, parse_settings

    assert parse_settings("{}") == {}  # resolution 0 is the family's native size, not an error
    with pytest.raises(ValueError, match="unknown settings \\['stepz'\\]"):
        parse_settings('{"stepz": 3}')
    with pytest.raises(ValueError, match="steps must be 1..100000"):
        parse_settings('{"steps": 0}')
    with pytest.raises(TypeError, match="JSON object"):
        parse_settings("[1]")

    def print_of(settings: dict) -> str:  # what the manifest compares: the canonical JSON's hash
        return fingerprint({"settings": normalised_settings(settings)})

    same = print_of({})
    assert print_of({"steps": 400, "lr": 5e-3, "seed": 0}) == same
    assert print_of({"placeholder": "<x>", "scale_max": 1.2}) == same  # each photo's placeholder is its own
    assert print_of({"flip_p": 1}) == print_of({"flip_p": 1.0}) != same
    assert print_of({"steps": 401}) != same
