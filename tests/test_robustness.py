"""Failures never corrupt files, mutate the loaded models, or leave the host's grad mode changed."""
from __future__ import annotations

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
    with pytest.raises(OSError):
        identity_module.save_identity(ident, random_identity_file, overwrite=True)
    assert old.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["alice.safetensors"]
