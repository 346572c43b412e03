"""Does a learned identity look like its subject, and does the rest of the prompt still work? Measured in the toy world.

    python bench/quality.py                                  # 8 held-out identities, every method, the table
    python bench/quality.py --identities 2 --seeds 1 --methods full,init_word   # a quick look
    python bench/quality.py --record                         # also append the table to bench/RESULTS.md

For each held-out identity of the toy world (tools/toy_world/, docs/toy-world.md: never seen by the checkpoint or the
reader), ONE picture is rendered and the identity is learned from it through the nodes' own code (`run_training`,
what Learn ID Embedding and the Face Attention Loss Trainer call) at `resolution=128`; then ComfyUI's KSampler
renders M prompts x K seeds through Apply Per-Stage ID Tokens' code, and the reader reads every picture back:

- identity score: share of the subject's identity attributes (face, skin, hair colour and style, eyes, mark) read
  back as the subject's;
- prompt score: share of the prompt's context attributes (scene, position, object, expression) read back as asked.
  Every prompt asks for a context that differs from the photo's in all four attributes, so copying the photo scores 0;
- attention on subject: share of the placeholder token's attention (loss layers, each stage's middle timestep,
  over the photo) that falls inside the subject's mask (the head without worn or held objects);
- learning time (this machine, wall clock).

Methods (the issue's ablations): the full method; lambda 0; stages 1; no K/V split; plain textual inversion (stages
1, no split, lambda 0); the init word alone (the floor: "person", nothing learned); and the identity spelled out in
words (the ceiling: what the toy model draws when told the six attributes). Scores are means over identities,
prompts and seeds; the spread is the standard deviation over sampling seeds (each seed's mean over all identities
and prompts) and over identities (each identity's mean over prompts and seeds).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import harness

from tools.toy_world.attributes import CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, identity_values
from tools.toy_world.reader import Reader, agreement
from tools.toy_world.render import render
from tools.toy_world.world import caption, held_out_identities, sample_scene

PHOTO_SEED = 2024  # the photos' contexts and jitter; the identities are split.json's held-out list, in order
PROMPT_SEED = 7
SUBJECT = "a photo of the face of {}"
PLACEHOLDER = "<id>"

# name -> TrainSettings changes (None: nothing is learned)
METHODS: dict[str, dict | None] = {
    "full": {},
    "lambda0": {"attn_lambda": 0.0},
    "stages1": {"num_stages": 1},
    "no_kv_split": {"kv_split": False},
    "plain_ti": {"num_stages": 1, "kv_split": False, "attn_lambda": 0.0},
    "init_word": None,
    "words": None,
}
DESCRIPTIONS = {
    "full": "full method (5 stages, K/V split, λ {lam})",
    "lambda0": "λ = 0 (no attention loss)",
    "stages1": "stages = 1",
    "no_kv_split": "no K/V split",
    "plain_ti": "plain textual inversion (1 stage, no split, λ 0)",
    "init_word": "init word alone (floor: \"person\")",
    "words": "identity in words (ceiling)",
}


@dataclass
class Toy:
    model: object
    clip: object
    vae: object
    reader: Reader
    pack: dict  # the pack's modules used here


def load(threads: int | None) -> Toy:
    if threads:
        torch.set_num_threads(threads)
    harness.import_comfy_in_process()
    harness.load_pack_entry_point()
    import comfy.utils
    import toy_models

    comfy.utils.PROGRESS_BAR_ENABLED = False  # KSampler's per-picture bars would drown the log
    model, clip, vae = toy_models.load_toy()
    pack = {name: importlib.import_module(f"sefi_ide_entry.{name}") for name in
            ("nodes.learn", "core.settings", "core.identity", "host.conditioning", "host.heatmap", "host.backend",
             "host.text", "host.grad_scope")}
    return Toy(model, clip, vae, Reader(), pack)


def photo_scene(identity: tuple[str, ...]):
    """The one picture of `identity`: a random context and jitter, fixed by the identity and PHOTO_SEED."""
    key = [PHOTO_SEED] + [list(IDENTITY_ATTRIBUTES[a]).index(v) for a, v in identity_values(identity).items()]
    return sample_scene(np.random.default_rng(key), identity=identity)


def prompt_contexts(photo_context: dict[str, str], count: int, identity_index: int) -> list[dict[str, str]]:
    """`count` contexts that differ from the photo's in every context attribute (fixed by PROMPT_SEED)."""
    rng = np.random.default_rng([PROMPT_SEED, identity_index])
    out = []
    for _ in range(count):
        out.append({a: str(rng.choice([v for v in vals if v != photo_context[a]]))
                    for a, vals in CONTEXT_ATTRIBUTES.items()})
    return out


