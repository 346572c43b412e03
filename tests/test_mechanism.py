"""Mechanism tests on tiny SD1 (loaded by ComfyUI's checkpoint loader) and SDXL-family models (built through
ComfyUI's classes): real ComfyUI CLIP, UNet, VAE and samplers."""
from __future__ import annotations

import re

import pytest
import torch
from helpers import CLOSE, attn2_probe, expected_stage, photo, random_identity, sample, state_hash

pytestmark = pytest.mark.usefixtures("comfy_host")


@pytest.fixture(params=["sd1", "sdxl"])
def models(request):
    return request.getfixturevalue(request.param)

TEXT = "a photo of <alice> at the beach"


@pytest.mark.parametrize("sampler,scheduler,batch", [("euler", "normal", 1), ("dpmpp_2m", "karras", 2),
                                                     ("ddim", "ddim_uniform", 1)])
def test_each_step_gets_k_and_v_contexts_of_its_stage(models, sampler, scheduler, batch):
    from sefi_ide.host.conditioning import apply_identities, build_stage_contexts

    model, clip, _ = models
    ident = random_identity(clip)
    with torch.inference_mode():
        patched, positive = apply_identities(model, clip, TEXT, [ident])
        ck, cv, *_ = build_stage_contexts(clip, TEXT, [ident])
        neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, low quality"))[0][0][0]
    seen = []
    patched.set_model_attn2_patch(attn2_probe(seen))  # runs after our patch, sees what attn2 will use
    sample(patched, clip, positive, sampler, scheduler, steps=8, batch=batch)
    assert seen
    stages_seen = set()
    for sigmas, cond_or_uncond, context, value in seen:
        stage = expected_stage(model, sigmas, 5)
        rows = len(sigmas)
        for chunk, kind in enumerate(cond_or_uncond):
            for r in range(rows):
                k_row, v_row = context[chunk * rows + r], value[chunk * rows + r]
                if kind == 0:  # positive: the stage's C^K and C^V, and they differ
                    torch.testing.assert_close(k_row, ck[stage[r]], **CLOSE)
                    torch.testing.assert_close(v_row, cv[stage[r]], **CLOSE)
                    stages_seen.add(stage[r])
                else:  # negative: untouched
                    assert torch.equal(k_row, neg) and torch.equal(v_row, neg)
    assert len(stages_seen) >= 3, stages_seen
    # every encoder's half of the context carries the stage's token (SDXL: CLIP-L | OpenCLIP-G)
    widths = [768] if ck.shape[-1] == 768 else [768, 1280]
    start = 0
    for width in widths:
        part = ck[..., start:start + width]
        assert not torch.allclose(part[0], part[-1]) and not torch.allclose(part[0], cv[0][..., start:start + width])
        start += width


def test_k_and_v_come_from_different_tokens(models):
    from sefi_ide.core.identity import Identity
    from sefi_ide.host.conditioning import apply_identities

    model, clip, _ = models
    ident = random_identity(clip)
    swapped = Identity(family=ident.family, placeholder="<alice>", init_word="person", k=ident.v, v=ident.k)
    with torch.inference_mode():
        m1, p1 = apply_identities(model, clip, TEXT, [ident])
        a = sample(m1, clip, p1)
        m2, p2 = apply_identities(model, clip, TEXT, [swapped])
        b = sample(m2, clip, p2)
    assert (a - b).abs().max() > 1e-4


