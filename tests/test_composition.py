"""Several identities, regions, strength, and composing with LoRA and other attention patches."""
from __future__ import annotations

import pytest
import torch
from helpers import CLOSE, attn2_probe, close, expected_stage, random_identity, sample

pytestmark = pytest.mark.usefixtures("comfy_host")

TEXT2 = "<alice> shaking hands with <bob> in a garage"


@pytest.fixture(params=["sd1", "sdxl"])
def models(request):
    return request.getfixturevalue(request.param)


def _pair(clip):
    return random_identity(clip, seed=0, placeholder="<alice>"), random_identity(clip, seed=1, placeholder="<bob>")


def test_two_identities_reach_cross_attention_at_their_own_positions_and_stages(models):
    from sefi_ide.host.conditioning import apply_identities
    from sefi_ide.host.text import encode_variants, inject, mark_prompt

    model, clip, _ = models
    a, b = _pair(clip)
    with torch.inference_mode():
        patched, positive = apply_identities(model, clip, TEXT2, [a, b])
        marked = mark_prompt(clip, TEXT2, ["<alice>", "<bob>"])
        expect = {
            table: [encode_variants(clip, [inject(marked, {
                "<alice>": {e: getattr(a, table)[e][s] for e in a.k},
                "<bob>": {e: getattr(b, table)[e][s] for e in b.k}})])[0][0] for s in range(5)]
            for table in ("k", "v")}
        swapped = encode_variants(clip, [inject(marked, {"<alice>": {e: b.k[e][0] for e in b.k},
                                                         "<bob>": {e: a.k[e][0] for e in a.k}})])[0][0]
    assert not torch.allclose(swapped, expect["k"][0])  # which token sits where matters
    seen = []
    patched.set_model_attn2_patch(attn2_probe(seen))
    sample(patched, clip, positive, steps=6)
    checked = 0
    for sigmas, cond_or_uncond, context, value in seen:
        stage = expected_stage(model, sigmas, 5)
        rows = len(sigmas)
        for chunk, kind in enumerate(cond_or_uncond):
            if kind == 0:
                for r in range(rows):
                    torch.testing.assert_close(context[chunk * rows + r], expect["k"][stage[r]], **CLOSE)
                    torch.testing.assert_close(value[chunk * rows + r], expect["v"][stage[r]], **CLOSE)
                    checked += 1
    assert checked > 0


@pytest.mark.parametrize("text,wired,message", [
    ("<alice> and <carol> at a party", ["<alice>"], "names <carol> but no connected identity"),
    ("<alice> at a party", ["<alice>", "<bob>"], "does not contain the placeholder(s) <bob>"),
])
def test_placeholder_and_identity_must_match(sd1, text, wired, message):
    from sefi_ide.core.errors import SeFiError
    from sefi_ide.host.conditioning import apply_identities

    model, clip, _ = sd1
    idents = [random_identity(clip, seed=i, placeholder=p) for i, p in enumerate(wired)]
    with pytest.raises(SeFiError, match=message.replace("(", r"\(").replace(")", r"\)")), torch.inference_mode():
        apply_identities(model, clip, text, idents)


