"""Finding the ComfyUI host and importing this pack under a fixed name, for the tests.

Host search order (CONTRIBUTING.md): $COMFYUI_PATH; the ComfyUI whose custom_nodes/ holds this pack;
the cached copy that `.ci/setup_env.sh` makes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def _load_bootstrap():
    spec = importlib.util.spec_from_file_location("sefi_bootstrap", PACK_ROOT / "cli" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bootstrap = _load_bootstrap()


def cache_root() -> Path:
    return Path(os.environ.get("SEFI_CACHE", Path.home() / ".cache" / "sefi-ide"))


def find_comfyui() -> Path:
    return _bootstrap.find_comfyui(fallbacks=(cache_root() / "comfyui",))


register_pack_namespace = _bootstrap.register_pack_namespace


def import_comfy_in_process() -> Path:
    """Put the host on sys.path in CPU mode so `comfy.*` imports work inside the test process."""
    host = find_comfyui()
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from comfy.cli_args import args

    args.cpu = True
    return host


def load_pack_entry_point(name: str = "sefi_ide_entry"):
    """Execute the pack's __init__.py as ComfyUI would (package with submodule search path)."""
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def comfy_server(host: Path, base: Path, checkpoints: dict[str, Path]) -> Iterator[dict]:
    """A real ComfyUI server (CPU) whose home is `base`: this pack linked into custom_nodes, `checkpoints`
    (name -> file) linked into models/checkpoints. Yields url, base, log and pid; stops the server on exit."""
    import requests

    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    os.symlink(PACK_ROOT, base / "custom_nodes" / "ComfyUI-SeFi-IDE")
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name, path in checkpoints.items():
        os.symlink(path, base / "models" / "checkpoints" / name)
    port = _free_port()
    log = open(base / "server.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
         str(base), "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
         "--database-url", "sqlite:///:memory:"],
        cwd=host, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
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


def chromium(width: int = 1600, height: int = 1000):
    """A headless Chromium (Selenium) or None when chromium / chromedriver are not installed."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.binary_location = binary
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    browser.set_script_timeout(120)
    return browser


def open_comfyui_page(browser, url: str) -> None:
    """Open the ComfyUI page and wait until its app and graph exist."""
    browser.get(url + "/")
    deadline = time.time() + 120
    while not browser.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
        if time.time() > deadline:
            raise RuntimeError("the ComfyUI page did not start")
        time.sleep(0.5)
    time.sleep(2)


LOAD_GRAPH = """const done = arguments[arguments.length - 1];
window.app.loadGraphData(arguments[0]).then(() => done('ok'), e => done('error: ' + e));"""