def learn_small(models, image, steps, seed, mask=None, loss_curve=False, **overrides):
    """FaceAttentionLossTrainer with the paper's defaults except a 64 px training square (CPU speed): the identity
    (or, with loss_curve, its loss-curve IMAGE)."""
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.nodes.learn import TOKEN_OPTIONS, FaceAttentionLossTrainer

    d = TrainSettings()
    args = {"placeholder": "<alice>", "steps": steps, "seed": seed, "init_word": d.init_word,
            "reference_prompt": d.reference_prompt, "attn_lambda": d.attn_lambda,
            "token_option": next(iter(TOKEN_OPTIONS)), "layers": d.layers, "stages": d.num_stages,
            "kv_split": d.kv_split, "lr": d.lr, "resolution": 64, "color_jitter": d.color_jitter,
            "flip_p": d.flip_p, "scale_min": d.scale_min, "scale_max": d.scale_max, "batch_size": d.batch_size}
    args.update(overrides)
    model, clip, vae = models
    with torch.inference_mode():
        return FaceAttentionLossTrainer().train(model, clip, vae, image, mask=mask, **args)[1 if loss_curve else 0]


def test_learn_apply_sample_leaves_model_and_clip_bit_identical(models):
    from sefi_ide.nodes.apply import ApplyPerStageIDTokens

    model, clip, _ = models
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    plain_before = sample(model, clip, positive)
    hashes = (state_hash(model.model), state_hash(clip.cond_stage_model))
    grad_before = torch.is_grad_enabled()
    ident = learn_small(models, photo(), steps=2, seed=0)
    with torch.inference_mode():
        m2, p2 = ApplyPerStageIDTokens().apply(model, clip, TEXT, ident)
        sample(m2, clip, p2)
    assert torch.is_grad_enabled() == grad_before
    assert (state_hash(model.model), state_hash(clip.cond_stage_model)) == hashes
    assert torch.equal(sample(model, clip, positive), plain_before)


def test_same_seed_gives_the_same_identity_file(models, tmp_path):
    from sefi_ide.core.identity import save_identity

    files = []
    for i in range(2):
        ident = learn_small(models, photo(), steps=2, seed=7)
        files.append(save_identity(ident, tmp_path / f"{i}.safetensors").read_bytes())
    assert files[0] == files[1]
    other = learn_small(models, photo(), steps=2, seed=8)
    assert save_identity(other, tmp_path / "x.safetensors").read_bytes() != files[0]


def _training_setup(models, **overrides):
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.images import prepare_reference

    model, clip, vae = models
    settings = TrainSettings(resolution=64, color_jitter=0.0, flip_p=0.0, scale_min=1.0, scale_max=1.0,
                             placeholder="<alice>", **overrides)
    reference, _ = prepare_reference(photo(), None, 64)
    return settings, reference, ComfyTrainingBackend(model, clip, vae, settings)


def _eval_draws(backend, reference, n=10):
    g = torch.Generator().manual_seed(123)
    z0 = backend.latents(reference)
    t = torch.linspace(50, 950, n).long()
    return z0, t, [torch.randn(z0.shape, generator=g) for _ in range(n)]


def _eval(backend, identity, reference, what):
    """Mean L_LDM, or mean L_attn distance to the reference maps, over fixed (t, ε) draws."""
    from sefi_ide.core.losses import TokenOption, attention_loss, ldm_loss
    from sefi_ide.core.stages import stage_of_timestep

    z0, ts, noises = _eval_draws(backend, reference)
    ref_ctx, ref_pooled = backend.reference_context()
    out = []
    for t, eps in zip(ts, noises):
        s = int(stage_of_timestep(t, identity.num_stages))
        ctx, pooled = backend.target_contexts({enc: torch.stack([identity.k[enc][s], identity.v[enc][s]])
                                               for enc in identity.k})
        pred, maps = backend.predict_noise(z0, eps, t[None], ctx[:1], ctx[1:], capture=True, pooled=pooled)
        if what == "ldm":
            out.append(ldm_loss(eps, pred).item())
        else:
            _, ref_maps = backend.predict_noise(z0, eps, t[None], ref_ctx, ref_ctx, capture=True, pooled=ref_pooled)
            out.append(attention_loss(maps, ref_maps, TokenOption.ALL, backend.placeholder_index,
                                      backend.eos_index).item())
    return sum(out) / len(out)


