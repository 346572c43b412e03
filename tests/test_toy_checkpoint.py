"""The trained toy checkpoint of world v2 is faithful where the method relies on it (issue 31 item 1), through
ComfyUI's own loader, CLIP, UNet and KSampler: every attention head attends, the subject words mark the subject,
pictures without a subject come out without one (and the reader says so), and full captions are drawn.

On the world-check identities (the last held-out identities of split.json, which no quality table uses); the bars
sit below what bench/toy_world.py measured on 16 of them (docs/toy-world.md) with room for other CPUs. About a
minute on one CPU thread once the checkpoint is built.

The committed checkpoint (5000 steps from scratch; docs/toy-world.md "The committed checkpoint") keeps every head
alive, draws no head for subject-less captions, its subject words mark the subject with a quarter of the attention
there, and full captions read back 0.979 on 16 world-check identities (issue 31's bar: 0.9).
"""
from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
import toy_models as toy

from tools.toy_world.attributes import SUBJECT_PROMPT
from tools.toy_world.reader import Reader, agreement, subject_present
from tools.toy_world.render import render
from tools.toy_world.tokens import load_token_ids, tokenize
from tools.toy_world.world import caption, held_out_identities, sample_scene, scene_caption

IDENTITIES = held_out_identities()[-3:]  # world-check identities
LIVE_HEAD = 0.01  # every head's maps differ from uniform (1/77) somewhere by at least this
SUBJECT_WORD_RATIO = 2.0  # 'face' / 'person' share of attention on the subject, at least this x the subject's area
FULL_CAPTION_BAR = 0.85  # attributes read back from full captions (chance: 0.31; this checkpoint: 0.97 here, 0.979
# on 16 world-check identities; issue 31's bar 0.9 is checked there, by bench/toy_world.py)
NO_HEAD_BAR = 5  # of 6 pictures of subject-less captions read as showing no head, at least


@pytest.fixture(scope="module")
def toy_world(comfy_host):
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, clip, vae = toy.load_toy()
    return model, clip, vae


@pytest.fixture(scope="module")
def reference_maps(toy_world) -> list[tuple[list, np.ndarray]]:
    """Per identity: the reference prompt's maps over its photo (every layer, the 5 stages' middle timesteps), its
    subject mask."""
    out = []
    for identity in IDENTITIES:
        picture = render(toy.photo_scene(identity))
        out.append((toy.prompt_maps(*toy_world, toy.image_tensor(picture.image), SUBJECT_PROMPT), picture.subject_mask))
    return out


def test_every_attention_head_of_every_cross_attention_layer_attends(reference_maps):
    """World v1 had 6 of SD1's 8 heads dead (zero q/k/v): their maps were exactly 1/77 everywhere."""
    for maps, _ in reference_maps:
        live = toy.head_liveness(maps)
        assert live.shape == (3, 8)
        assert (live > LIVE_HEAD).all(), f"heads whose maps are (nearly) uniform: {live}"


@pytest.mark.parametrize("word", ["face", "person"])
def test_the_subject_words_of_the_reference_prompt_attend_on_the_subject(reference_maps, word):
    """What the attention loss holds the identity token to: in world v2 "face" and "person" stand only where a head
    is drawn, so they mark it (v1: "person" attended the subject no more than a word attending evenly)."""
    index = tokenize(SUBJECT_PROMPT).index(load_token_ids()[word])
    ratios = []
    for maps, mask in reference_maps:
        _, share = toy.word_attention(maps, index, mask)
        ratios.append(share / mask.mean())
    assert statistics.fmean(ratios) >= SUBJECT_WORD_RATIO, f"'{word}': share / subject area {ratios}"


def test_subject_less_captions_draw_no_head_full_captions_draw_what_they_say(toy_world):
    model, clip, vae = toy_world
    reader = Reader()
    rng = np.random.default_rng(5)
    empty = [scene_caption(sample_scene(rng, subject=False, has_object=i % 2 == 0)) for i in range(6)]
    read = reader.read(torch.cat([toy.generate(model, clip, vae, text, None, seed=i) for i, text in enumerate(empty)]))
    no_head = sum(not subject_present(r) for r in read)
    assert no_head >= NO_HEAD_BAR, f"{no_head} of 6 pictures of {empty} read as head-less"

    scenes = [sample_scene(rng, identity) for identity in IDENTITIES]
    read = reader.read(torch.cat([toy.generate(model, clip, vae, caption(s.values), None, seed=9, count=2)
                                  for s in scenes]))
    assert all(subject_present(r) for r in read)
    share = statistics.fmean(agreement(r, s.values) for r, s in zip(read, [s for s in scenes for _ in range(2)]))
    assert share >= FULL_CAPTION_BAR, f"only {share:.2f} of the attributes full captions name were drawn"
