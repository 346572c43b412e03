"""The toy world (issues 24 and 31): renders, masks, captions, pictures without a subject, the identity split, the
reader, and the pieces of the toy SD1 checkpoint (analytic VAE, slim UNet with all 8 heads, the contextual text
encoder at CLIP-L's scale) checked against ComfyUI's own classes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sefi_ide.tools.toy_world import degrade, vae
from sefi_ide.tools.toy_world.attributes import ATTRIBUTES, IDENTITY_ATTRIBUTES, PHRASES, SUBJECT_PROMPT, Scene
from sefi_ide.tools.toy_world.reader import SUBJECT, Reader, agreement, subject_present
from sefi_ide.tools.toy_world.render import HAIR, LABELS, SKIN, render
from sefi_ide.tools.toy_world.text import ROW_NORM, TextConfig, TextEncoder
from sefi_ide.tools.toy_world.tokens import load_token_ids, tokenize, vocabulary
from sefi_ide.tools.toy_world.unet import COMFY_UNET_CONFIG, HEAD_DIM, SlimConfig, SlimUNet
from sefi_ide.tools.toy_world.world import (
    all_identities,
    caption,
    caption_words,
    held_out_identities,
    make_split,
    sample_scene,
    scene_caption,
    scenes,
    trained_identities,
)

BASE = {"face": "round", "skin": "pale", "hair_colour": "ginger", "hair_style": "short", "eyes": "blue",
        "mark": "freckles", "scene": "snow", "position": "center", "object": "hat", "expression": "smiling"}


def scene(**changes: str) -> Scene:
    return Scene({**BASE, **changes})


def test_same_seed_same_pictures_other_seed_other_pictures():
    a = [render(s) for s in scenes(7, 4)]
    b = [render(s) for s in scenes(7, 4)]
    c = [render(s) for s in scenes(8, 4)]
    assert all(x.image.tobytes() == y.image.tobytes() and x.labels.tobytes() == y.labels.tobytes()
               for x, y in zip(a, b))
    assert any(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, c))
    assert a[0].image.shape == (128, 128, 3) and a[0].image.dtype == np.uint8


def test_every_value_changes_the_picture():
    base = render(scene()).image
    for attribute, values in ATTRIBUTES.items():
        for value in values:
            if value != BASE[attribute]:
                changed = render(scene(**{attribute: value})).image
                assert np.abs(changed.astype(int) - base).sum() > 0, (attribute, value)


def test_labels_say_what_is_drawn():
    r = render(scene(skin="tan", hair_colour="pink", object="hat"))
    # interior pixels (all 8 neighbours share the label) have exactly the label's colour
    lab = r.labels
    same = np.ones_like(lab, bool)
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        same[1:-1, 1:-1] &= lab[1 + dy:lab.shape[0] - 1 + dy, 1 + dx:lab.shape[1] - 1 + dx] == lab[1:-1, 1:-1]
    for label, colour in ((LABELS["skin"], SKIN["tan"]), (LABELS["hair"], HAIR["pink"])):
        inside = same & (lab == label)
        assert inside.sum() > 50
        assert (np.abs(r.image[inside].astype(int) - colour) <= 1).all()


def test_subject_mask_is_the_head_without_worn_or_held_objects():
    for obj in ("hat", "scarf", "ball"):
        r = render(scene(object=obj))
        assert (r.labels == LABELS[obj]).sum() > 100
        assert not r.subject_mask[r.labels == LABELS[obj]].any()
        assert r.subject_mask[r.labels == LABELS["skin"]].all() and r.subject_mask[r.labels == LABELS["eye"]].all()
    # the mask follows the subject: position moves it, hair style grows it
    centres = [np.nonzero(render(scene(position=p)).subject_mask)[1].mean() for p in ("left", "center", "right")]
    assert centres[0] + 15 < centres[1] < centres[2] - 15
    areas = {s: render(scene(hair_style=s, object="scarf")).subject_mask.sum() for s in ("short", "long", "afro")}
    assert areas["short"] < areas["long"] < areas["afro"]


def test_scenes_without_a_subject_draw_no_head_and_their_captions_never_name_one():
    """World v2: "face" and "person" stand only where a head is drawn, so they can mean it."""
    chosen = list(scenes(11, 400, no_subject=0.3))
    without = [s for s in chosen if not s.subject]
    assert 0.2 < len(without) / len(chosen) < 0.4 and any(s.has_object for s in without)
    assert any(not s.has_object for s in without)
    for s in chosen:
        r, words = render(s), set(caption_words(scene_caption(s)))
        assert r.subject_mask.any() == s.subject
        assert ({"face", "person"} <= words) == s.subject and bool({"face", "person"} & words) == s.subject
        drawn_object = {o for o in ("hat", "scarf", "ball") if (r.labels == LABELS[o]).sum() > 50}
        assert drawn_object == ({s.values["object"]} if s.has_object else set()), (s, drawn_object)
        assert scene_caption(s).startswith("a photo")
        assert all(s.values[a] in words for a in s.shown), scene_caption(s)
    alone = next(s for s in without if s.has_object)
    assert scene_caption(alone, omit=["object"]) == f"a photo, {PHRASES['scene'][alone.values['scene']]}"
    # the same seed without subject-less scenes draws world v1's scenes
    assert [s.values for s in scenes(7, 5)] == [s.values for s in scenes(7, 5, no_subject=0.0)]


def test_captions_name_every_attribute_and_omit_what_is_asked():
    values = scene().values
    text = caption(values)
    assert text.startswith(SUBJECT_PROMPT + ", ")
    words = set(caption_words(text))
    for attribute in ATTRIBUTES:
        assert values[attribute] in words, attribute
    short = caption(values, omit=["scene", "hair_colour"], subject="a photo of the face of <x>")
    assert "snow" not in short and "ginger" not in short and "short hair" in short and "<x>" in short


def test_value_words_are_unique_to_their_attribute():
    """A value's word may appear in no other attribute's phrases: each attribute reads from its own word."""
    for attribute, values in ATTRIBUTES.items():
        for value in values:
            others = [p for a, ph in PHRASES.items() if a != attribute for p in ph.values()]
            assert not any(value in caption_words(p) for p in others), (attribute, value)


def test_caption_words_are_single_clip_tokens(comfy_host):
    """Every caption word is one token of CLIP's BPE vocabulary, with the ids tokens.json holds (ComfyUI's own SD1
    tokenizer decides)."""
    import comfy.sd1_clip

    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    ids = load_token_ids()
    assert sorted(ids) == vocabulary()
    texts = [caption(sample_scene(np.random.default_rng(i)).values) for i in range(20)]
    texts += [", ".join(ph.values()) for ph in PHRASES.values()]  # every phrase
    longest = {a: max(v, key=lambda value: len(caption_words(PHRASES[a][value]))) for a, v in ATTRIBUTES.items()}
    texts.append(caption(longest))  # fits in 75 tokens
    for text in texts:
        got = [t[0] for t in tokenizer.tokenize_with_weights(text)["l"][0]]
        assert got == tokenize(text, ids), text
        assert len([t for t in got if t not in (49406, 49407)]) == len(caption_words(text))


def test_held_out_identities_are_unseen_combinations_of_seen_parts():
    held = held_out_identities()
    assert [list(i) for i in held] == make_split()["held_out"], "split.json differs from make_split(): rewrite it"
    trained = trained_identities()
    assert len(held) == 97 and len(trained) + len(held) == len(all_identities()) == 972
    assert not set(held) & set(trained)
    n = len(IDENTITY_ATTRIBUTES)
    pairs = {(a, b, i[a], i[b]) for i in trained for a in range(n) for b in range(a + 1, n)}
    assert all((a, b, i[a], i[b]) in pairs for i in held for a in range(n) for b in range(a + 1, n))


def test_vae_roundtrip_is_the_cell_mean():
    x = torch.rand(2, 3, 16, 16)
    y = degrade.vae_roundtrip(x)
    assert torch.allclose(y[:, :, :8, :8], x[:, :, :8, :8].mean((2, 3), keepdim=True).expand(-1, -1, 8, 8))
    shifted = degrade.shift(x, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(shifted[0, :, :, 2:], x[0, :, :, :-2], atol=1e-5)
    assert torch.allclose(shifted[1, :, 1:], x[1, :, :-1], atol=1e-5)


@pytest.fixture(scope="module")
def reader() -> Reader:
    return Reader()


# Measured on 2000 held-out renders (docs/toy-world.md): the bars leave room for the 150 pictures tested here
READER_BAR_PER_ATTRIBUTE = 0.93
READER_BAR_MEAN = 0.98


READER_BAR_SUBJECT = 0.99  # says whether a head is drawn


@pytest.fixture(scope="module")
def held_out_renders() -> tuple[list[Scene], torch.Tensor]:
    chosen = list(scenes(123, 180, held_out_identities(), no_subject=0.2))
    return chosen, torch.from_numpy(np.stack([render(s).image for s in chosen])).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("degradation", ["clean", "vae"])
def test_reader_reads_held_out_identities_and_says_when_no_subject_is_drawn(reader, held_out_renders, degradation):
    chosen, x = held_out_renders
    if degradation == "vae":
        x = degrade.add_noise(degrade.vae_roundtrip(x), 0.03, torch.Generator().manual_seed(0))
    read = reader.read(x)
    presence = np.mean([subject_present(r) == s.subject for r, s in zip(read, chosen)])
    assert presence >= READER_BAR_SUBJECT, presence
    per_attribute = {a: np.mean([r[a] == s.values[a] for r, s in zip(read, chosen) if a in s.shown])
                     for a in ATTRIBUTES}
    assert min(per_attribute.values()) >= READER_BAR_PER_ATTRIBUTE, per_attribute
    with_subject = [(r, s) for r, s in zip(read, chosen) if s.subject]
    assert np.mean([agreement(r, s.values) for r, s in with_subject]) >= READER_BAR_MEAN, per_attribute


def test_reader_is_not_fooled_by_a_changed_attribute(reader):
    """Changing one attribute changes what is read for it, not the others."""
    base = scene(expression="surprised")
    for attribute in ("hair_colour", "eyes", "scene", "object"):
        other = next(v for v in ATTRIBUTES[attribute] if v != base.values[attribute])
        changed = Scene({**base.values, attribute: other})
        a, b = reader.read(np.stack([render(base).image, render(changed).image]))
        assert a[attribute] == base.values[attribute] and b[attribute] == other, attribute
        assert {k: v for k, v in a.items() if k != attribute} == {k: v for k, v in b.items() if k != attribute}
        assert a[SUBJECT] == b[SUBJECT] == "present"


# --- the toy checkpoint's pieces against ComfyUI ----------------------------------------------------------------------

def test_analytic_vae_through_comfyui_encodes_cell_means_and_decodes_mosaics(comfy_host):
    import comfy.sd

    model = comfy.sd.VAE(sd={k: v.half() for k, v in vae.vae_state_dict().items()})
    assert type(model.first_stage_model).__name__ == "TAESD"
    pictures = torch.from_numpy(np.stack([render(s).image for s in scenes(3, 2)])).float() / 255
    latents = model.encode(pictures)
    expected = vae.encode(pictures.permute(0, 3, 1, 2) * 2 - 1)
    assert latents.shape == (2, 4, 16, 16)
    assert torch.allclose(latents, expected, rtol=2e-3, atol=2e-2)
    assert latents[:, :3].std() > 1 and (latents[:, 3] == 0).all()  # three colour axes; the fourth is unused
    decoded = model.decode(latents)
    mosaic = degrade.vae_roundtrip(pictures.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert (decoded - mosaic).abs().max() < 1.5 / 255


def test_colour_basis_matches_the_world():
    pictures = np.stack([render(s).image for s in scenes(5, 150, trained_identities())]).astype(np.float64)
    cells = (pictures / 127.5 - 1).reshape(-1, 16, 8, 16, 8, 3).mean(axis=(2, 4)).reshape(-1, 3)
    mean, axes, std = vae.colour_basis(cells)
    # whitened: every latent channel but the unused fourth has about unit variance at the UNet's scale
    latents = vae.encode(torch.from_numpy(pictures).permute(0, 3, 1, 2) / 127.5 - 1) * vae.SD1_SCALE
    assert torch.allclose(latents[:, :3].std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), rtol=0.1)
    assert np.allclose(mean, vae.COLOUR_MEAN, atol=0.03) and np.allclose(std, vae.COLOUR_STD, rtol=0.08)
    assert (np.abs((axes * np.array(vae.COLOUR_AXES)).sum(1)) > 0.98).all()


@pytest.mark.parametrize("heads", [8, 2], ids=["v2-all-8-heads", "v1-2-whole-heads"])
def test_slim_unet_exports_to_the_shape_comfyui_loads_and_computes_the_same(comfy_host, heads):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    slim = SlimUNet(SlimConfig(width=80, time_width=160, ff_width=200, heads=heads))
    with torch.no_grad():  # move every weight off its initial value: norms and biases matter too
        for p in slim.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shell = slim.shell_state_dict()
    full = UNetModel(**COMFY_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    full.load_state_dict(shell)  # strict: the same keys and shapes
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 800.0]), torch.randn(2, 77, 768)
    with torch.no_grad():
        expected = slim(x, t, context)
        got = full(x, t, context=context)
    assert expected.abs().max() > 0.1
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    # which of SD1's 8 heads have q and k channels: all of them in v2, 2 in v1 (the other 6 dead)
    for name in ("attn1", "attn2"):
        for part in ("to_q", "to_k"):
            w = shell[f"input_blocks.1.1.transformer_blocks.0.{name}.{part}.weight"]
            live = [bool(w[h * HEAD_DIM:(h + 1) * HEAD_DIM].abs().sum() > 0) for h in range(8)]
            assert sum(live) == heads, (name, part, live)


def test_toy_text_encoder_is_comfyuis_clip_contextual_and_at_clip_scale(comfy_host, tmp_path):
    """The built checkpoint's CLIP, run by ComfyUI, computes what the trainer's slim encoder computes; word order and
    the words before a token change its context (one causal layer, position embeddings); every world word's row has
    CLIP-L's norm."""
    import comfy.sd
    from sefi_ide.tools.toy_world import checkpoint

    torch.manual_seed(0)
    text = TextEncoder(TextConfig(), seed=3)
    with torch.no_grad():  # move every weight off its initial value
        for p in text.parameters():
            p.add_(0.05 * torch.randn_like(p))
    checkpoint.save_trained(tmp_path / "trained.safetensors", SlimUNet(SlimConfig(80, 160, 200)), text)
    path = checkpoint.build_checkpoint(tmp_path / "trained.safetensors", tmp_path / "toy.safetensors")
    prompt = "a photo of the face of person, oval face, at night"
    reordered = "a photo of the face of person, at night, oval face"
    with torch.inference_mode():
        model, clip, loaded_vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        context = clip.encode_from_tokens(clip.tokenize(prompt))[0].float()
        other = clip.encode_from_tokens(clip.tokenize(reordered))[0].float()
        expected = checkpoint.load_trained(tmp_path / "trained.safetensors")[1]([prompt])[0]
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(loaded_vae.first_stage_model).__name__ == "TAESD"
    assert torch.allclose(context, expected, atol=2e-2), (context - expected).abs().max()
    assert torch.allclose(text.rows.norm(dim=-1), torch.full((len(text.ids),), ROW_NORM))
    # no longer a bag of words: the same words in another order give other rows...
    assert (other.sort(0).values - context.sort(0).values).abs().max() > 0.1
    # ...while a causal encoder leaves every token before the first change as it was
    assert torch.allclose(other[:9], context[:9], atol=1e-3)


