"""Is the toy world faithful where the method relies on it? The checks of issue 31 item 1, on the built checkpoint.

    python bench/toy_world.py                    # every check on the world-check identities, markdown tables
    python bench/toy_world.py --identities 4     # a quick look

Run on the LAST `--identities` held-out identities of split.json (default 16: numbers 81-96), never the ones the
quality benchmark's tables use, so checking the world decides nothing about them. Each check through ComfyUI's
own loader, CLIP and KSampler:

- the bar: full captions of these identities (random contexts) drawn by KSampler (ddim 20, cfg 4) and read back;
  share of identity and of context attributes right (bar: 0.9), and how many pictures the reader says show no head;
- the reader on generated pictures: subject-less captions ("a photo of a ball, on the left, at night", "a photo, in
  the snow") should give pictures the reader calls head-less, full captions pictures with a head;
- heads: in every cross-attention layer, how far each of SD1's 8 heads' maps are from uniform (a dead head's are
  exactly 1/77 everywhere) over each identity's photo at the middle timestep of the pack's 5 stages;
- word attention: where the words of the reference prompt "a photo of the face of person" (what the attention loss
  holds the identity token to) and of the photo's full caption attend over the photo. Per word: its attention MASS
  (the mean over pixels of its attention probability: how much of the picture's attention it draws) and its SHARE on
  the subject (the part of that mass inside the subject's mask), beside the subject's area (what a word attending
  evenly gets). Means over the active heads only (a head is active when its maps differ from uniform), the
  layers, the 5 stages' middle timesteps and the identities.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import harness
import toy_models as toy

from tools.toy_world.attributes import CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, SUBJECT_PROMPT
from tools.toy_world.reader import Reader, agreement, subject_present
from tools.toy_world.render import render
from tools.toy_world.tokens import load_token_ids, tokenize
from tools.toy_world.world import caption, held_out_identities, sample_scene, scene_caption

STAGES = 5


def check_identities(count: int) -> list[tuple[str, ...]]:
    """The last `count` held-out identities: the world's checks, never the quality tables'."""
    return held_out_identities()[-count:]


def bar(model, clip, vae, reader: Reader, identities, seeds: int) -> str:
    rng = np.random.default_rng(31)
    id_scores, ctx_scores, no_head = [], [], []
    for identity in identities:
        scene = sample_scene(rng, identity)
        images = toy.generate(model, clip, vae, caption(scene.values), None, seed=100, count=seeds)
        for read in reader.read(images):
            no_head.append(not subject_present(read))
            id_scores.append(agreement(read, scene.values, list(IDENTITY_ATTRIBUTES)))
            ctx_scores.append(agreement(read, scene.values, list(CONTEXT_ATTRIBUTES)))
    both = statistics.fmean(id_scores + ctx_scores)
    return ("| full captions of held-out identities | identity attributes | context attributes | all (bar 0.9) "
            "| no head read |\n|---|---|---|---|---|\n"
            f"| {len(identities)} identities x {seeds} seeds | {statistics.fmean(id_scores):.3f} "
            f"| {statistics.fmean(ctx_scores):.3f} | {both:.3f} | {statistics.fmean(no_head):.3f} |")


def generated_presence(model, clip, vae, reader: Reader, count: int) -> str:
    rng = np.random.default_rng(32)
    rows = []
    for kind, subject, has_object in (("object alone", False, True), ("scene alone", False, False),
                                      ("with a subject", True, True)):
        texts = [scene_caption(sample_scene(rng, subject=subject, has_object=has_object)) for _ in range(count)]
        images = torch.cat([toy.generate(model, clip, vae, t, None, seed=200 + i) for i, t in enumerate(texts)])
        present = statistics.fmean(subject_present(r) for r in reader.read(images))
        rows.append(f"| {kind} (\"{texts[0]}\", ...) | {count} | {present:.3f} |")
    return "| captions | pictures | read as showing a head |\n|---|---|---|\n" + "\n".join(rows)


def heads_and_words(model, clip, vae, identities) -> str:
    ids = load_token_ids()
    liveness, area = [], []
    words: dict[str, dict[str, list[float]]] = {}
    for identity in identities:
        scene = toy.photo_scene(identity)
        picture = render(scene)
        photo = toy.image_tensor(picture.image)
        area.append(float(picture.subject_mask.mean()))
        prompts = {"reference prompt": SUBJECT_PROMPT, "full caption": caption(scene.values)}
        for label, text in prompts.items():
            maps = toy.prompt_maps(model, clip, vae, photo, text, STAGES)
            if label == "reference prompt":
                liveness.append(toy.head_liveness(maps))
            tokens = tokenize(text, ids)
            chosen = {"subject word": "face", "subject word ": "person"}  # (a key per word)
            if label == "full caption":  # every value is named by its own word
                chosen |= {a: scene.values[a] for a in (*IDENTITY_ATTRIBUTES, *CONTEXT_ATTRIBUTES)}
            for kind, word in chosen.items():
                mass, share = toy.word_attention(maps, tokens.index(ids[word]), picture.subject_mask)
                key = f"{label}: {kind.strip()} '{word}'" if kind.startswith("subject") else f"{label}: {kind}"
                entry = words.setdefault(key, {"mass": [], "share": []})
                entry["mass"].append(mass)
                entry["share"].append(share)
    live = torch.stack(liveness).amin(0)  # the weakest over identities
    head_lines = ["| cross-attention layer | heads active (largest distance from 1/77 > 1e-4) | weakest head's distance |",
                  "|---|---|---|"]
    for layer, row in enumerate(live):
        head_lines.append(f"| {layer} | {int((row > toy.DEAD_HEAD).sum())} of {len(row)} | {row.min():.4f} |")
    subject_area = statistics.fmean(area)
    word_lines = [f"Subject area (share of the photo the subject's mask covers): {subject_area:.3f}; "
                  + f"uniform mass per token: {1 / 77:.4f}.", "",
                  "| word (prompt: word) | attention mass | attention share on subject | share / area | ± identities |",
                  "|---|---|---|---|---|"]
    for name, entry in words.items():
        share = statistics.fmean(entry["share"])
        spread = statistics.stdev(entry["share"]) if len(entry["share"]) > 1 else 0.0
        word_lines.append(f"| {name} | {statistics.fmean(entry['mass']):.4f} | {share:.3f} | "
                          f"{share / subject_area:.2f} | {spread:.3f} |")
    return "\n".join(head_lines) + "\n\n" + "\n".join(word_lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=16, help="the last N held-out identities of split.json")
    ap.add_argument("--seeds", type=int, default=4, help="pictures per identity for the bar")
    ap.add_argument("--presence", type=int, default=24, help="pictures per caption kind for the reader check")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--trained", type=Path, default=toy.TRAINED, help="the toy checkpoint's trained-weights file")
    ap.add_argument("--checks", default="bar,presence,heads", help="comma-separated: bar, presence, heads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.import_comfy_in_process()
    harness.register_pack_namespace()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    started = time.perf_counter()
    model, clip, vae = toy.load_toy(trained=args.trained)
    reader = Reader() if {"bar", "presence"} & set(args.checks.split(",")) else None
    identities = check_identities(args.identities)
    checks = args.checks.split(",")
    print(f"toy checkpoint {args.trained.name}; {len(identities)} world-check identities (held-out "
          f"{len(held_out_identities()) - len(identities)}..{len(held_out_identities()) - 1}); torch threads "
          f"{torch.get_num_threads()}\n")
    if "bar" in checks:
        print(bar(model, clip, vae, reader, identities, args.seeds) + "\n")
    if "presence" in checks:
        print(generated_presence(model, clip, vae, reader, args.presence) + "\n")
    if "heads" in checks:
        print(heads_and_words(model, clip, vae, identities) + "\n")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
