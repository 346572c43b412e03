"""The method on a TRAINED model (issue 24 item 6): in the toy world (tools/toy_world/, docs/toy-world.md) a held-out
identity learned from one picture through the Learn node's code looks like its subject in ComfyUI's KSampler, and
the rest of the prompt still works. Every other test runs on random weights; this one fails when learning stops
carrying the subject (a broken step, loss, routing or token injection), which random weights cannot show.

About 3 minutes on one CPU thread (the 290 MB toy checkpoint is built into the cache on first use).

Runs on world v1's checkpoint (toy_sd1_v1.safetensors, bag-of-words text encoder, margins measured there) until the
quality test of world v2 (issue 31 item 5: the pack's default settings guarded, margins over several identities)
replaces it.
"""
from __future__ import annotations

import statistics

import pytest
import torch
import toy_models as toy

from tools.toy_world.attributes import identity_values
from tools.toy_world.reader import Reader, agreement
from tools.toy_world.world import caption, held_out_identities, trained_identities

# A held-out identity that neither the benchmark's table (the first 8) nor its tuning (trained identities) uses, and
# whose attributes the init word alone draws rarely (round face, pale skin, pink afro, blue eyes, freckles: 0.19 of
# them in 8 pictures of "a photo of the face of person, ..."), so that "beats the init word" has room to show.
IDENTITY_INDEX = 62
IDENTITY = held_out_identities()[IDENTITY_INDEX]
STEPS, LR = 150, 0.02  # short: the test's budget, not the pack's default (400 steps at 0.005)
# λ = 0: per-stage K/V tokens learned by L_LDM alone. In the toy model the init word "person" attends OFF the subject
# (it is in every training caption, so it says nothing; bench/quality.py --word-attention: 0.19 of its attention on
# a subject covering 0.25 of the picture), and the face-wise attention loss, which holds the identity token's maps to
# the init word's, keeps it off the face too: with the paper's λ the identity gain is real but small in this world
# (docs/toy-world.md). What λ does is tested where it is defined (test_training_mechanism, test_mechanism).
ATTN_LAMBDA = 0.0
PROMPTS, SEEDS = 3, 4
# measured on this identity: see the assertions' messages; the margins leave room for other CPUs and thread counts
IDENTITY_MARGIN = 0.2  # learned identity score minus the init word's, at least
PROMPT_FLOOR = 0.6  # learned prompt score, at least (the floor of the init word alone is ~0.8-1.0)


@pytest.fixture(scope="module")
def toy_world(comfy_host):
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, clip, vae = toy.load_toy(trained=toy.TRAINED_V1)
    return model, clip, vae, Reader()


def _scores(toy_world, identity, contexts) -> tuple[float, float]:
    """Mean (identity score, prompt score) over the prompts for `contexts` x SEEDS pictures."""
    model, clip, vae, reader = toy_world
    values = identity_values(IDENTITY)
    pairs = []
    for context in contexts:
        images = toy.generate(model, clip, vae, toy.prompt_text(values, context, identity), identity, seed=1000,
                              count=SEEDS)
        pairs += toy.scores(reader, images, {**values, **context})
    return statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)


def test_the_toy_checkpoint_draws_what_a_full_caption_says_through_comfyuis_ksampler(toy_world):
    """The world's own bar (item 2), through ComfyUI's loader and KSampler rather than the trainer's sampler."""
    model, clip, vae, reader = toy_world
    scenes = [toy.photo_scene(i) for i in trained_identities()[:: 300]]
    read = reader.read(torch.cat([toy.generate(model, clip, vae, caption(s.values), None, seed=3) for s in scenes]))
    share = statistics.fmean(agreement(r, s.values) for r, s in zip(read, scenes))
    assert share >= 0.8, f"only {share:.2f} of the attributes a full caption names were drawn"


def test_a_held_out_identity_learned_from_one_picture_looks_like_its_subject_and_keeps_the_prompt(toy_world):
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.nodes.learn import run_training

    model, clip, vae, _ = toy_world
    _, _, photo, contexts = toy.photo_and_prompts(IDENTITY, PROMPTS, key=IDENTITY_INDEX)
    settings = TrainSettings(steps=STEPS, lr=LR, attn_lambda=ATTN_LAMBDA, resolution=128, placeholder=toy.PLACEHOLDER,
                             seed=0)
    learned = run_training(model, clip, vae, photo, settings).identity

    floor_identity, floor_prompt = _scores(toy_world, toy.init_word_identity(clip), contexts)
    identity_score, prompt_score = _scores(toy_world, learned, contexts)
    report = (f"learned: identity {identity_score:.2f}, prompt {prompt_score:.2f}; init word alone: identity "
              f"{floor_identity:.2f}, prompt {floor_prompt:.2f}")
    print(report)  # shown with pytest -rP
    assert identity_score >= floor_identity + IDENTITY_MARGIN, f"the identity was not learned ({report})"
    assert prompt_score >= PROMPT_FLOOR, f"the learned identity overrides the prompt ({report})"