def _train(models, **overrides):
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.grad_scope import training_scope

    settings, reference, backend = _training_setup(models, **overrides)
    with training_scope():
        result = train_identity(backend, reference, settings)
    return result, backend, reference


def test_training_lowers_the_denoising_loss_on_the_reference(models):
    from sefi_ide.core.identity import Identity

    result, backend, reference = _train(models, steps=15, attn_lambda=0.0, seed=0)
    base = backend.base_vectors()  # an untrained generator gives the init word's embedding at every slot
    untrained = Identity(family=backend.family, placeholder="<alice>", init_word="person",
                         k={e: b.expand(5, -1) for e, b in base.items()}, v={e: b.expand(5, -1) for e, b in base.items()})
    with torch.no_grad():
        before = _eval(backend, untrained, reference, "ldm")
        after = _eval(backend, result.identity, reference, "ldm")
    assert after < before, (before, after)


_TRAINED: dict = {}


def _trained_with_defaults(models):
    """20 steps with the default settings (64 px, no augmentation), trained once per model for the tests that only
    read the result."""
    key = id(models[0])
    if key not in _TRAINED:
        result, backend, _ = _train(models, steps=20, seed=0)
        _TRAINED[key] = (result, backend)
    return _TRAINED[key]


def _spread(identity, base) -> dict[str, tuple[float, float, float]]:
    """Per encoder: (mean distance moved from the init word, largest distance between two stages' k tokens,
    mean distance between k_s and v_s)."""
    out = {}
    for enc in identity.k:
        k, v = identity.k[enc], identity.v[enc]
        moved = (torch.cat([k, v]) - base[enc]).norm(dim=-1).mean().item()
        stages = (k[:, None] - k[None]).norm(dim=-1).max().item()
        out[enc] = (moved, stages, (k - v).norm(dim=-1).mean().item())
    return out


def test_learned_per_stage_k_and_v_tokens_do_not_collapse_to_one_token(models):
    """The paper's second idea: after training with the defaults, the stages' tokens and the K and V tokens differ
    by a material fraction of how far they moved from the init word (the version-1 generator: 3.5e-4 of it)."""
    result, backend = _trained_with_defaults(models)
    for enc, (moved, stages, kv) in _spread(result.identity, backend.base_vectors()).items():
        print(f"{backend.family} {enc}: moved {moved:.4f}, stage spread {stages:.4f}, k-v {kv:.4f}")
        assert moved > 0.05, (enc, moved)
        assert stages > 0.25 * moved and kv > 0.25 * moved, (enc, moved, stages, kv)


def test_attention_loss_moves_identity_maps_toward_the_reference(models):
    plain, backend, reference = _train(models, steps=8, attn_lambda=0.0, seed=0)
    guided, _, _ = _train(models, steps=8, attn_lambda=1000.0, seed=0)
    with torch.no_grad():
        d_plain = _eval(backend, plain.identity, reference, "attn")
        d_guided = _eval(backend, guided.identity, reference, "attn")
    assert d_guided < d_plain, (d_plain, d_guided)