def test_world_v1_checkpoint_still_builds_as_a_bag_of_words(comfy_host, tmp_path):
    """The v1 file (free rows, no positions, no layer, 2 whole heads) keeps building into what it was trained as."""
    import comfy.sd
    from sefi_ide.tools.toy_world import checkpoint

    torch.manual_seed(0)
    text = TextEncoder(TextConfig.bag_of_words(), seed=3)
    with torch.no_grad():
        text.norm.weight.add_(0.1 * torch.randn(768))
    checkpoint.save_trained(tmp_path / "v1.safetensors", SlimUNet(SlimConfig(80, 160, 200, heads=2)), text)
    path = checkpoint.build_checkpoint(tmp_path / "v1.safetensors", tmp_path / "toy.safetensors")
    with torch.inference_mode():
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
        context = clip.encode_from_tokens(clip.tokenize("a photo of the face of person, oval face, at night"))[0]
        shuffled = clip.encode_from_tokens(clip.tokenize("a photo of the face of person, at night, oval face"))[0]
    assert text.rows.norm(dim=-1).mean() > 20  # free rows: standard normal, about 28 long
    assert torch.allclose(shuffled.float().sort(0).values, context.float().sort(0).values, atol=1e-3)


def test_kept_cross_attention_maps_are_the_ones_the_unet_uses():
    """train.py's localisation term reads the cross-attention maps the UNet keeps: the same output as the fused
    attention, one map per layer, each a distribution over the 77 tokens."""
    torch.manual_seed(0)
    unet = SlimUNet(SlimConfig(40, 80, 160, heads=4))
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 768)
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        fused = unet(x, t, context)
        maps: list[torch.Tensor] = []
        for m in attn2:
            m.kept_probs = maps
        kept = unet(x, t, context)
    assert torch.allclose(kept, fused, atol=1e-5)
    assert len(maps) == len(attn2) and all(m.shape == (2, 4, 256, 77) for m in maps)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 4, 256), atol=1e-5)