def image_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float().div(255)[None]  # ComfyUI IMAGE (1, H, W, 3)


def init_word_identity(toy: Toy, num_stages: int = 5):
    """An identity whose every token is the init word's embedding: the prompt then reads exactly '... of person'."""
    e = toy.pack["host.text"].word_embedding(toy.clip, "person")["clip_l"].float().reshape(1, -1)
    Identity = toy.pack["core.identity"].Identity
    return Identity(family="sd1", placeholder=PLACEHOLDER, init_word="person", k={"clip_l": e.repeat(num_stages, 1)},
                    v={"clip_l": e.repeat(num_stages, 1)})


def generate(toy: Toy, text: str, identity, seed: int, count: int, steps: int, cfg: float) -> torch.Tensor:
    """`count` pictures (count, 128, 128, 3) of `text` by ComfyUI's KSampler (ddim, ddim_uniform), with `identity`
    applied through Apply Per-Stage ID Tokens' code, or (identity None) the plain prompt through CLIP Text Encode."""
    import nodes as comfy_nodes

    with torch.inference_mode():
        if identity is None:
            model, positive = toy.model, comfy_nodes.CLIPTextEncode().encode(toy.clip, text)[0]
        else:
            model, positive = toy.pack["host.conditioning"].apply_identities(toy.model, toy.clip, text, [identity])
        negative = comfy_nodes.CLIPTextEncode().encode(toy.clip, "")[0]
        latent = {"samples": torch.zeros(count, 4, 16, 16)}
        out = comfy_nodes.common_ksampler(model, seed, steps, cfg, "ddim", "ddim_uniform", positive, negative,
                                          latent)[0]["samples"]
        return toy.vae.decode(out)


def attention_on_subject(toy: Toy, photo: torch.Tensor, mask: np.ndarray, identity, settings) -> float:
    """Share of the placeholder's attention mass (loss layers, each stage's middle timestep, over the photo) that
    falls inside the subject's mask; mean over stages."""
    ComfyTrainingBackend = toy.pack["host.backend"].ComfyTrainingBackend
    with toy.pack["host.grad_scope"].training_scope():
        backend = ComfyTrainingBackend(toy.model, toy.clip, toy.vae, replace(settings, num_stages=identity.num_stages))
        reference = photo.permute(0, 3, 1, 2)
        with torch.no_grad():
            z0 = backend.latents(reference)
            eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0)).to(z0)
            heats = toy.pack["host.heatmap"].placeholder_attention(backend, z0, eps, identity, reference.shape[-1])
    inside = torch.from_numpy(mask.astype(np.float32))
    return float(((heats * inside).sum((1, 2)) / heats.sum((1, 2))).mean())


def run(args: argparse.Namespace, toy: Toy, log=print) -> list[dict]:
    """Every (identity, method, prompt, seed) picture's scores, as dicts (each identity's also appended to --out as
    JSON lines as soon as it is done)."""
    settings_cls = toy.pack["core.settings"].TrainSettings
    base = settings_cls(steps=args.steps, seed=args.learn_seed, resolution=128, placeholder=PLACEHOLDER,
                        lr=args.lr, attn_lambda=args.attn_lambda)
    rows = []
    for n, identity in enumerate(held_out_identities()[: args.identities]):
        if n % args.shard[1] != args.shard[0]:
            continue
        scene = photo_scene(identity)
        picture = render(scene)
        photo = image_tensor(picture.image)
        photo_context = {a: scene.values[a] for a in CONTEXT_ATTRIBUTES}
        contexts = prompt_contexts(photo_context, args.prompts, n)
        for method in args.methods:
            changes = METHODS[method]
            learn_s = float("nan")
            settings = replace(base, **(changes or {}))
            if changes is not None:
                t = time.perf_counter()
                ident = toy.pack["nodes.learn"].run_training(toy.model, toy.clip, toy.vae, photo, settings).identity
                learn_s = time.perf_counter() - t
            elif method == "init_word":
                ident = init_word_identity(toy)
            else:
                ident = None
            attention = (attention_on_subject(toy, photo, picture.subject_mask, ident, settings)
                         if ident is not None else float("nan"))
            for p, context in enumerate(contexts):
                values = {**identity_values(identity), **context}
                subject = caption(identity_values(identity)) if ident is None else SUBJECT.format(PLACEHOLDER)
                text = caption(context, subject=subject)
                for seed in range(args.seeds):
                    images = generate(toy, text, ident, 1000 + seed, args.per_seed, args.sample_steps, args.cfg)
                    for i, read in enumerate(toy.reader.read(images)):
                        rows.append({
                            "identity": n, "method": method, "prompt": p, "seed": seed, "picture": i,
                            "identity_score": agreement(read, values, list(IDENTITY_ATTRIBUTES)),
                            "prompt_score": agreement(read, values, list(CONTEXT_ATTRIBUTES)),
                            "attention": attention, "learn_s": learn_s, "text": text, "read": read,
                        })
            done = [r for r in rows if r["identity"] == n and r["method"] == method]
            log(f"identity {n} {'/'.join(identity)} {method:12s} identity {mean(done, 'identity_score'):.3f} "
                f"prompt {mean(done, 'prompt_score'):.3f} attention {attention:.3f} learn {learn_s:.0f} s")
            if args.out:
                with open(args.out, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in done)
    return rows


def mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows) if rows else float("nan")


def spread(rows: list[dict], key: str, by: str) -> float:
    """Standard deviation over the groups of `by` of each group's mean of `key` (0 with one group)."""
    groups = sorted({r[by] for r in rows})
    means = [mean([r for r in rows if r[by] == g], key) for g in groups]
    return statistics.stdev(means) if len(means) > 1 else 0.0


def table(rows: list[dict], methods: list[str], attn_lambda: float) -> str:
    head = ("| method | identity score | ± seeds | ± identities | prompt score | ± seeds | ± identities "
            "| attention on subject | learning time (s) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        if not sel:
            continue
        attention = mean([r for r in sel if r["picture"] == 0 and r["prompt"] == 0 and r["seed"] == 0], "attention")
        learn = mean([r for r in sel if r["picture"] == 0 and r["prompt"] == 0 and r["seed"] == 0], "learn_s")
        lines.append(
            f"| {DESCRIPTIONS[m].format(lam=attn_lambda)} | {mean(sel, 'identity_score'):.3f} "
            f"| {spread(sel, 'identity_score', 'seed'):.3f} | {spread(sel, 'identity_score', 'identity'):.3f} "
            f"| {mean(sel, 'prompt_score'):.3f} | {spread(sel, 'prompt_score', 'seed'):.3f} "
            f"| {spread(sel, 'prompt_score', 'identity'):.3f} "
            f"| {'-' if math.isnan(attention) else f'{attention:.3f}'} "
            f"| {'-' if math.isnan(learn) else f'{learn:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=8, help="how many held-out identities (split.json order)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per identity (contexts unlike the photo's)")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds per prompt")
    ap.add_argument("--per-seed", type=int, default=1, help="pictures per sampling seed (one KSampler batch)")
    ap.add_argument("--steps", type=int, default=200, help="learning steps")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--attn-lambda", type=float, default=0.003, help="λ of the methods that use the attention loss")
    ap.add_argument("--learn-seed", type=int, default=0)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="append every picture's scores here (JSON lines)")
    ap.add_argument("--shard", default="0/1", help="i/n: only identities number i, i+n, ... (parallel processes)")
    ap.add_argument("--table-from", type=Path, nargs="*", default=None,
                    help="print the table of these --out files instead of running (merging shards)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")

    args.shard = tuple(int(x) for x in args.shard.split("/"))
    started = time.perf_counter()
    if args.table_from:
        rows = [json.loads(line) for path in args.table_from for line in path.read_text().splitlines() if line]
    else:
        toy = load(args.threads or None)
        rows = run(args, toy)
    text = table(rows, args.methods, args.attn_lambda)
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    header = (f"toy world, {args.identities} held-out identities x {args.prompts} prompts x {args.seeds} seeds x "
              f"{args.per_seed}; learning {args.steps} steps, lr {args.lr}, seed {args.learn_seed}; KSampler ddim "
              f"{args.sample_steps} steps, cfg {args.cfg}; torch threads {torch.get_num_threads()}; "
              f"{time.perf_counter() - started:.0f} s in all" if not args.table_from else
              f"toy world, from {', '.join(str(p) for p in args.table_from)}")
    print(header)
    print(text)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n### Quality in the toy world ({datetime.date.today()}, {os.uname().nodename}, CPU)\n\n"
                    f"`{command}`: {header}.\n\n{text}\n")


if __name__ == "__main__":
    main()
