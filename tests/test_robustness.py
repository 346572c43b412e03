"""Failures never corrupt files, mutate the loaded models, or leave the host's grad mode changed."""
from __future__ import annotations

import os
import stat

import pytest
import torch
from helpers import photo, random_identity, sample, state_hash
from sefi_ide.core.errors import SeFiError

pytestmark = pytest.mark.usefixtures("comfy_host")


def test_mismatched_model_and_clip_are_refused_naming_the_supported_families(sd1, sdxl):
    from sefi_ide.host.conditioning import apply_identities
    from sefi_ide.nodes.learn import LearnIDEmbedding

    sdxl_model, sd1_clip = sdxl[0], sd1[1]
    ident = random_identity(sd1_clip)
    with pytest.raises(SeFiError, match=r"Unsupported model.*Stable Diffusion 1.x.*SDXL"), torch.inference_mode():
        apply_identities(sdxl_model, sd1_clip, "a photo of <alice>", [ident])
    with pytest.raises(SeFiError, match="Unsupported model"), torch.inference_mode():
        LearnIDEmbedding().learn(sdxl_model, sd1_clip, sd1[2], photo(), "<alice>", 2, 0)


def test_a_failure_mid_training_leaves_models_and_grad_mode_as_they_were(sd1, tmp_path, monkeypatch):
    import folder_paths
    from sefi_ide.nodes.learn import FaceAttentionLossTrainer

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sefi_identities", ([str(tmp_path)], {".safetensors"}))
    model, clip, vae = sd1
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    before_image = sample(model, clip, positive, steps=3)
    hashes = (state_hash(model.model), state_hash(clip.cond_stage_model))
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    with torch.inference_mode(), pytest.raises(SeFiError, match="single token"):
        # a two-token init word: refused before anything is trained
        FaceAttentionLossTrainer().train(
            model, clip, vae, photo(), "<alice>", 3, 0, "person person", "a photo of the face of {word}", 0.003,
            "3: all 77 token maps (paper's best)", "auto", 5, True, 0.005, 64, 0.2, 0.5, 0.8, 1.2, 1)
    with torch.inference_mode(), pytest.raises(SeFiError, match="diverged at step 1"):
        # λ beyond float32: the loss overflows after the generators and optimiser exist
        FaceAttentionLossTrainer().train(
            model, clip, vae, photo(), "<alice>", 3, 0, "person", "a photo of the face of {word}", 1e300,
            "3: all 77 token maps (paper's best)", "auto", 5, True, 0.005, 64, 0.2, 0.5, 0.8, 1.2, 1)
    assert not list(tmp_path.iterdir())  # nothing trained, so no "last good state" file
    assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == (grad, inference)
    assert (state_hash(model.model), state_hash(clip.cond_stage_model)) == hashes
    assert torch.equal(sample(model, clip, positive, steps=3), before_image)


def test_an_interrupted_save_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from sefi_ide.core import identity as identity_module

    old = random_identity_file = tmp_path / "alice.safetensors"
    ident = identity_module.Identity(family="sd1", placeholder="<alice>", init_word="person",
                                     k={"clip_l": torch.zeros(5, 768)}, v={"clip_l": torch.ones(5, 768)})
    identity_module.save_identity(ident, old)
    original = old.read_bytes()

    def crash_midway(path, tensors, metadata):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(identity_module, "_write_safetensors", crash_midway)
    with pytest.raises(SeFiError, match="Could not save 'alice.safetensors': disk full"):
        identity_module.save_identity(ident, random_identity_file, overwrite=True)
    assert old.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["alice.safetensors"]


@pytest.fixture
def identities_folder(tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sefi_identities", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


@pytest.mark.parametrize("filename,match", [
    ("   ", "empty or starts with a dot"),
    (".safetensors", "empty or starts with a dot"),
    (" sub/.safetensors ", "empty or starts with a dot"),
    ("x" * 300, "300 bytes long; use at most 200"),
])
def test_save_refuses_blank_hidden_and_too_long_names_without_showing_server_paths(sd1, identities_folder, filename,
                                                                                    match):
    from sefi_ide.nodes.files import SaveIDEmbedding

    ident = random_identity(sd1[1])
    with pytest.raises(SeFiError, match=match) as err:
        SaveIDEmbedding().save(ident, filename, False, False)
    assert str(identities_folder) not in str(err.value)
    assert not list(identities_folder.rglob("*"))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_saved_identity_files_get_the_hosts_permissions(sd1, identities_folder, umask, mode):
    from sefi_ide.nodes.files import SaveIDEmbedding

    old = os.umask(umask)
    try:
        SaveIDEmbedding().save(random_identity(sd1[1]), "alice", False, False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((identities_folder / "alice.safetensors").stat().st_mode) == mode


@pytest.mark.parametrize("name", ["attn_lambda", "lr", "color_jitter", "flip_p", "scale_min", "scale_max", "strength"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_float_inputs_are_refused_naming_the_input(sd1, name, value):
    from sefi_ide.nodes.learn import FaceAttentionLossTrainer
    from sefi_ide.nodes.options import IDEmbeddingOptions

    model, clip, vae = sd1
    with pytest.raises(SeFiError, match=f"'{name}' is {value}"):
        if name == "strength":
            IDEmbeddingOptions().configure(random_identity(clip), value)
        else:
            args = {"attn_lambda": 0.003, "lr": 0.005, "color_jitter": 0.2, "flip_p": 0.5, "scale_min": 0.8,
                    "scale_max": 1.2, name: value}
            FaceAttentionLossTrainer().train(model, clip, vae, photo(), "<alice>", 2, 0, "person",
                                             "a photo of the face of {word}", args["attn_lambda"],
                                             "3: all 77 token maps (paper's best)", "auto", 5, True, args["lr"], 64,
                                             args["color_jitter"], args["flip_p"], args["scale_min"],
                                             args["scale_max"], 1)


def test_an_identity_of_the_other_family_is_refused_by_the_heatmap_and_as_resume_from(sd1, sdxl):
    from sefi_ide.nodes.heatmap import IDAttentionHeatmap
    from sefi_ide.nodes.learn import FaceAttentionLossTrainer

    model, clip, vae = sd1
    xl_identity = random_identity(sdxl[1])
    message = "SDXL but the model is Stable Diffusion 1.x"
    with pytest.raises(SeFiError, match=message), torch.inference_mode():
        IDAttentionHeatmap().render(model, clip, vae, photo(), xl_identity, 64, 0)
    with pytest.raises(SeFiError, match=message), torch.inference_mode():
        FaceAttentionLossTrainer().train(model, clip, vae, photo(), "<alice>", 2, 0, "person",
                                         "a photo of the face of {word}", 0.003, "3: all 77 token maps (paper's best)",
                                         "auto", 5, True, 0.005, 64, 0.2, 0.5, 0.8, 1.2, 1, resume_from=xl_identity)
