"""Host cost of the training step's gradient passes: full-depth SD1.4 / SDXL UNets and text encoders at a
tiny width.

    python bench/overhead.py --family sd1
    python bench/overhead.py --family sdxl --pairs 5

On a fast GPU the training loop is bound by the host issuing work (Python, dispatch, kernel launches), not
by the GPU (bench/RESULTS.md, profile of block C). That cost grows with the number of torch calls, not with
their size, so it is measured here with every block, layer and op of the real architectures (UNet: all
blocks, channels 32 / 64, context 64; text encoders: all 12 / 12+32 layers, width 64), where each op costs
almost nothing: on any CPU, in one run, as ratios.

For the UNet pass (forward + backward to the K/V contexts) and the text-encoder pass (forward + backward to
the injected token rows), interleaved, median of --pairs:
  - per-call aliasing: training_scope's TorchFunctionMode aliases the inference weights on every torch call
    (how every gradient pass ran before `grad_pass`);
  - swapped once per pass: `grad_pass` (the default);
  - the floor: the same pass on an ordinary (non-inference) copy of the weights: nothing to alias.
Adds dated rows to the host-cost table of bench/RESULTS.md (section D).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from run import FULL_SD1_UNET, FULL_SDXL_UNET, NARROW_WIDTH, device_name, prepare_host, record_row, sync

NARROW_CONTEXT = 64
NARROW_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "projection_dim": 64}
POOLED_WIDTH = 1280  # SDXL's pooled text width (part of the 2816-wide `y`)
OVERHEAD_TABLE = "| date | device | pass |"  # header of the RESULTS.md table (section D) rows go to
VARIANTS = ("per-call aliasing (before)", "swapped once per pass", "floor: ordinary weights")


def _built(inference: bool, build: Callable, module_of: Callable):
    with torch.inference_mode(inference):
        host_object = build()
    module_of(host_object).requires_grad_(False)  # the floor computes no weight gradients either
    return host_object


def unet_passes(family: str, batch: int) -> dict[str, Callable[[], None]]:
    """One UNet gradient pass per variant, through the training backend's UNetPass."""
    import comfy.model_management as mm
    import tiny_models
    from sefi_ide.attention_patch.layers import cross_attention_layers, select_layers
    from sefi_ide.host.backend import UNetPass

    config = dict(FULL_SD1_UNET if family == "sd1" else FULL_SDXL_UNET)
    config.update(model_channels=NARROW_WIDTH[family], context_dim=NARROW_CONTEXT)
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    pooled = torch.randn(batch, POOLED_WIDTH, generator=gen) if family == "sdxl" else None
    context = torch.randn(batch, 77, NARROW_CONTEXT, generator=gen)

    def make(inference: bool) -> Callable[[], None]:
        model = _built(inference, lambda: tiny_models.random_unet_model(family, config), lambda m: m.model)
        mm.load_models_gpu([model])
        unet = UNetPass(model, select_layers(cross_attention_layers(model.model.diffusion_model), "auto"))

        def run() -> None:
            ctx = context.to(unet.device).requires_grad_(True)
            eps_pred, maps = unet(z0, eps, t, ctx, ctx, capture=True, pooled=pooled)
            (eps_pred.float().pow(2).mean() + sum(m.mean() for m in maps)).backward()

        run.module = model.model
        return run

    return _variants(make)


def text_passes(family: str) -> dict[str, Callable[[], None]]:
    """One text-encoder gradient pass per variant (2 rows: K and V), through encode_variants."""
    import tiny_models
    from sefi_ide.host.text import ENCODER_OF_KEY, encode_variants, inject, mark_prompt

    def make(inference: bool) -> Callable[[], None]:
        clip = _built(inference, lambda: tiny_models.random_text_encoder(family, **NARROW_TEXT),
                      lambda c: c.cond_stage_model)
        marked = mark_prompt(clip, "a photo of the face of <id>", ["<id>"])
        encoders = [ENCODER_OF_KEY[k] for k in marked.tokens]

        def run() -> None:
            rows = {enc: torch.randn(2, NARROW_TEXT["hidden_size"], requires_grad=True) for enc in encoders}
            ctx, pooled = encode_variants(clip, [inject(marked, {"<id>": {e: r[i] for e, r in rows.items()}})
                                                 for i in range(2)])
            (ctx.float().pow(2).mean() + (0 if pooled is None else pooled.float().pow(2).mean())).backward()

        run.module = clip.cond_stage_model
        return run

    return _variants(make)


def _variants(make: Callable[[bool], Callable[[], None]]) -> dict[str, Callable[[], None]]:
    """The three variants; run them inside one training_scope (as the training loop does)."""
    from sefi_ide.host.grad_scope import per_call_aliasing

    host_pass, plain_pass = make(True), make(False)

    def per_call() -> None:
        with per_call_aliasing(host_pass.module):
            host_pass()

    # the floor's ordinary weights need no swap; grad_pass still lifts the mode: plain PyTorch
    return dict(zip(VARIANTS, (per_call, host_pass, plain_pass)))


def measure(passes: dict[str, Callable[[], None]], pairs: int) -> dict[str, float]:
    """Median seconds per pass of each variant, interleaved, each after one warm pass."""
    times: dict[str, list[float]] = {k: [] for k in passes}
    for _ in range(pairs):
        for name, fn in passes.items():
            fn()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    ap.add_argument("--batch", type=int, default=2, help="UNet rows per pass (SD1 default: reference + target)")
    ap.add_argument("--pairs", type=int, default=7, help="interleaved measurements per variant")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (1: the host cost is one thread's work; less noise)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prepare_host()

    from sefi_ide.host.grad_scope import training_scope

    unet, text = unet_passes(args.family, args.batch), text_passes(args.family)
    with training_scope():
        results = {"UNet": measure(unet, args.pairs), "text encoder": measure(text, args.pairs)}
    name = device_name()
    print(f"{name}, {args.family} at full depth, narrow; gradient pass (forward + backward), median of {args.pairs}")
    width = max(len(k) for k in VARIANTS) + 14
    for part, medians in results.items():
        base = medians[VARIANTS[0]]
        for key, med in medians.items():
            print(f"{(part + ': ' + key).ljust(width)}  {med * 1000:8.1f} ms  {med / base:5.2f}x")
    if not args.no_record:
        for part, m in results.items():
            base, fast, floor = (m[k] for k in VARIANTS)
            record_row(OVERHEAD_TABLE, f"| {datetime.date.today()} | {name} | {args.family} narrow, {part} | "
                       f"{base * 1000:.1f} ms | {fast * 1000:.1f} ms ({fast / base:.2f}x) | "
                       f"{floor * 1000:.1f} ms ({floor / base:.2f}x) | "
                       f"`python bench/overhead.py {' '.join(sys.argv[1:])}` |\n")


if __name__ == "__main__":
    main()
