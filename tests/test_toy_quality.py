"""The pack's default on a TRAINED model (issue 31 item 5): in the toy world v2 (tools/toy_world/, docs/toy-world.md)
an identity learned from one picture with the pack's default settings (5 stages, K/V split, λ 0.003, option 3, the
reference pass in the training batch, 400 steps at lr 0.005) keeps its cross-attention near the reference word's and
leaves the rest of the prompt working in ComfyUI's KSampler; beside it λ = 0, whose maps drift from the reference's.

Every other test runs on random weights; these fail when the attention loss stops doing its job on a trained model or
the learned token overrides the prompt, which random weights cannot show. The measures:
- attention gap: how far the learned prompt's cross-attention maps (all 77 columns, the loss layers, each stage's
  middle timestep, over the photo) are from the reference prompt's; computed by tests/toy_models.py on its own, not
  through core.losses. The attention loss is what keeps it small: with λ ignored, the reference and target rows
  swapped or the loss reading another token column it grows to λ = 0's; with λ x 100 on this identity too
  (not on every identity: see docs/toy-world.md);
- identity and prompt scores: the reader's share of the identity attributes and of the asked context drawn.

Margins: measured over several trained identities (bench/quality.py --pool trained, docs/toy-world.md "The default
guarded in CI") on the previous, 6600-step checkpoint, not on the identity used here; the test takes the first
identity of the trained pool's fixed order, not one picked by its score. On the committed 5000-step checkpoint this
identity gives: the default's gap 1.04 (identity 0.61, prompt 0.83), λ = 0's 50.0 (0.56, 0.71), the init word alone
0.25 / 0.96, one thread; so both margins still hold with room (x4, x10). Re-measuring them over 4 trained identities
on this checkpoint is the next step (issue 31). About 7 minutes on one CPU thread.

What neither test asserts: likeness beyond the init word alone or beyond λ = 0. On the 6600-step checkpoint the
default carried little more than the init word (+0.05 over 4 trained identities: its subject words drew almost no
attention mass, and option 3 holds the identity token's mass at theirs); the 5000-step checkpoint's subject words
draw a quarter of the head's attention, and its likeness table is not measured yet.
"""
from __future__ import annotations

import statistics

import pytest
import toy_models as toy

from tools.toy_world.attributes import identity_values
from tools.toy_world.reader import Reader

PROMPTS, SEEDS = 3, 2
# from the measurement over trained identities (see the module docstring); each leaves room for other CPUs
GAP_CEILING = 4.6  # the default's attention gap, at most: on the 6600-step file between the default's (1.6, 2.2,
# 3.0, 4.1 on 4 trained identities; this one 1.6) and λ = 0's (5.2 to 32.9); λ x 100 gave 5.1 here but 2.3 on another
# identity; the 5000-step file: this one 1.04, λ = 0 50.0
LAMBDA0_STEPS, LAMBDA0_LR = 150, 0.02  # λ = 0 learns faster at a higher lr: the budget's run, not the default
LAMBDA0_GAP_FLOOR = 4.6  # λ = 0's gap, at least (the attention loss is what closes it)
PROMPT_FLOOR = 0.3  # learned prompt score, at least (measured 0.38-0.75; the init word alone 0.50-0.63)


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


def _learn_and_measure(toy_world, subject, init_word_scores, settings) -> tuple[float, float, str]:
    """(attention gap, prompt score, report) of an identity learned with `settings`."""
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
    return gap, prompt_score, report


def test_the_default_holds_the_identity_tokens_attention_to_the_references_and_keeps_the_prompt(
        toy_world, subject, init_word_scores):
    gap, prompt_score, report = _learn_and_measure(toy_world, subject, init_word_scores, _settings())
    assert gap <= GAP_CEILING, f"the attention loss did not hold the maps to the reference's ({report})"
    assert prompt_score >= PROMPT_FLOOR, f"the learned identity overrides the prompt ({report})"


def test_lambda_0s_attention_drifts_from_the_references_and_the_prompt_is_kept(toy_world, subject, init_word_scores):
    settings = _settings(attn_lambda=0.0, steps=LAMBDA0_STEPS, lr=LAMBDA0_LR)
    gap, prompt_score, report = _learn_and_measure(toy_world, subject, init_word_scores, settings)
    assert gap >= LAMBDA0_GAP_FLOOR, f"without the attention loss the maps stayed at the reference's ({report})"
    # no likeness assertion: λ = 0's gain over the init word is not stable here (this identity: +0.25 on one thread,
    # 0.00 on two; 4 trained identities on one thread: +0.11 to +0.31), see docs/toy-world.md
    assert prompt_score >= PROMPT_FLOOR, f"the learned identity overrides the prompt ({report})"
