"""Host cost of the training step's UNet gradient pass: full-depth SD1.4 / SDXL UNets at a tiny width.

    python bench/overhead.py --family sd1
    python bench/overhead.py --family sdxl --pairs 5

On a fast GPU the training loop is bound by the host issuing work (Python, dispatch, kernel launches), not
by the GPU (bench/RESULTS.md, profile of block C). That cost grows with the number of torch calls, not with
their size, so it is measured here with every block, layer and op of the real architecture at a width
(channels 32 / 64, context 64) where each op costs almost nothing: on any CPU, in one run, as ratios.

Compared, in interleaved pairs (median): the gradient pass through the host's inference-mode weights
  - with per-call aliasing (training_scope's TorchFunctionMode on every torch call),
  - with the weights swapped for aliases once per pass (`grad_pass`, the default),
  - and the floor: the same pass on an ordinary (non-inference) copy of the weights, no scope at all.
Appends a dated row to bench/RESULTS.md (section "Host overhead").
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from run import FULL_SD1_UNET, FULL_SDXL_UNET, NARROW_WIDTH, device_name, prepare_host, sync

NARROW_CONTEXT = 64
POOLED_WIDTH = 1280  # SDXL's pooled text width (part of the 2816-wide `y`)


def narrow_model(family: str, inference: bool):
    import tiny_models

    config = dict(FULL_SD1_UNET if family == "sd1" else FULL_SDXL_UNET)
    config.update(model_channels=NARROW_WIDTH[family], context_dim=NARROW_CONTEXT)
    with torch.inference_mode(inference):
        model = tiny_models.random_unet_model(family, config)
    model.model.requires_grad_(False)  # the floor computes no weight gradients either
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    ap.add_argument("--batch", type=int, default=2, help="UNet rows per pass (SD1 default: reference + target)")
    ap.add_argument("--pairs", type=int, default=9, help="interleaved measurements per variant")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    prepare_host()
    import comfy.model_management as mm
    from sefi_ide.attention_patch.layers import cross_attention_layers, select_layers
    from sefi_ide.host.backend import UNetPass
    from sefi_ide.host.grad_scope import per_call_aliasing, training_scope

    device = mm.get_torch_device()
    host_model, plain_model = narrow_model(args.family, True), narrow_model(args.family, False)
    passes = {}
    for name, model in (("host", host_model), ("plain", plain_model)):
        mm.load_models_gpu([model])
        passes[name] = UNetPass(model, select_layers(cross_attention_layers(model.model.diffusion_model), "auto"))

    B = args.batch
    gen = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(B, 4, 8, 8, generator=gen), torch.randn(B, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (B,), generator=gen)
    pooled = torch.randn(1, POOLED_WIDTH, generator=gen) if args.family == "sdxl" else None
    context = torch.randn(B, 77, NARROW_CONTEXT, generator=gen).to(device)

    def grad_pass(unet: UNetPass) -> float:
        ctx = context.clone().requires_grad_(True)
        sync()
        start = time.perf_counter()
        eps_pred, maps = unet(z0, eps, t, ctx, ctx, capture=True,
                              pooled=None if pooled is None else pooled.expand(B, -1))
        (eps_pred.float().pow(2).mean() + sum(m.mean() for m in maps)).backward()
        sync()
        return time.perf_counter() - start

    def per_call(unet: UNetPass) -> float:
        with per_call_aliasing(unet.model.model):
            return grad_pass(unet)

    def floor() -> float:
        with torch.inference_mode(False), torch.enable_grad():
            return grad_pass(passes["plain"])

    variants = {"per-call aliasing (before)": lambda: per_call(passes["host"]),
                "weights swapped once per pass": lambda: grad_pass(passes["host"]),
                "floor: ordinary weights, no scope": floor}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.pairs):  # interleaved; each measurement after one warm pass in a fresh scope
        for name, fn in variants.items():
            with training_scope() if name != "floor: ordinary weights, no scope" else contextlib.nullcontext():
                fn()
                times[name].append(fn())

    base = statistics.median(times["per-call aliasing (before)"])
    name = device_name()
    print(f"{name}, {args.family} full depth at width {NARROW_WIDTH[args.family]}, batch {B}, "
          f"UNet gradient pass (forward + backward), median of {args.pairs}")
    width = max(len(k) for k in times)
    for key, values in times.items():
        med = statistics.median(values)
        print(f"{key.ljust(width)}  {med * 1000:8.1f} ms  {med / base:6.2f}x")
    if not args.no_record:
        swapped = statistics.median(times["weights swapped once per pass"])
        floor = statistics.median(times["floor: ordinary weights, no scope"])
        line = (f"| {datetime.date.today()} | {name} | {args.family} narrow, batch {B} | {base * 1000:.1f} ms | "
                f"{swapped * 1000:.1f} ms ({swapped / base:.2f}x) | {floor * 1000:.1f} ms ({floor / base:.2f}x) | "
                f"`python bench/overhead.py {' '.join(sys.argv[1:])}` |\n")
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(line)


if __name__ == "__main__":
    main()