def test_localisation_term_is_zero_on_the_subject_and_one_minus_its_share_elsewhere():
    from sefi_ide.tools.toy_world.train import localisation_loss, subject_grid, subject_word_columns

    scene = next(iter(scenes(0, 1, trained_identities())))
    mask = subject_grid(scene, {}, 0)
    expected = torch.from_numpy(render(scene).subject_mask.astype(np.float32)).reshape(16, 8, 16, 8).mean((1, 3))
    assert torch.allclose(mask, expected.flatten())
    columns = subject_word_columns(["face", "person"])
    ids = load_token_ids()
    assert [tokenize(SUBJECT_PROMPT)[c] for c in columns] == [ids["face"], ids["person"]]
    inside = (mask == 1).float()
    on_subject = torch.full((1, 2, 256, 77), 1e-9)
    on_subject[..., columns] = inside[None, None, :, None] / inside.sum()
    assert localisation_loss([on_subject], torch.tensor([0]), mask[None], columns) < 1e-6
    uniform = torch.full((1, 2, 256, 77), 1 / 77)
    spread = localisation_loss([uniform], torch.tensor([0]), mask[None], columns)
    assert torch.isclose(spread, 1 - mask.sum() / 256, atol=1e-6)


def test_grounding_gives_each_caption_word_its_drawn_region():
    """train.py --ground: every value word of a caption is tied to where its thing is drawn (label map pooled to the
    latent grid), the opening's "face" and "person" to the head."""
    from sefi_ide.tools.toy_world.grounding import grounded_words, label_cells

    scene = next(s for s in scenes(3, 50, trained_identities(), no_subject=0.0)
                 if s.values["expression"] != "closed")
    drawn = render(scene)
    cells = label_cells(drawn.labels)
    assert cells.sum(0).eq(64).all()  # every cell's 64 pixels counted once
    ids, tokens = load_token_ids(), tokenize(caption(scene.values))
    grounded = dict(grounded_words(tokens, scene, cells))
    eyes = torch.from_numpy(drawn.labels == LABELS["eye"]).float().reshape(16, 8, 16, 8).mean((1, 3)).flatten()
    assert torch.allclose(grounded[tokens.index(ids[scene.values["eyes"]])], eyes)
    head = torch.from_numpy(drawn.subject_mask).float().reshape(16, 8, 16, 8).mean((1, 3)).flatten()
    for word in ("face", "person"):
        assert torch.allclose(grounded[tokenize(SUBJECT_PROMPT).index(ids[word])], head)
    background = torch.from_numpy(drawn.labels == LABELS["background"]).float().reshape(16, 8, 16, 8).mean((1, 3))
    assert torch.allclose(grounded[tokens.index(ids[scene.values["scene"]])], background.flatten())
    assert {tokens[c] for c in grounded} == {ids[scene.values[a]] for a in ATTRIBUTES} | {ids["face"], ids["person"]}
    subject_only = dict(grounded_words(tokens, scene, cells, attributes=False))  # train.py --ground-subject-only
    assert {tokens[c] for c in subject_only} == {ids["face"], ids["person"]}
    assert all(torch.equal(region, grounded[c]) for c, region in subject_only.items())
    no_subject = next(s for s in scenes(4, 50, trained_identities(), no_subject=1.0) if s.has_object)
    words = grounded_words(tokenize(scene_caption(no_subject)), no_subject, label_cells(render(no_subject).labels))
    assert {tokenize(scene_caption(no_subject))[c] for c, _ in words} == {
        ids[no_subject.values[a]] for a in ("object", "position", "scene")}


