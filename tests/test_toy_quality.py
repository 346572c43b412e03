"""The pack's default on a TRAINED model (issue 31 item 5): in the toy world v2 (tools/toy_world/, docs/toy-world.md)
an identity learned from one picture with the pack's default settings (5 stages, K/V split, λ 0.003, option 3, the
reference pass in the training batch, 400 steps at lr 0.005) keeps its cross-attention near the reference word's but
not pinned to it, carries more of the subject than the init word alone and leaves the rest of the prompt working in
ComfyUI's KSampler; beside it λ = 0, whose maps drift from the reference's.

Every other test runs on random weights; these fail when the attention loss stops doing its job on a trained model or
the learned token overrides the prompt, which random weights cannot show. The measures:
- attention gap: how far the learned prompt's cross-attention maps (all 77 columns, the loss layers, each stage's
  middle timestep, over the photo) are from the reference prompt's; computed by tests/toy_models.py on its own, not
  through core.losses. With λ ignored, the reference and target rows swapped or the loss reading another token column
  it grows to λ = 0's (24-26 here); with λ x 100 it shrinks to a fifth (0.20: the tokens pinned to the init word);
- identity and prompt scores: the reader's share of the identity attributes and of the asked context drawn.

Margins: measured over the 4 trained identities of bench/quality.py --pool trained on the committed 5000-step
checkpoint, one thread (docs/toy-world.md "The default guarded in CI", bench/RESULTS.md block Q); the test takes the
first identity of that pool's fixed order, not one picked by its score. Here, one thread: the default's gap 1.04
(identity 0.61 against the init word's 0.25, prompt 0.83), λ = 0's 50.0. About 8 minutes on one CPU thread.

What is not asserted: likeness beyond λ = 0 (over the 4 identities the default is level with it: -0.015, behind in 3)
or a prompt score near the init word's (the default 0.875 against 1.000: the learned token carries some of the photo's
context, docs/toy-world.md).
"""
from __future__ import annotations

import statistics

import pytest
import toy_models as toy

from tools.toy_world.attributes import identity_values
from tools.toy_world.reader import Reader

PROMPTS, SEEDS = 3, 2
# margins from bench/quality.py over the 4 trained identities on the committed 5000-step file, one thread (see the
# module docstring); each leaves room for other CPUs and thread counts
GAP_CEILING = 6.0  # the default's attention gap, at most: measured 0.41-1.04 (2 learning seeds); λ = 0's 26-36 (400
# steps) and 50-89 (150 steps at lr 0.02); λ ignored, the rows swapped or another token column 23 or more here
GAP_FLOOR = 0.35  # ... and at least: λ x 100 pins the maps to the reference's (0.05-0.32; this identity 0.20). Thin:
# the default's smallest gap (0.41) is 1.3x λ x 100's largest; on this identity and seed 1.04 against 0.20
LIKENESS_FLOOR = 0.15  # the default's identity score minus the init word's, at least: measured +0.25 to +0.54 over 2
# learning seeds (this identity's test pictures +0.36); λ x 100 -0.06 to +0.09 (here +0.22)
LAMBDA0_STEPS, LAMBDA0_LR = 150, 0.02  # λ = 0 learns faster at a higher lr: the budget's run, not the default
LAMBDA0_GAP_FLOOR = 6.0  # λ = 0's gap, at least (the attention loss is what closes it)
PROMPT_FLOOR = 0.5  # learned prompt score, at least (the default 0.75-0.96, λ = 0 here 0.75-1.00; the init word 1.00)


@pytest.fixture(scope="module")
def toy_world(comfy_host):
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, clip, vae = toy.load_toy()
    return model, clip, vae, Reader()


@pytest.fixture(scope="module")
def subject():
    """(identity attributes, photo, contexts) of the trained pool's first identity."""
    identity = toy.tuning_identities()[0]
    _, _, photo, contexts = toy.photo_and_prompts(identity, PROMPTS, key=0)
    return identity, photo, contexts


@pytest.fixture(scope="module")
def init_word_scores(toy_world, subject) -> tuple[float, float]:
    """(identity, prompt) scores of the init word alone: the reports' reference, drawn once."""
    return _scores(toy_world, subject, toy.init_word_identity(toy_world[1]))


def _settings(**changes):
    from sefi_ide.core.settings import TrainSettings

    return TrainSettings(resolution=128, placeholder=toy.PLACEHOLDER, seed=0, **changes)


def _scores(toy_world, subject, learned) -> tuple[float, float]:
    """Mean (identity score, prompt score) over the prompts x SEEDS pictures."""
    model, clip, vae, reader = toy_world
    identity, _, contexts = subject
    values = identity_values(identity)
    pairs = []
    for context in contexts:
        images = toy.generate(model, clip, vae, toy.prompt_text(values, context, learned), learned, seed=1000,
                              count=SEEDS)
        pairs += toy.scores(reader, images, {**values, **context})
    return statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)


def _learn_and_measure(toy_world, subject, init_word_scores, settings) -> tuple[float, float, float, str]:
    """(attention gap, identity score's gain over the init word, prompt score, report) of an identity learned with
    `settings`."""
    from sefi_ide.nodes.learn import run_training

    model, clip, vae, _ = toy_world
    _, photo, _ = subject
    learned = run_training(model, clip, vae, photo, settings).identity
    gap = toy.attention_gap(model, clip, vae, photo, learned, settings)
    identity_score, prompt_score = _scores(toy_world, subject, learned)
    floor_identity, floor_prompt = init_word_scores
    report = (f"λ {settings.attn_lambda}: attention gap {gap:.3f}, identity {identity_score:.2f}, prompt "
              f"{prompt_score:.2f}; init word alone: identity {floor_identity:.2f}, prompt {floor_prompt:.2f}")
    print(report)  # shown with pytest -rP
    return gap, identity_score - floor_identity, prompt_score, report


def test_the_default_carries_the_subject_holds_its_attention_to_the_references_and_keeps_the_prompt(
        toy_world, subject, init_word_scores):
    gap, gain, prompt_score, report = _learn_and_measure(toy_world, subject, init_word_scores, _settings())
    assert gap <= GAP_CEILING, f"the attention loss did not hold the maps to the reference's ({report})"
    assert gap >= GAP_FLOOR, f"the attention loss pinned the maps to the reference's: λ too strong ({report})"
    assert gain >= LIKENESS_FLOOR, f"the learned identity carries little more of the subject than the init word ({report})"
    assert prompt_score >= PROMPT_FLOOR, f"the learned identity overrides the prompt ({report})"


def test_lambda_0s_attention_drifts_from_the_references_and_the_prompt_is_kept(toy_world, subject, init_word_scores):
    settings = _settings(attn_lambda=0.0, steps=LAMBDA0_STEPS, lr=LAMBDA0_LR)
    gap, _, prompt_score, report = _learn_and_measure(toy_world, subject, init_word_scores, settings)
    assert gap >= LAMBDA0_GAP_FLOOR, f"without the attention loss the maps stayed at the reference's ({report})"
    # no likeness assertion: this budget's λ = 0 gained +0.14 to +0.50 over the init word on the 4 trained identities,
    # and the default's test already asserts that learning carries the subject
    assert prompt_score >= PROMPT_FLOOR, f"the learned identity overrides the prompt ({report})"
