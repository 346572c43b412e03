"""Learning with ComfyUI's DynamicVRAM (the default on NVIDIA GPUs from ComfyUI 0.16) against
`--disable-dynamic-vram`, on a real ComfyUI server: the same learning graph over HTTP both ways.

    COMFYUI_PATH=~/.cache/sefi-ide/comfyui-0.28.0 python bench/dynamic_vram.py --arch full --steps 40
    python bench/dynamic_vram.py --arch tiny --steps 3 --resolution 64      # CPU smoke run (DynamicVRAM is off)

Per mode: whether the host enabled DynamicVRAM, whether learning ran on the non-dynamic copy (our log line), the
fallback warning (`holds inference tensors`), learning time (a warm-up graph first loads the models), peak device
memory (nvidia-smi, whole device), and the learned tokens' largest deviation between the modes relative to how far
each token moved from the init word. Prints a table and appends a dated row to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import harness

MODES = {"dynamic (default)": (), "--disable-dynamic-vram": ("--disable-dynamic-vram",)}
TABLE = "| date | ComfyUI | device | arch, px, steps | mode |"


class PeakMemory:
    """Peak used memory of GPU 0 (MiB) while the block runs, polled from nvidia-smi; None without one."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], check=False, capture_output=True, text=True,
                                     timeout=5).stdout
                self.peak = max(self.peak or 0, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def learn_graph(steps: int, resolution: int, name: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "bench.safetensors"}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "learn": {"class_type": "FaceAttentionLossTrainer", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["img", 0],
            "placeholder": "<bench>", "steps": steps, "seed": 0, "init_word": "person",
            "reference_prompt": "a photo of the face of {word}", "attn_lambda": 0.003,
            "token_option": "3: all 77 token maps (paper's best)", "layers": "auto", "stages": 5, "kv_split": True,
            "lr": 0.005, "resolution": resolution, "color_jitter": 0.2, "flip_p": 0.5, "scale_min": 0.8,
            "scale_max": 1.2, "batch_size": 1}},
        "save": {"class_type": "SaveIDEmbedding", "inputs": {
            "identity": ["learn", 0], "filename": name, "overwrite": True, "include_generator": False}},
    }


def run_mode(host: Path, checkpoint: Path, flags: tuple, args, tag: str) -> dict:
    from helpers import run_prompt
    from sefi_ide.core.identity import load_identity

    device = () if torch.cuda.is_available() else ("--cpu",)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "input").mkdir()
        pixels = (np.random.default_rng(0).random((args.resolution, args.resolution, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(base / "input" / "face.png")
        with harness.comfy_server(host, base, {"bench.safetensors": checkpoint}, device_args=(*device, *flags)) as s:
            warm = run_prompt(s, learn_graph(1, args.resolution, f"{tag}-warm"), timeout=args.timeout)
            if warm["status"]["status_str"] != "success":
                raise RuntimeError(f"{tag}: the warm-up graph failed: {warm['status']}")
            with PeakMemory() as memory:
                started = time.perf_counter()
                entry = run_prompt(s, learn_graph(args.steps, args.resolution, tag), timeout=args.timeout)
                seconds = time.perf_counter() - started
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"{tag}: the learning graph failed: {entry['status']}")
            log = s["log"].read_text()
            identity = load_identity(base / "models" / "sefi_identities" / f"{tag}.safetensors")
    return {"identity": identity, "seconds": seconds, "peak_mib": memory.peak,
            "host_dynamic": "DynamicVRAM support detected and enabled" in log,
            "copy": "learning on ComfyUI's non-dynamic copy" in log,
            "fallback": "holds inference tensors" in log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("full", "tiny"), default="full", help="SD1.4-architecture UNet or tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    host = harness.import_comfy_in_process()
    harness.register_pack_namespace()
    import comfy.sd
    import tiny_models
    from comfyui_version import __version__ as host_version
    from run import FULL_SD1_UNET, token_deviation
    from sefi_ide.host.text import word_embedding

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "bench.safetensors"
        unet = {**FULL_SD1_UNET, "num_head_channels": -1} if args.arch == "full" else None
        tiny_models.build_tiny_sd1_checkpoint(checkpoint, seed=0, unet_config=unet)
        with torch.inference_mode():
            clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_model=False)[1]
            base = word_embedding(clip, "person")
        results = {mode: run_mode(host, checkpoint, flags, args, f"mode{i}") for i, (mode, flags) in
                   enumerate(MODES.items())}
    (first, a), (_, b) = results.items()
    deviation = token_deviation(b["identity"], a["identity"], base)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"ComfyUI {host_version}, {device}, {args.arch} SD1, {args.resolution} px, {args.steps} steps")
    print(f"{'mode':26} {'host dynamic':>12} {'our copy':>9} {'fallback':>9} {'s/step':>8} {'peak MiB':>9}")
    for mode, r in results.items():
        print(f"{mode:26} {r['host_dynamic']!s:>12} {r['copy']!s:>9} {r['fallback']!s:>9} "
              f"{r['seconds'] / args.steps:8.3f} {r['peak_mib'] if r['peak_mib'] is not None else '-':>9}")
    print(f"tokens, {list(results)[1]} vs {first}: max |Δ| / moved = {deviation:.2e}")
    if not args.no_record:
        today = datetime.date.today().isoformat()
        for mode, r in results.items():
            row = (f"| {today} | {host_version} | {device} | {args.arch}, {args.resolution}, {args.steps} | {mode} | "
                   f"{r['host_dynamic']} | {r['copy']} | {r['fallback']} | {r['seconds'] / args.steps:.3f} | "
                   f"{r['peak_mib'] if r['peak_mib'] is not None else '-'} | {deviation:.2e} |")
            append_row(row)


def append_row(row: str) -> None:
    """Add `row` to the DynamicVRAM table of bench/RESULTS.md (created at the end the first time)."""
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text()
    header = (f"{TABLE} host dynamic | our copy | fallback warning | s/step | peak MiB | tokens max Δ/moved |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    if TABLE not in text:
        text = text.rstrip("\n") + ("\n\n## DynamicVRAM: learning on ComfyUI's non-dynamic copy (bench/dynamic_vram.py)\n\n"
                                    + header)
    lines = text.rstrip("\n").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLE))
    end = start
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines.insert(end + 1, row)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
