"""Learning on a ComfyUI with DynamicVRAM (0.16+; on by default on NVIDIA GPUs, off on a CPU): gradient passes run
on a non-dynamic copy of the checkpoint made for the run, with `in_training` set; the user's MODEL and CLIP stay as
they were. The first test runs the host's REAL dynamic patchers (`ModelPatcherDynamic` from Load Checkpoint's loader,
DynamicVRAM switched on as main.py does) in a process of its own (tests/dynamic_vram_real.py says how, and the one
host line it bypasses on a CPU). The in-process tests mark clones of a CPU load as dynamic: the host's own
`clone(disable_dynamic=True)` then reloads the checkpoint as ordinary weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import photo, state_hash

STEPS = 2
pytestmark = pytest.mark.smoke


def _settings():
    from sefi_ide.core.settings import TrainSettings

    return TrainSettings(steps=STEPS, resolution=64, color_jitter=0.0, flip_p=0.0, scale_min=1.0, scale_max=1.0,
                         placeholder="<alice>")


def _learn(model, clip, vae, on_step=None):
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    settings = _settings()
    reference, _ = prepare_reference(photo(), None, 64)
    with torch.inference_mode(), training_scope():
        backend = ComfyTrainingBackend(model, clip, vae, settings)
        return backend, train_identity(backend, reference, settings, on_step=on_step).identity


def _has_dynamic_vram() -> bool:
    import comfy.model_patcher

    return hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic")


def _real_dynamic_run(checkpoint: Path) -> dict:
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "dynamic_vram_real.py"), str(checkpoint)],
                            check=False, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_real_dynamic_patchers_one_copy_per_learning_run_released_when_it_ends_none_for_the_heat_map(
        comfy_host, tiny_sd1_path):
    """Load Checkpoint -> learn; a patch node's clone -> learn again; sampling; heat map, on the host's real dynamic
    patchers: each learning run reads the checkpoint once for the MODEL's copy and once for the CLIP's (clones do not start a
    cache of their own), no copy outlives its run (by the objects alive and by resident memory), and the heat map
    reads nothing and runs its passes on the user's own dynamic MODEL."""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI predates DynamicVRAM (0.16)")
    pytest.importorskip("comfy_aimdo")
    run = _real_dynamic_run(tiny_sd1_path)
    assert run["classes"] == ["ModelPatcherDynamic"] * 3 and run["dynamic"] == [True] * 3 and run["clone_dynamic"]
    phases = run["phases"]
    assert {name: p["reads"] for name, p in phases.items()} == {"learn": 2, "clone": 0, "learn again": 2,
                                                                "sampling": 0, "heat map": 0}
    for name, p in phases.items():  # only the user's own UNet and text encoder are left as each node returns
        assert (p["unets"], p["text_encoders"]) == (1, 1), (name, p)
    again = phases["learn again"]  # the first run's numbers include one-time costs (autograd, kernels)
    assert again["rss_peak_mib"] - again["rss_before_mib"] > 0.5 * run["copy_mib"], run  # the copy was there
    assert again["rss_after_trim_mib"] - again["rss_before_mib"] < 0.5 * run["copy_mib"], run  # and it is gone
    assert run["heat_map_passes_on_the_users_model"] > 0
    assert run["tokens_max_diff"] <= 1e-5  # the copy is the checkpoint: the tokens a non-dynamic load learns


def test_a_model_that_streams_its_weights_is_learned_on_the_hosts_ordinary_copy_with_the_same_result(sd1):
    if not _has_dynamic_vram():
        pytest.skip("this ComfyUI predates DynamicVRAM (0.16): see the test below")
    import comfy.model_management as mm

    model, clip, vae = sd1
    dynamic_model, dynamic_clip = model.clone(), clip.clone()
    dynamic_model.is_dynamic = lambda: True  # what a ModelPatcherDynamic answers on a GPU
    dynamic_clip.patcher.is_dynamic = lambda: True
    before = (state_hash(model.model), state_hash(clip.cond_stage_model), dict(dynamic_model.model_options))
    flags = []
    backend, learned = _learn(dynamic_model, dynamic_clip, vae, on_step=lambda *_: flags.append(mm.in_training))

    # the passes ran on the host's non-dynamic copies: other module objects, ordinary patchers
    assert backend.model is not dynamic_model and not backend.model.is_dynamic()
    assert backend.model.model is not model.model
    assert backend.clip.cond_stage_model is backend.clip.patcher.model  # encodes with the copy it loads
    assert backend.clip.cond_stage_model is not clip.cond_stage_model and not backend.clip.patcher.is_dynamic()
    assert flags == [True] * STEPS and mm.in_training is False  # set while learning, restored after
    # the user's objects are as they were (sampling stays dynamic)
    assert dynamic_model.is_dynamic() and dynamic_model.model is model.model
    assert dynamic_clip.cond_stage_model is clip.cond_stage_model
    assert (state_hash(model.model), state_hash(clip.cond_stage_model), dict(dynamic_model.model_options)) == before
    assert all(p.is_inference() for p in model.model.parameters())
    # the copy holds the same weights: the same tokens as learning on the plain model
    _, plain = _learn(model, clip, vae)
    for enc in plain.k:
        assert torch.equal(learned.k[enc], plain.k[enc]) and torch.equal(learned.v[enc], plain.v[enc])


def test_a_model_that_does_not_stream_its_weights_is_learned_as_given(sd1):
    """Every host before 0.16, and 0.16+ on a CPU or with --highvram/--gpu-only/--novram/--disable-dynamic-vram."""
    model, clip, vae = sd1
    backend, _ = _learn(model, clip, vae)
    assert backend.model is model and backend.clip is clip


def test_a_dynamic_model_the_host_cannot_copy_is_refused_with_the_fix(sd1):
    if not _has_dynamic_vram():
        pytest.skip("this ComfyUI predates DynamicVRAM (0.16)")
    from sefi_ide.core.errors import SeFiError

    model, clip, vae = sd1
    dynamic_model = model.clone()
    dynamic_model.is_dynamic = lambda: True
    dynamic_model.cached_patcher_init = None  # a custom loader that registers no reload factory
    with pytest.raises(SeFiError, match="--disable-dynamic-vram"):
        _learn(dynamic_model, clip, vae)
