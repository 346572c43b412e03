"""Learning with ComfyUI's DynamicVRAM (the default on NVIDIA GPUs from ComfyUI 0.16) against a non-dynamic load,
in one process, with ComfyUI's own checkpoint loader and the pack's learning code.

    COMFYUI_PATH=~/.cache/sefi-ide/comfyui-0.28.0 python bench/dynamic_vram.py --steps 20       # GPU, SD1.4 UNet
    python bench/dynamic_vram.py --arch tiny --steps 2 --resolution 64                          # CPU smoke run

DynamicVRAM is switched on the way ComfyUI's main.py switches it on at start-up (comfy-aimdo initialised for every
GPU, `CoreModelPatcher = ModelPatcherDynamic`), so `load_checkpoint_guess_config` gives dynamic patchers as Load
Checkpoint does in a server; the same file is also loaded with `disable_dynamic=True` (what `--disable-dynamic-vram`
gives). On a CPU DynamicVRAM stays off and both loads are ordinary. Per load: whether the MODEL is dynamic, whether
learning ran on the host's non-dynamic copy (our log line), the fallback warning (`holds inference tensors`), time
per step after a warm-up, peak device memory, the GPU memory once learning has ended (the learning copy released)
and again after one sampling run on the same MODEL (4 euler steps; both as torch's allocated MiB / the device's used
MiB, which counts comfy-aimdo's buffers too); then the learned tokens' largest deviation between the two loads
relative to how far each token moved from the init word. Prints a table and appends rows to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import harness

TABLE = "| date | ComfyUI | device | arch, px, steps | load |"
WARMUP = 2


def enable_dynamic_vram() -> bool:
    """ComfyUI main.py's start-up switch (0.16+: 'DynamicVRAM support detected and enabled'), for this process."""
    if not torch.cuda.is_available():
        return False
    try:
        import comfy_aimdo.control
    except ImportError:
        return False
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    try:
        comfy_aimdo.control.init(simple_vram_headroom=None)
    except TypeError:  # comfy-aimdo 0.4.9
        comfy_aimdo.control.init()
    devices = [d.index for d in mm.get_all_torch_devices()]
    try:
        ok = comfy_aimdo.control.init_devices((d, 0) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(iter(devices))
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(ok)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(record.getMessage())


def learn(checkpoint: Path, disable_dynamic: bool, args) -> dict:
    import inspect

    import comfy.model_management as mm
    import comfy.sd
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope

    extra = {"disable_dynamic": True} if disable_dynamic else {}
    if extra and "disable_dynamic" not in inspect.signature(comfy.sd.load_checkpoint_guess_config).parameters:
        extra = {}  # before 0.16 every load is non-dynamic
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True,
                                                                    output_clip=True, **extra)
    dynamic = bool(getattr(model, "is_dynamic", lambda: False)())
    settings = TrainSettings(steps=WARMUP + args.steps, resolution=args.resolution, placeholder="<bench>")
    image = torch.rand(1, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
    lines = Lines()
    logging.getLogger().addHandler(lines)
    stamps: list[float] = []

    def on_step(step: int, steps: int, record: dict) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode(), training_scope():
            backend = ComfyTrainingBackend(model, clip, vae, settings)
            try:
                identity = train_identity(backend, image, settings, on_step=on_step).identity
                base = backend.base_vectors()
            finally:
                backend.release()  # as the nodes do when learning ends
    finally:
        logging.getLogger().removeHandler(lines)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    after_learning = gpu_memory()
    sample_once(model, clip, args.resolution)
    after_sampling = gpu_memory()
    del model, clip, vae, backend
    mm.unload_all_models()
    mm.soft_empty_cache()
    log = "\n".join(lines.text)
    return {"identity": identity, "base": base, "dynamic": dynamic, "per_step": (stamps[-1] - stamps[WARMUP - 1])
            / args.steps, "peak_mib": peak, "copy": "non-dynamic copy" in log, "fallback": "holds inference" in log,
            "after_learning": after_learning, "after_sampling": after_sampling}


def gpu_memory() -> str:
    """'torch allocated / device used' in MiB ('-' without a GPU): the device's count includes memory outside torch's
    allocator (comfy-aimdo's weight buffers) and other processes'."""
    if not torch.cuda.is_available():
        return "-"
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return f"{torch.cuda.memory_allocated() / 2**20:.0f} / {(total - free) / 2**20:.0f}"


def sample_once(model, clip, resolution: int) -> None:
    """The next thing a workflow does after learning: one short KSampler-style run on the same MODEL and CLIP."""
    import comfy.sample

    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person at the beach"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, resolution // 8, resolution // 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        comfy.sample.sample(model, noise, 4, 5.0, "euler", "normal", positive, negative, latent, seed=0,
                            disable_pbar=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("full", "tiny"), default="full", help="SD1.4-architecture UNet or tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    harness.import_comfy_in_process()
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()  # the harness sets CPU mode for the tests
    harness.register_pack_namespace()
    import tiny_models
    from comfyui_version import __version__ as host_version
    from run import FULL_SD1_UNET, token_deviation

    dynamic_on = enable_dynamic_vram()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "bench.safetensors"
        tiny_models.build_tiny_sd1_checkpoint(checkpoint, seed=0,
                                              unet_config=FULL_SD1_UNET if args.arch == "full" else None)
        results = {"default (DynamicVRAM where on)": learn(checkpoint, False, args),
                   "disable_dynamic=True": learn(checkpoint, True, args)}
    (first, a), (second, b) = results.items()
    deviation = token_deviation(b["identity"], a["identity"], a["base"])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"ComfyUI {host_version}, {device}, DynamicVRAM switched on: {dynamic_on}; {args.arch} SD1, "
          f"{args.resolution} px, {args.steps} steps after {WARMUP}")
    print(f"{'load':32} {'dynamic':>8} {'our copy':>9} {'fallback':>9} {'s/step':>8} {'peak MiB':>9} "
          f"{'after learning':>15} {'after sampling':>15}")
    rows = []
    for load, r in results.items():
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{load:32} {r['dynamic']!s:>8} {r['copy']!s:>9} {r['fallback']!s:>9} {r['per_step']:8.3f} {peak:>9} "
              f"{r['after_learning']:>15} {r['after_sampling']:>15}")
        rows.append(f"| {datetime.date.today().isoformat()} | {host_version} | {device} | {args.arch}, "
                    f"{args.resolution}, {args.steps} | {load} | {r['dynamic']} | {r['copy']} | {r['fallback']} | "
                    f"{r['per_step']:.3f} | {peak} | {r['after_learning']} | {r['after_sampling']} | "
                    f"{deviation:.2e} |")
    print("GPU memory after learning / after sampling: torch allocated MiB / device used MiB")
    print(f"tokens, {second} vs {first}: max |Δ| / moved = {deviation:.2e}")
    if not args.no_record:
        for row in rows:
            append_row(row)


def append_row(row: str) -> None:
    """Add `row` to the DynamicVRAM table of bench/RESULTS.md (made at the end the first time)."""
    path = ROOT / "bench" / "RESULTS.md"
    lines = path.read_text().rstrip("\n").split("\n")
    if not any(line.startswith(TABLE) for line in lines):
        lines += ["", "## DynamicVRAM: learning on ComfyUI's non-dynamic copy (bench/dynamic_vram.py)", "",
                  (f"{TABLE} dynamic | our copy | fallback warning | s/step | peak MiB | GPU MiB after learning "
                   f"(torch / device) | after sampling | tokens max Δ/moved |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    end = next(i for i, line in enumerate(lines) if line.startswith(TABLE)) + 1
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    lines.insert(end + 1, row)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
