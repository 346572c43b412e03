"""Fixtures: the real ComfyUI host (in-process objects and a live server) and tiny checkpoints."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

harness.register_pack_namespace()

ARTIFACTS = harness.PACK_ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def comfy_host() -> Path:
    return harness.import_comfy_in_process()


@pytest.fixture(scope="session")
def tiny_sd1_path(comfy_host) -> Path:
    import tiny_models

    return tiny_models.tiny_sd1_checkpoint(seed=0)


@pytest.fixture(scope="session")
def sd1(tiny_sd1_path):
    """(MODEL, CLIP, VAE) through ComfyUI's own checkpoint loader, loaded as the host would (inference mode)."""
    import comfy.sd
    import torch

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd1_path), output_vae=True,
                                                                    output_clip=True)
    return model, clip, vae


@pytest.fixture(scope="session")
def sdxl(comfy_host):
    """Tiny SDXL-family (MODEL, CLIP, VAE) built through ComfyUI's own classes, as inference tensors."""
    import tiny_models
    import torch

    with torch.inference_mode():
        return tiny_models.tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def server(comfy_host, tiny_sd1_path, tmp_path_factory):
    """A real ComfyUI server with this pack in custom_nodes and the tiny checkpoint in models/."""
    base = tmp_path_factory.mktemp("comfy-base")
    try:
        with harness.comfy_server(comfy_host, base, {"tiny-sd1.safetensors": tiny_sd1_path}) as running:
            yield running
    finally:
        if (base / "server.log").is_file():
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(base / "server.log", ARTIFACTS / "server.log")


def pytest_sessionfinish(session, exitstatus):
    """Collect the tests' ComfyUI model patchers while their modules still exist (at interpreter exit their __del__
    meets half-torn-down modules and prints ignored exceptions)."""
    import gc

    gc.collect()