def test_region_masks_give_each_identity_no_attention_outside_its_mask(models):
    import dataclasses

    from sefi_ide.host.conditioning import apply_identities
    from sefi_ide.host.text import mark_prompt

    model, clip, _ = models
    a, b = _pair(clip)
    left = torch.zeros(64, 64)
    left[:, :32] = 1.0
    a = dataclasses.replace(a, region=left)
    b = dataclasses.replace(b, region=1.0 - left)
    with torch.inference_mode():
        patched, positive = apply_identities(model, clip, TEXT2, [a, b])
        marked = mark_prompt(clip, TEXT2, ["<alice>", "<bob>"])
    col_a = [i for _, i in marked.positions["<alice>"]["l"]]
    col_b = [i for _, i in marked.positions["<bob>"]["l"]]
    ours = patched.model_options["transformer_options"]["optimized_attention_override"]
    calls = []
    patched.set_model_attn2_patch(attn2_probe(calls))
    checked = {"outside": 0, "inside": 0.0}

    def recording_attention(q, k, v, heads, mask=None, **kwargs):
        bsz, n, inner = q.shape
        d = inner // heads
        qh, kh, vh = (x.reshape(bsz, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        logits = qh @ kh.transpose(-1, -2) * d ** -0.5
        if mask is not None:
            logits = logits + (mask.unsqueeze(1) if mask.ndim == 3 else mask)
        probs = logits.softmax(-1)
        if k.shape[1] == 77 and calls:  # a cross-attention call; the probe ran just before it
            side = int(n ** 0.5)
            x = torch.arange(n) % side
            rows = len(calls[-1][0])
            for chunk, kind in enumerate(calls[-1][1]):
                if kind != 0:
                    continue
                p = probs[chunk * rows:(chunk + 1) * rows]
                for cols, outside in ((col_a, x >= side // 2), (col_b, x < side // 2)):
                    assert p[:, :, outside][..., cols].max() == 0.0
                    checked["outside"] += 1
                    checked["inside"] = max(checked["inside"], p[:, :, ~outside][..., cols].max().item())
        return (probs @ vh).transpose(1, 2).reshape(bsz, n, inner)

    patched.model_options["transformer_options"]["optimized_attention_override"] = (
        lambda func, *args, **kwargs: ours(recording_attention, *args, **kwargs))
    sample(patched, clip, positive, steps=3)
    assert checked["outside"] > 0 and checked["inside"] > 0


def test_strength_zero_reproduces_the_prompt_without_the_identity_exactly(models):
    import dataclasses

    from sefi_ide.host.conditioning import apply_identities, build_stage_contexts

    model, clip, _ = models
    a = random_identity(clip, placeholder="<alice>")
    text = "a photo of <alice> at the beach"
    plain = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of person at the beach"))
    with torch.inference_mode():
        m0, p0 = apply_identities(model, clip, text, [dataclasses.replace(a, strength=0.0)])
    assert torch.equal(sample(m0, clip, p0), sample(model, clip, plain))
    # monotone: the K contexts move away from the plain prompt as strength grows
    with torch.inference_mode():
        dists = []
        for s in (0.0, 0.25, 0.5, 1.0):
            ck = build_stage_contexts(clip, text, [dataclasses.replace(a, strength=s)])[0]
            dists.append((ck - plain[0][0]).norm().item())
    assert dists[0] == 0.0 and dists == sorted(dists) and len(set(dists)) == 4


def _random_lora(model, target: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA (kohya key names) for one UNet weight of `model`, drawn from `g`."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora_name = next(k for k, v in key_map.items() if v == target and k.startswith("lora_unet_"))
    weight = model.model.state_dict()[target]
    return {f"{lora_name}.lora_up.weight": torch.randn(weight.shape[0], 4, generator=g),
            f"{lora_name}.lora_down.weight": torch.randn(4, weight.shape[1], generator=g)}


def test_identity_composes_with_lora_controlnet_and_a_foreign_attn2_patch(sd1):
    import comfy.model_management
    import comfy.sd
    import tiny_models
    from sefi_ide.host.conditioning import apply_identities

    import nodes as core_nodes

    model, clip, _ = sd1
    target = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    g = torch.Generator().manual_seed(0)
    lora = _random_lora(model, target, g)
    calls = []
    foreign = model.clone()
    foreign.set_model_attn2_patch(lambda n, c, v, extra: (calls.append(1), (n, c, v))[1])
    ident = random_identity(clip, placeholder="<alice>")
    text = "a photo of <alice> at the beach"
    before = model.model.state_dict()[target].clone()
    with torch.inference_mode():
        with_lora, _ = comfy.sd.load_lora_for_models(foreign, clip, lora, 1.0, 0.0)
        m1, p1 = apply_identities(with_lora, clip, text, [ident])
        m2, p2 = apply_identities(foreign, clip, text, [ident])
    out_lora = sample(m1, clip, p1, steps=3)
    assert calls, "the other pack's attn2 patch must still run"
    out_plain = sample(m2, clip, p2, steps=3)
    assert (out_lora - out_plain).abs().max() > 1e-4

    # ControlNet (pose/spatial control) on the identity's conditioning, together with the LoRA
    with torch.inference_mode():
        control = tiny_models.tiny_sd1_controlnet()
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, low quality"))
        hint = torch.rand(1, 64, 64, 3, generator=g)
        p_cn, n_cn = core_nodes.ControlNetApplyAdvanced().apply_controlnet(p1, negative, control, hint, 1.0, 0.0, 1.0)
    seen = []
    m1.set_model_attn2_patch(attn2_probe(seen))
    out_cn = sample(m1, clip, p_cn, steps=3, negative=n_cn)
    assert (out_cn - out_lora).abs().max() > 1e-4
    swapped = [not torch.equal(ctx[chunk * len(sig)], p1[0][0][0])
               for sig, cou, ctx, _ in seen for chunk, kind in enumerate(cou) if kind == 0]
    assert swapped and any(swapped)  # per-stage contexts replaced the nominal one alongside the ControlNet
    # the host patches LoRA weights in place while a clone is loaded; loading the base model restores them. In
    # inference mode, as ComfyUI runs every node: outside it, 0.28's restore clones the weights into ordinary tensors
    # (comfy.utils.set_attr_param), which every later test sharing this model would see
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
    assert torch.equal(model.model.state_dict()[target], before)
    assert all(p.is_inference() for p in model.model.parameters())


def test_learning_on_a_lora_model_trains_through_the_patched_weights_and_restores_the_base(sd1, caplog):
    """The fast gradient pass swaps whatever weights the host has loaded: with a LoRA, the patched ones
    (the learned tokens differ from those learned on the base model), and the base model comes back intact."""
    import comfy.model_management
    import comfy.sd
    from helpers import photo
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    model, clip, vae = sd1
    target = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    lora = _random_lora(model, target, torch.Generator().manual_seed(0))
    before = model.model.state_dict()[target].clone()
    with torch.inference_mode():
        with_lora, _ = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 0.0)
    settings = TrainSettings(resolution=64, steps=2, attn_lambda=1000.0, placeholder="<alice>")
    reference, _ = prepare_reference(photo(), None, 64)
    learned = {}
    for name, m in (("lora", with_lora), ("base", model)):
        with torch.inference_mode(), training_scope():
            learned[name] = train_identity(ComfyTrainingBackend(m, clip, vae, settings), reference, settings)
    assert "holds inference tensors" not in caplog.text  # the swap reached every weight, patched or not
    assert not torch.equal(learned["lora"].identity.k["clip_l"], learned["base"].identity.k["clip_l"])
    with torch.inference_mode():  # as ComfyUI loads models (see the test above)
        comfy.model_management.load_models_gpu([model])
    assert torch.equal(model.model.state_dict()[target], before)
    assert all(p.is_inference() for p in model.model.parameters())


@pytest.mark.parametrize("placeholder", ["<mary-jane_smith>", "sks_person", "<ÅsaLarsson>"])
def test_placeholders_the_tokenizer_splits_still_get_one_identity_row(sd1, placeholder):
    from sefi_ide.host.conditioning import build_stage_contexts

    _, clip, _ = sd1
    ident = random_identity(clip, placeholder=placeholder)
    plain = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of person at the beach"))[0][0]
    with torch.inference_mode():
        ck, *_ = build_stage_contexts(clip, f"a photo of {placeholder} at the beach", [ident])
    assert ck.shape == (5, 77, 768)
    # same token count as the one-token word: the placeholder occupies exactly one row
    torch.testing.assert_close(ck[0][:4], plain[0][:4], **CLOSE)
    assert not close(ck[0][4], plain[0][4])


@pytest.mark.parametrize("how", ["concat_ours_first", "concat_ours_second", "combine"])
def test_identity_survives_conditioning_concat_and_combine(sd1, how):
    from sefi_ide.host.conditioning import apply_identities, build_stage_contexts

    import nodes as core_nodes

    model, clip, _ = sd1
    ident = random_identity(clip, placeholder="<alice>")
    text = "a photo of <alice> at the beach"
    with torch.inference_mode():
        patched, ours = apply_identities(model, clip, text, [ident])
        ck, cv, *_ = build_stage_contexts(clip, text, [ident])
        other = clip.encode_from_tokens_scheduled(clip.tokenize("sunset, film grain"))
        if how == "concat_ours_first":
            positive = core_nodes.ConditioningConcat().concat(ours, other)[0]
        elif how == "concat_ours_second":
            positive = core_nodes.ConditioningConcat().concat(other, ours)[0]
        else:
            positive = core_nodes.ConditioningCombine().combine(ours, other)[0]
    other_ctx = other[0][0][0]
    seen = []
    patched.set_model_attn2_patch(attn2_probe(seen))
    sample(patched, clip, positive, steps=4)
    found_ours = found_other = 0
    for sigmas, cond_or_uncond, context, value in seen:
        stage = expected_stage(model, sigmas, 5)
        rows = len(sigmas)
        for chunk, kind in enumerate(cond_or_uncond):
            if kind != 0:
                continue
            for r in range(rows):
                k_blocks = context[chunk * rows + r].split(77)
                v_blocks = value[chunk * rows + r].split(77)
                for kb, vb in zip(k_blocks, v_blocks):
                    if close(kb, ck[stage[r]]):
                        torch.testing.assert_close(vb, cv[stage[r]], **CLOSE)
                        found_ours += 1
                    else:  # the other prompt passes untouched
                        assert torch.equal(kb, other_ctx) and torch.equal(vb, other_ctx)
                        found_other += 1
    assert found_ours > 0 and found_other > 0


class SamplerKeysAttentionReplace:
    """An attn2 replacement that reads transformer_options exactly as ComfyUI_IPAdapter_plus's CrossAttentionPatch
    does (cond_or_uncond, sigmas[0], the per-prompt batch, original_shape) and, like it, calls the host's attention
    without passing transformer_options."""

    def __init__(self):
        self.seen: list[tuple] = []

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        cond_or_uncond = extra_options["cond_or_uncond"]
        sigma = extra_options["sigmas"][0].item() if "sigmas" in extra_options else 999999999.9
        batch_prompt = q.shape[0] // len(cond_or_uncond)
        _, _, _height, _width = extra_options["original_shape"]
        self.seen.append((q.shape[0], list(cond_or_uncond), len(extra_options["uuids"]), batch_prompt, sigma))
        return optimized_attention(q, k, v, extra_options["n_heads"])


def _with_attention_replaced_everywhere(model):
    from sefi_ide.attention_patch.layers import cross_attention_layers

    patch = SamplerKeysAttentionReplace()
    patched = model.clone()
    layers = cross_attention_layers(model.model.diffusion_model)
    for layer in layers:
        patched.set_model_attn2_replace(patch, *layer.key)
    return patched, patch, layers


def test_learning_and_heatmaps_run_on_a_model_whose_attention_patch_reads_the_samplers_keys(models, caplog):
    """Both trainer nodes and the heat map give the host's UNet the transformer_options a sampler gives, so a patch
    written for sampling (IPAdapter_plus style) runs during learning; where our map capture takes over a loss layer
    it is logged."""
    from helpers import photo
    from sefi_ide.nodes.heatmap import IDAttentionHeatmap
    from sefi_ide.nodes.learn import FaceAttentionLossTrainer, LearnIDEmbedding

    model, clip, vae = models
    patched, patch, _ = _with_attention_replaced_everywhere(model)
    with torch.inference_mode():
        LearnIDEmbedding().learn(patched, clip, vae, photo(), "<alice>", 1, 0)
        ident = FaceAttentionLossTrainer().train(
            patched, clip, vae, photo(), "<alice>", 1, 0, "person", "a photo of the face of {word}", 0.003,
            "3: all 77 token maps (paper's best)", "all", 5, True, 0.005, 64, 0.0, 0.0, 1.0, 1.0, 2)[0]
        IDAttentionHeatmap().render(patched, clip, vae, photo(), ident, 64, 0)
    assert patch.seen
    for rows, cond_or_uncond, uuids, per_prompt, sigma in patch.seen:
        assert cond_or_uncond and set(cond_or_uncond) == {0} and uuids == len(cond_or_uncond)
        assert per_prompt * len(cond_or_uncond) == rows and sigma > 0
    assert "attention maps there are computed without it" in caplog.text


def test_a_region_mask_that_another_packs_attention_drops_is_logged_naming_the_layers(sd1, caplog):
    import dataclasses

    from sefi_ide.host.conditioning import apply_identities

    model, clip, _ = sd1
    patched, _, layers = _with_attention_replaced_everywhere(model)
    left = torch.zeros(64, 64)
    left[:, :32] = 1.0
    ident = dataclasses.replace(random_identity(clip, placeholder="<alice>"), region=left)
    for steps in (1, 2):  # one step: one model pass, reported when sampling ends; two: still once, not per step
        with torch.inference_mode():
            m, positive = apply_identities(patched, clip, "a photo of <alice> at the beach", [ident])
        caplog.clear()
        sample(m, clip, positive, steps=steps)
        warnings = [r.getMessage() for r in caplog.records if "region mask" in r.getMessage()]
        assert len(warnings) == 1, (steps, warnings)
        for layer in layers:
            assert layer.name in warnings[0]


def test_region_masks_are_refused_on_a_comfyui_without_the_attention_override(sd1, monkeypatch):
    """ComfyUI before 0.3.60 has no optimized_attention_override: a region mask would silently do nothing there."""
    import dataclasses

    import comfy.ldm.modules.attention
    from sefi_ide.core.errors import SeFiError
    from sefi_ide.host.conditioning import apply_identities

    model, clip, _ = sd1
    monkeypatch.delattr(comfy.ldm.modules.attention, "wrap_attn")  # as on ComfyUI 0.3.52
    ident = dataclasses.replace(random_identity(clip, placeholder="<alice>"), region=torch.ones(8, 8))
    with pytest.raises(SeFiError, match="Region masks need ComfyUI 0.3.60 or newer"), torch.inference_mode():
        apply_identities(model, clip, "a photo of <alice>", [ident])
    with torch.inference_mode():  # without a mask the identity works there
        apply_identities(model, clip, "a photo of <alice>", [dataclasses.replace(ident, region=None)])


def _learn(model, clip, vae, steps: int = 2):
    from helpers import photo
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    settings = TrainSettings(resolution=64, steps=steps, placeholder="<alice>")
    reference, _ = prepare_reference(photo(), None, 64)
    with torch.inference_mode(), training_scope():
        return train_identity(ComfyTrainingBackend(model, clip, vae, settings), reference, settings)


def test_the_models_wrappers_run_in_every_training_pass_as_a_sampler_runs_them(sd1):
    """A sampler hands the model patcher's wrappers to the UNet (other packs wrap apply_model; ComfyUI's
    TorchCompileModel is one): the training passes do the same, and leave the model's own wrappers as they were."""
    import comfy.patcher_extension

    model, clip, vae = sd1
    calls = []

    def counting_wrapper(executor, *args, **kwargs):
        calls.append(args[0].shape[0])
        return executor(*args, **kwargs)

    wrapped = model.clone()
    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.counting", counting_wrapper)
    before = comfy.patcher_extension.copy_nested_dicts(wrapped.wrappers)
    _learn(wrapped, clip, vae, steps=2)
    assert calls == [2, 2]  # one pass per step: the reference row and the target row in one batch (SD1)
    assert wrapped.wrappers == before and not model.wrappers


def test_comfyuis_torch_compile_wrapper_compiles_the_training_passes_and_learns_the_same(sd1):
    import torch._dynamo
    from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper
    from helpers import assert_same_identity
    from sefi_ide.host.text import word_embedding
    from torch._dynamo.utils import counters

    model, clip, vae = sd1
    eager = _learn(model, clip, vae)
    compiled_model = model.clone()
    set_torch_compile_wrapper(compiled_model, backend="aot_eager")  # the graphs without a C++ compiler
    graphs_before = counters["stats"]["unique_graphs"]
    try:
        compiled = _learn(compiled_model, clip, vae)
    finally:
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo captured the training passes
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert a["ldm"] == pytest.approx(b["ldm"], rel=1e-4)
    assert_same_identity(compiled.identity, eager.identity, word_embedding(clip, "person"))


def test_a_training_pass_torch_compile_cannot_compile_runs_uncompiled_and_says_so(sd1, caplog):
    import torch._dynamo
    from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper

    def cannot_compile(graph_module, example_inputs):
        raise RuntimeError("this backend captures nothing")

    model, clip, vae = sd1
    eager = _learn(model, clip, vae)
    failing = model.clone()
    set_torch_compile_wrapper(failing, backend=cannot_compile)
    try:
        fallback = _learn(failing, clip, vae)
    finally:
        torch._dynamo.reset()
    assert "could not compile the training pass, so it runs uncompiled" in caplog.text
    assert torch.equal(fallback.identity.k["clip_l"], eager.identity.k["clip_l"])
    assert torch.equal(fallback.identity.v["clip_l"], eager.identity.v["clip_l"])


@pytest.mark.parametrize("key_parts", [2, 3])
def test_another_packs_replacement_at_a_loss_layer_is_logged_whatever_its_key(sd1, caplog, key_parts):
    """ComfyUI looks up an attn2 replacement by (block, id, index), then by (block, id): ComfyUI_IPAdapter_plus
    registers SD1's under two-part keys. Either way our map capture takes over that loss layer while learning, and
    the log says so; a replacement at another layer is not our business. An SD1 run says nothing about SDXL's `y`."""
    from helpers import photo
    from sefi_ide.attention_patch.layers import cross_attention_layers
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    model, clip, vae = sd1
    layers = cross_attention_layers(model.model.diffusion_model)
    assert len({layer.key[:2] for layer in layers}) > 1  # two blocks: one with a loss layer, one without
    loss_layer, other = layers[0], next(layer for layer in layers if layer.key[:2] != layers[0].key[:2])
    settings = TrainSettings(steps=1, resolution=64, layers=loss_layer.name, placeholder="<alice>")
    reference, _ = prepare_reference(photo(), None, 64)
    for at, logged in ((other, False), (loss_layer, True)):
        patched = model.clone()
        patched.set_model_attn2_replace(SamplerKeysAttentionReplace(), *at.key[:key_parts])
        caplog.clear()
        with caplog.at_level("INFO"), torch.inference_mode(), training_scope():
            train_identity(ComfyTrainingBackend(patched, clip, vae, settings), reference, settings)
        assert ("computed without it" in caplog.text) == logged, (at.name, caplog.text)
        if logged:
            assert loss_layer.name in caplog.text
        assert "SDXL conditioning" not in caplog.text


def test_sdxl_sampling_gives_each_stage_the_pooled_output_training_gives_it(sdxl):
    """Training feeds SDXL's `y` the pooled output of the current stage's K row; sampling does the same: at every
    step the identity's rows carry the pooled output of the prompt with that step's stage tokens, the negative
    prompt's rows keep their own."""
    from helpers import expected_stage
    from sefi_ide.host.conditioning import apply_identities
    from sefi_ide.host.text import encode_variants, inject, mark_prompt

    model, clip, _ = sdxl
    ident = random_identity(clip, placeholder="<alice>")
    text = "a photo of <alice> at the beach"
    with torch.inference_mode():
        patched, positive = apply_identities(model, clip, text, [ident])
        marked = mark_prompt(clip, text, ["<alice>"])
        expected = [encode_variants(clip, [inject(marked, {"<alice>": {e: ident.k[e][s] for e in ident.k}})])[1][0]
                    for s in range(ident.num_stages)]
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, low quality"))
    seen = []

    def probe(module, args, kwargs):
        options = kwargs["transformer_options"]
        seen.append((kwargs["y"].float().clone(), options["sigmas"].clone(), list(options["cond_or_uncond"])))

    handle = model.model.diffusion_model.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        sample(patched, clip, positive, steps=8, negative=negative)
    finally:
        handle.remove()
    width = expected[0].shape[-1]
    negative_pooled = negative[0][1]["pooled_output"][0].float()
    stages_seen = set()
    for y, sigmas, cond_or_uncond in seen:
        stage = expected_stage(model, sigmas[:1], ident.num_stages)[0]
        rows = y.shape[0] // len(cond_or_uncond)
        for chunk, kind in enumerate(cond_or_uncond):
            for row in y[chunk * rows:(chunk + 1) * rows, :width]:
                want = expected[stage].float() if kind == 0 else negative_pooled
                torch.testing.assert_close(row, want, **CLOSE)
        stages_seen.add(stage)
    assert len(stages_seen) >= 3  # the steps crossed stages, whose pooled outputs differ
    assert not torch.allclose(expected[0].float(), expected[-1].float(), **CLOSE)
