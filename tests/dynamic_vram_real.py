"""Learning on REAL DynamicVRAM patchers on a CPU, in a process of its own (run by tests/test_dynamic_vram.py; also a
measurement: `COMFYUI_PATH=... python tests/dynamic_vram_real.py CHECKPOINT`, prints one JSON line).

ComfyUI switches DynamicVRAM on in main.py: comfy-aimdo is initialised before `comfy.model_management` is imported
(its host buffers bind the library at import), then `CoreModelPatcher = ModelPatcherDynamic` and `aimdo_enabled`.
This script does the same, so Load Checkpoint's loader makes the host's own `ModelPatcherDynamic` for the MODEL, the
CLIP and the VAE (weights loaded by assignment, comfy-aimdo host buffers), clones stay dynamic, and
`clone(disable_dynamic=True)` / `get_non_dynamic_delegate` re-run the real loader. The one host line bypassed is
`ModelPatcherDynamic.__new__`'s reroute of a CPU load device to a plain `ModelPatcher`: without that bypass no
dynamic patcher exists on a CPU. And the checkpoint is used in float32, the CPU's compute dtype: with comfy-aimdo on,
0.33 loads every model (dynamic or not) in the file's dtype and casts only on the way to a GPU, so an fp16 file
would meet fp32 activations on a CPU. What this cannot show is the GPU side (VRAM buffers, streaming casts):
`bench/dynamic_vram.py` is that check.

Scenario (Load Checkpoint -> learn; a patch node's clone -> learn again; sampling; heat map): per phase, how many times the
checkpoint file is read, how many diffusion models and text encoders are alive as the node returns, and the resident
memory (RSS) before, at the peak during, as the node returns and after handing freed heap pages back; the heat map's
UNet passes on the user's own MODEL; the tokens against learning on a non-dynamic load; the size of one copy.
"""
from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

MIB = 2 ** 20


def switch_dynamic_vram_on() -> None:
    """main.py's start-up switch, on a CPU (see the module)."""
    import comfy_aimdo.control

    if not comfy_aimdo.control.init():
        raise SystemExit("comfy-aimdo's library does not load here")
    harness.import_comfy_in_process()
    import comfy.memory_management
    import comfy.model_patcher as mp

    mp.CoreModelPatcher = mp.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    mp.ModelPatcherDynamic.__new__ = lambda cls, *args, **kwargs: object.__new__(cls)  # no CPU reroute (the gap)


class Peak:
    """The process's largest RSS while the `with` block runs (sampled every 10 ms)."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0

    def rss(self) -> int:
        return self.process.memory_info().rss

    def __enter__(self) -> Peak:  # noqa: PYI034 (a final class of this script)
        self.peak, self.done = self.rss(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def trim() -> None:
    """glibc keeps freed heap pages (its mmap threshold grows up to 32 MiB once large blocks are freed, so a model's
    weights land on the heap): hand them back, so RSS shows what is still held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def alive() -> dict[str, int]:
    """Diffusion models and text encoders alive in the process (the user's own and any copy)."""
    import comfy.model_base
    import comfy.sd1_clip

    objects = gc.get_objects()
    return {"unets": sum(isinstance(o, comfy.model_base.BaseModel) for o in objects),
            "text_encoders": sum(isinstance(o, comfy.sd1_clip.SD1ClipModel) for o in objects)}


def float32_copy(checkpoint: str, folder: str) -> str:
    """The checkpoint with its floating-point tensors in float32 (see the module)."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(checkpoint)
    path = str(Path(folder) / "float32.safetensors")
    safetensors.torch.save_file({k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}, path)
    return path


def main(checkpoint: str, folder: str) -> dict:
    checkpoint = float32_copy(checkpoint, folder)  # before the host is imported: no host code involved
    switch_dynamic_vram_on()
    harness.register_pack_namespace()
    import comfy.sd
    import comfy.utils
    import torch
    from helpers import photo, sample
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.host.heatmap import identity_heatmaps
    from sefi_ide.host.images import prepare_reference
    from sefi_ide.nodes.learn import run_training

    reads = []
    load_torch_file = comfy.utils.load_torch_file

    def counted(path, *args, **kwargs):  # the host's own reader, counted
        reads.append(str(path))
        return load_torch_file(path, *args, **kwargs)

    comfy.utils.load_torch_file = counted
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
    out = {"classes": [type(p).__name__ for p in (model, clip.patcher, vae.patcher)],
           "dynamic": [model.is_dynamic(), clip.patcher.is_dynamic(), vae.patcher.is_dynamic()],
           "phases": {}}
    settings = TrainSettings(steps=2, resolution=64, color_jitter=0.0, flip_p=0.0, scale_min=1.0, scale_max=1.0,
                             placeholder="<alice>")
    state = {"model": model, "clip": clip}

    def phase(name: str, work) -> object:
        gc.collect()
        trim()
        before, start = Peak().rss(), len(reads)
        with torch.inference_mode(), Peak() as peak:  # nodes run under inference mode
            result = work()
        after = peak.rss()  # as the node returns: no garbage collection in between
        counts = alive()
        gc.collect()
        trim()
        out["phases"][name] = {"reads": len(reads) - start, "rss_before_mib": before / MIB,
                               "rss_peak_mib": peak.peak / MIB, "rss_after_mib": after / MIB,
                               "rss_after_trim_mib": peak.rss() / MIB, **counts}
        return result

    learned = phase("learn", lambda: run_training(model, clip, vae, photo(), settings).identity)
    phase("clone", lambda: state.update(model=model.clone(), clip=clip.clone()))  # what a LoRA / patch node does
    out["clone_dynamic"] = state["model"].is_dynamic() and state["clip"].patcher.is_dynamic()
    phase("learn again", lambda: run_training(state["model"], state["clip"], vae, photo(), settings))
    positive = state["clip"].encode_from_tokens_scheduled(state["clip"].tokenize("a photo of a person"))
    phase("sampling", lambda: sample(state["model"], state["clip"], positive))  # the dynamic MODEL's own load
    reference = prepare_reference(photo(), None, 64)[0]
    passes = []  # UNet passes on the user's own (dynamic) MODEL
    hook = state["model"].model.diffusion_model.register_forward_pre_hook(lambda *_: passes.append(1))
    phase("heat map", lambda: identity_heatmaps(state["model"], state["clip"], vae, reference, learned))
    hook.remove()
    out["heat_map_passes_on_the_users_model"] = len(passes)
    # the copy learned on holds the checkpoint's weights: the tokens a non-dynamic load learns
    with torch.inference_mode():
        plain = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True,
                                                      disable_dynamic=True)[:3]
        expected = run_training(*plain, photo(), settings).identity
    # what one copy holds: a non-dynamic load's UNet and text encoder
    out["copy_mib"] = sum(t.numel() * t.element_size() for m in (plain[0].model, plain[1].cond_stage_model)
                          for t in [*m.parameters(), *m.buffers()]) / MIB
    out["tokens_max_diff"] = max((getattr(learned, t)[e] - getattr(expected, t)[e]).abs().max().item()
                                 for t in ("k", "v") for e in learned.k)
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(main(sys.argv[1], tmp)))
