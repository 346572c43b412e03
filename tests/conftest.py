"""Fixtures: the real ComfyUI host (in-process objects and a live server) and tiny checkpoints."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(comfy_host, tiny_sd1_path, tmp_path_factory):
    """A real ComfyUI server with this pack in custom_nodes and the tiny checkpoint in models/."""
    import requests

    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    os.symlink(harness.PACK_ROOT, base / "custom_nodes" / "ComfyUI-SeFi-IDE")
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(tiny_sd1_path, base / "models" / "checkpoints" / "tiny-sd1.safetensors")
    port = _free_port()
    log = open(base / "server.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
         "--database-url", "sqlite:///:memory:"],
        cwd=comfy_host, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{(base / 'server.log').read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/object_info", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"ComfyUI did not start:\n{(base / 'server.log').read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "base": base, "log": base / "server.log", "pid": proc.pid}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(base / "server.log", ARTIFACTS / "server.log")


def pytest_sessionfinish(session, exitstatus):
    """Collect the tests' ComfyUI model patchers while their modules still exist (at interpreter exit their __del__
    meets half-torn-down modules and prints ignored exceptions)."""
    import gc

    gc.collect()
