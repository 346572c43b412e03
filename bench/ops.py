"""Torch ops dispatched in one training step, on the tiny test models, on any CPU: the host-work proxy of issue 14.

    python bench/ops.py --family sd1 --identities 1,8

On a fast GPU the step is bound by the host issuing work, which grows with the number of dispatched ops, not with
their size; the count is exact and the same on every machine (timings are not). Counts the second step (the first
also builds caches); "host checks" are the ops that test tensors element by element on the host in the old
gradient check (`eq`, `ne`, `where`, `isfinite`) and `.item()`-like reads (`_local_scalar_dense`).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CHECKS = ("eq", "ne", "where", "isfinite", "_local_scalar_dense")


def count_step(family: str, identities: int) -> Counter[str]:
    import harness

    harness.register_pack_namespace()
    harness.import_comfy_in_process()
    import comfy.sd
    import tiny_models
    from helpers import OpCounter, photo
    from sefi_ide.core import training
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    with torch.inference_mode():
        if family == "sd1":
            path = tiny_models.tiny_sd1_checkpoint(seed=0)
            model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        else:
            model, clip, vae = tiny_models.tiny_sdxl(seed=0)
    settings = TrainSettings(resolution=64, steps=2, placeholder="<p0>")
    image, _ = prepare_reference(photo(), None, 64)
    jobs = [training.IdentityJob(image, replace(settings, seed=i, placeholder=f"<p{i}>")) for i in range(identities)]
    counter, step = OpCounter(), training._train_step

    def second_step_counted(*args, **kwargs):
        if args[4] != 1:  # the step index
            return step(*args, **kwargs)
        with counter:
            return step(*args, **kwargs)

    training._train_step = second_step_counted
    try:
        with torch.inference_mode(), training_scope():
            training.train_identities(ComfyTrainingBackend(model, clip, vae, settings), jobs)
    finally:
        training._train_step = step
    return counter.ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    ap.add_argument("--identities", default="1,8", help="comma-separated identity counts")
    args = ap.parse_args()
    print(f"| model | identities | ops per step | {' | '.join(CHECKS)} |")
    print("|---|---|---|" + "---|" * len(CHECKS))
    for n in (int(x) for x in args.identities.split(",")):
        ops = count_step(args.family, n)
        print(f"| {args.family} tiny 64px | {n} | {sum(ops.values())} | {' | '.join(str(ops[c]) for c in CHECKS)} |")


if __name__ == "__main__":
    main()