def test_reference_rows_in_the_target_batch_give_the_same_maps_and_noise(models):
    """The speed option (reference rows in the target's UNet batch, SD1's default) changes how the maps are
    computed, not what: one 2-row pass equals the reference pass and the target pass done apart."""
    from sefi_ide.host.grad_scope import training_scope

    _, reference, backend = _training_setup(models)
    g = torch.Generator().manual_seed(0)
    with training_scope(), torch.no_grad():
        ref_ctx, ref_pooled = backend.reference_context()
        z0 = backend.latents(reference)
        eps, t = torch.randn(z0.shape, generator=g), torch.tensor([500])
        rows = {e: (v + 0.05 * torch.randn(v.shape, generator=g)).expand(2, -1)
                for e, v in backend.base_vectors().items()}
        ctx, pooled = backend.target_contexts(rows)
        eps_ref, maps_ref = backend.predict_noise(z0, eps, t, ref_ctx, ref_ctx, capture=True, pooled=ref_pooled)
        eps_tgt, maps_tgt = backend.predict_noise(z0, eps, t, ctx[:1], ctx[1:], capture=True, pooled=pooled)
        both = None if pooled is None else torch.cat([ref_pooled.to(pooled), pooled])
        eps_all, maps_all = backend.predict_noise(torch.cat([z0, z0]), torch.cat([eps, eps]), torch.cat([t, t]),
                                                  torch.cat([ref_ctx, ctx[:1]]), torch.cat([ref_ctx, ctx[1:]]),
                                                  capture=True, pooled=both)
    assert not torch.allclose(eps_ref, eps_tgt, atol=1e-4)  # the two halves really differ
    torch.testing.assert_close(eps_all, torch.cat([eps_ref, eps_tgt]), **CLOSE)
    for joint, ref, tgt in zip(maps_all, maps_ref, maps_tgt, strict=True):
        torch.testing.assert_close(joint, torch.cat([ref, tgt]), **CLOSE)


def test_training_with_the_reference_in_the_target_batch_takes_the_same_steps(sd1):
    fused, _, _ = _train(sd1, steps=3, attn_lambda=1000.0, seed=0, reference_in_batch=True)
    separate, _, _ = _train(sd1, steps=3, attn_lambda=1000.0, seed=0, reference_in_batch=False)
    assert fused.history[-1]["attn"] > 0
    for a, b in zip(fused.history, separate.history, strict=True):
        assert abs(a["attn"] - b["attn"]) <= 1e-4 * b["attn"] + 1e-12 and abs(a["ldm"] - b["ldm"]) <= 1e-4 * b["ldm"]


def test_training_passes_run_on_swapped_weights_and_take_the_same_steps_as_per_call_aliasing(models, caplog):
    """The fast gradient pass (the host's weights swapped for aliases, training_scope's per-call hook off the
    stack) is what runs inside the real UNet, reaches every weight of the real UNet and CLIP (no fallback), and
    trains exactly as aliasing every torch call does."""
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.grad_scope import per_call_aliasing, training_scope

    model, clip, vae = models
    modes_in_grad_pass = []

    def probe(n, context_attn2, value_attn2, extra_options):
        if torch.is_grad_enabled():
            modes_in_grad_pass.append(torch.overrides._get_current_function_mode())
        return n, context_attn2, value_attn2

    probed = model.clone()
    probed.set_model_attn2_patch(probe)
    fast, _, _ = _train((probed, clip, vae), steps=3, attn_lambda=1000.0, seed=0)
    assert modes_in_grad_pass and all(mode is None for mode in modes_in_grad_pass)
    assert "holds inference tensors" not in caplog.text

    settings, reference, backend = _training_setup(models, steps=3, attn_lambda=1000.0, seed=0)
    with training_scope(), per_call_aliasing(model.model), per_call_aliasing(clip.cond_stage_model):
        slow = train_identity(backend, reference, settings)
    assert [(r["ldm"], r["attn"]) for r in fast.history] == [(r["ldm"], r["attn"]) for r in slow.history]
    for enc in fast.identity.k:
        assert torch.equal(fast.identity.k[enc], slow.identity.k[enc])
        assert torch.equal(fast.identity.v[enc], slow.identity.v[enc])