def test_grounding_term_rewards_attention_inside_each_words_region():
    from sefi_ide.tools.toy_world.grounding import grounding_loss

    region = torch.zeros(256)
    region[:64] = 1.0
    words = [[(9, region)], []]
    uniform = torch.full((2, 3, 256, 77), 1 / 77)
    assert grounding_loss([uniform], words).abs() < 1e-7
    inside = uniform.clone()
    inside[0, :, :64, 9] = 0.5
    inside[0, :, 64:, 9] = 0.0
    assert torch.isclose(grounding_loss([inside], words), torch.tensor(-0.5))
    outside = uniform.clone()
    outside[0, :, :64, 9] = 0.0
    assert grounding_loss([outside], words) > 0
    elsewhere = uniform.clone()  # the right cells on another column: no reward
    elsewhere[0, :, :64, 10] = 0.5
    assert grounding_loss([elsewhere], words).abs() < 1e-7


def test_a_fresh_run_with_quiet_text_init_starts_as_the_bag_of_words_and_still_learns_context():
    """World v2's training recipe (train.py --position-init 0 --text-init 0): the contextual encoder begins as exactly
    final_layer_norm(row of each token) — no random mixing as long as a CLIP-scale row — while its layer and positions
    keep gradients, so context can grow from there; --text-lr reaches those weights and not the word rows."""
    from sefi_ide.tools.toy_world.train import contextual_parameters, fresh_start

    torch.manual_seed(0)
    prompt = "a photo of the face of person, oval face, at night"
    text = TextEncoder(TextConfig(), seed=3)
    unet = SlimUNet(SlimConfig(80, 160, 200))
    fresh_start(unet, text, q_gain=1.0, position_init=0.0, text_init=0.0)
    context = text([prompt])[0]
    tokens = torch.tensor(tokenize(prompt))
    bag = text.norm(text.rows[text.index[tokens]])
    assert torch.allclose(context, bag, atol=1e-5), (context - bag).abs().max()
    context.pow(2).sum().backward()
    layer = text.layers[0]
    assert layer.out_proj.weight.grad.abs().max() > 0 and layer.fc2.weight.grad.abs().max() > 0
    assert {id(p) for p in contextual_parameters(text)} == {id(p) for p in [*layer.parameters(), text.position]}

    noisy = TextEncoder(TextConfig(), seed=3)  # the default init: a row's context is far from its bag-of-words one
    fresh_start(SlimUNet(SlimConfig(80, 160, 200)), noisy, q_gain=1.0, position_init=0.01, text_init=1.0)
    with torch.no_grad():
        drift = (noisy([prompt])[0] - noisy.norm(noisy.rows[noisy.index[tokens]])).norm(dim=-1)
    assert drift.min() > 1.0, drift