def _bytes_saved_for_backward(models, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward from one training-step UNet pass (the tensors checkpointing drops)."""
    from sefi_ide.host.grad_scope import training_scope

    _, reference, backend = _training_setup(models, gradient_checkpointing=checkpointing)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with training_scope():
        z0 = backend.latents(reference)
        rows = {e: v.expand(2, -1).clone().requires_grad_(True) for e, v in backend.base_vectors().items()}
        ctx, pooled = backend.target_contexts(rows)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            eps, maps = backend.predict_noise(z0, torch.randn(z0.shape), torch.tensor([500]), ctx[:1], ctx[1:],
                                              capture=True, pooled=pooled)
        (eps.square().mean() + sum(m.square().mean() for m in maps)).backward()
        assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in rows.values())
        assert backend.unet.capture.take() == []  # a recomputed block does not record its maps twice
    return sum(saved)


def test_gradient_checkpointing_keeps_far_less_for_backward_and_trains_identically(models):
    """The memory option recomputes each UNet block in backward: the tensors kept from the forward shrink, the
    training steps and the learned tokens are bit-identical, and the host's UNet is left as it was."""
    model = models[0]
    assert _bytes_saved_for_backward(models, True) < 0.25 * _bytes_saved_for_backward(models, False)

    plain, _, _ = _train(models, steps=3, attn_lambda=1000.0, seed=0)
    light, _, _ = _train(models, steps=3, attn_lambda=1000.0, seed=0, gradient_checkpointing=True)
    assert [(r["ldm"], r["attn"]) for r in plain.history] == [(r["ldm"], r["attn"]) for r in light.history]
    for enc in plain.identity.k:
        assert torch.equal(plain.identity.k[enc], light.identity.k[enc])
        assert torch.equal(plain.identity.v[enc], light.identity.v[enc])
    assert light.identity.training["gradient_checkpointing"] is True
    assert not any("forward" in vars(m) for m in model.model.modules())
    assert all(p.is_inference() for p in model.model.parameters())


def test_heatmap_node_shows_each_stages_own_tokens_for_a_trained_identity_and_reports_norms(models):
    """For a trained identity every stage's map comes from that stage's own tokens: giving each stage its neighbour's
    tokens changes every stage's picture (with collapsed tokens it would change nothing). The second output reports
    the token norms against the init word's."""
    import dataclasses

    from sefi_ide.nodes.heatmap import IDAttentionHeatmap

    model, clip, vae = models
    ident = _trained_with_defaults(models)[0].identity
    rolled = dataclasses.replace(ident, k={e: t.roll(1, 0) for e, t in ident.k.items()},
                                 v={e: t.roll(1, 0) for e, t in ident.v.items()})
    with torch.inference_mode():
        out = IDAttentionHeatmap().render(model, clip, vae, photo(), ident, 64, 0)
        maps, report = out["result"]
        maps_rolled, _ = IDAttentionHeatmap().render(model, clip, vae, photo(), rolled, 64, 0)["result"]
    assert maps.shape == (5, 64, 64, 3) and 0 <= maps.min() and maps.max() <= 1
    assert [(maps[s] - maps_rolled[s]).abs().max().item() > 0.02 for s in range(5)] == [True] * 5
    assert out["ui"]["text"] == [report]
    for enc in ident.k:  # the report's ratios (2 decimals) against ratios computed here from the host's table
        line = next(row for row in report.splitlines() if row.startswith(f"{enc}: |init word 'person'|"))
        shown = {kind: [float(x) for x in re.search(rf"{kind} \[([^\]]*)\]", line).group(1).split(", ")]
                 for kind in ("k", "v")}
        for kind, table in (("k", ident.k), ("v", ident.v)):
            ratios = (table[enc].norm(dim=-1) / clip_word_norm(clip, enc)).tolist()
            assert shown[kind] == pytest.approx(ratios, abs=0.0051), (enc, kind)  # 2-decimal rounding, no luck


def clip_word_norm(clip, enc: str) -> float:
    """|e| of 'person' read straight from the host's word-embedding table."""
    token = clip.tokenize("person")["l" if enc == "clip_l" else "g"][0][1][0]
    return getattr(clip.cond_stage_model, enc).transformer.get_input_embeddings().weight[token].float().norm().item()


def test_mask_restricts_what_the_identity_learns(models):
    image = photo()
    mask = torch.zeros(1, *image.shape[1:3])
    mask[:, 20:70, 20:60] = 1.0
    free = learn_small(models, image, steps=2, seed=0)
    masked = learn_small(models, image, steps=2, seed=0, mask=mask)
    assert not torch.equal(free.k["clip_l"], masked.k["clip_l"])


def test_sdxl_conditioning_carries_the_k_path_middle_stage_context_and_pooled(sdxl):
    from sefi_ide.host.conditioning import apply_identities
    from sefi_ide.host.text import encode_variants, inject, mark_prompt

    model, clip, _ = sdxl
    ident = random_identity(clip)
    with torch.inference_mode():
        _, positive = apply_identities(model, clip, TEXT, [ident])
        marked = mark_prompt(clip, TEXT, ["<alice>"])
        ctx_k, pooled_k = encode_variants(clip, [inject(marked, {"<alice>": {e: ident.k[e][2] for e in ident.k}})])
        _, pooled_v = encode_variants(clip, [inject(marked, {"<alice>": {e: ident.v[e][2] for e in ident.v}})])
    assert positive[0][0].shape == (1, 77, 2048)
    torch.testing.assert_close(positive[0][0][0], ctx_k[0], **CLOSE)
    torch.testing.assert_close(positive[0][1]["pooled_output"], pooled_k, **CLOSE)
    assert not torch.allclose(pooled_k, pooled_v)


@pytest.mark.parametrize("learned_on,used_on,message", [("sd1", "sdxl", "Stable Diffusion 1.x but the model is SDXL"),
                                                         ("sdxl", "sd1", "SDXL but the model is Stable Diffusion 1.x")])
def test_identity_of_the_other_family_is_refused_naming_both(request, learned_on, used_on, message):
    from sefi_ide.core.errors import SeFiError
    from sefi_ide.host.conditioning import apply_identities

    ident = random_identity(request.getfixturevalue(learned_on)[1])
    model, clip, _ = request.getfixturevalue(used_on)
    with pytest.raises(SeFiError, match=message), torch.inference_mode():
        apply_identities(model, clip, TEXT, [ident])


@pytest.mark.smoke
def test_stopped_training_resumes_exactly_to_the_uninterrupted_result(models, tmp_path):
    from sefi_ide.core.identity import load_identity, save_identity
    from sefi_ide.core.training import TrainingStopped, train_identity
    from sefi_ide.host.grad_scope import training_scope

    settings, reference, backend = _training_setup(models, steps=4, seed=5)
    settings.color_jitter, settings.flip_p, settings.scale_min, settings.scale_max = 0.2, 0.5, 0.8, 1.2

    from comfy.model_management import InterruptProcessingException  # what Cancel raises (a BaseException on 0.28+)

    def stop_at_two(step, steps, record):
        if step == 2:
            raise InterruptProcessingException()

    with training_scope():
        full = train_identity(backend, reference, settings).identity
        with pytest.raises(TrainingStopped) as stopped:
            train_identity(backend, reference, settings, on_step=stop_at_two)
        partial = stopped.value.partial.identity
        assert partial.trained_steps == 2 and isinstance(stopped.value.cause, InterruptProcessingException)
        reloaded = load_identity(save_identity(partial, tmp_path / "stopped.safetensors"))
        resumed = train_identity(backend, reference, settings, resume=reloaded).identity
    assert resumed.trained_steps == 4
    for enc in full.k:
        assert torch.equal(resumed.k[enc], full.k[enc]) and torch.equal(resumed.v[enc], full.v[enc])
        assert not torch.equal(partial.k[enc], full.k[enc])


def test_live_preview_shows_the_placeholder_attention_and_changes_nothing(models):
    """Every `preview_every` steps the record carries the placeholder token's attention map (the progress bar's
    picture); the learned tokens are bitwise the same as without previews."""
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.plots import PREVIEW_SIDE, attention_preview

    settings, reference, backend = _training_setup(models, steps=4, attn_lambda=1000.0, seed=0)
    with training_scope():
        with_preview = train_identity(backend, reference, settings, preview_every=2)
        without = train_identity(backend, reference, settings)
    assert ["attention" in r for r in with_preview.history] == [False, True, False, True]
    attention = with_preview.history[1]["attention"]
    assert attention.ndim == 2 and attention.shape[0] == attention.shape[1] and attention.min() >= 0
    assert 0 < attention.max() <= 1 and attention.std() > 0  # a probability per pixel, not flat
    for enc in without.identity.k:
        assert torch.equal(with_preview.identity.k[enc], without.identity.k[enc])
    picture = attention_preview(reference, attention)
    assert picture.size == (PREVIEW_SIDE, PREVIEW_SIDE)  # what ComfyUI sends: it scales any picture to this side


def test_learn_nodes_output_the_loss_curve(sd1):
    from sefi_ide.host.plots import LEGEND_BOTTOM, SERIES

    curve = learn_small(sd1, photo(), steps=3, seed=0, loss_curve=True)
    assert curve.shape == (1, 384, 768, 3) and 0 <= curve.min() and curve.max() <= 1
    pixels = (curve[0] * 255).round().to(torch.uint8)
    for name, colour in SERIES:  # every series has its legend swatch
        assert (pixels == torch.tensor(colour, dtype=torch.uint8)).all(-1).any(), name
    below_legend = pixels[LEGEND_BOTTOM:]
    assert (below_legend == torch.tensor(SERIES[-1][1], dtype=torch.uint8)).all(-1).sum() > 100  # the total's line


def test_extra_photos_are_sampled_per_step_and_one_photo_gives_exactly_the_old_result(sd1, tmp_path):
    """Two copies of the same photo learn exactly what the photo alone learns (the photo draw has its own seeded
    stream, the t/ε stream is untouched); two different photos learn something else, each step seeing one of them,
    and the file records how many photos it saw."""
    from sefi_ide.core.identity import load_identity, save_identity
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    settings, reference, backend = _training_setup(sd1, steps=6, seed=0)
    other, _ = prepare_reference(photo().flip(2), None, 64)
    seen = []
    latents = backend.latents

    def recording(images):
        seen.append(images.clone())
        return latents(images)

    with training_scope():
        alone = train_identity(backend, reference, settings)
        twice = train_identity(backend, torch.cat([reference, reference]), settings)
        backend.latents = recording
        both = train_identity(backend, torch.cat([reference, other]), settings)
    for enc in alone.identity.k:
        assert torch.equal(twice.identity.k[enc], alone.identity.k[enc])
        assert not torch.equal(both.identity.k[enc], alone.identity.k[enc])
    used = {0 if torch.equal(s, reference) else 1 if torch.equal(s, other) else -1 for s in seen}
    assert used == {0, 1}  # no augmentation in this setup: each step's image is one photo exactly
    assert (alone.identity.photos, both.identity.photos) == (1, 2)
    assert load_identity(save_identity(both.identity, tmp_path / "two.safetensors")).photos == 2


@pytest.mark.parametrize("subject,init_word,prompt", [("pet", "pet", "a photo of the face of {word}"),
                                                      ("object", "object", "a photo of the {word}")])
def test_subject_presets_set_the_init_word_and_reference_prompt(models, subject, init_word, prompt):
    """The presets of 'Learn ID Embedding' (and the advanced node's subject choice, used here at 64 px)."""
    from sefi_ide.host.text import word_token_id
    from sefi_ide.nodes.learn import SUBJECTS

    clip = models[1]
    assert SUBJECTS[subject] == (init_word, prompt)
    assert set(word_token_id(clip, init_word)) == set(clip.tokenize("a"))  # one token in every encoder
    ident = learn_small(models, photo(), steps=1, seed=0, subject=subject)
    assert ident.init_word == init_word and ident.training["reference_prompt"] == prompt
