"""SD1 mechanism tests on the tiny SD1 checkpoint, with real ComfyUI objects, loader and samplers."""
from __future__ import annotations

import hashlib

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfy_host")

TEXT = "a photo of <alice> at the beach"


def random_identity(clip, stages=5, seed=0, placeholder="<alice>"):
    from sefi_ide.core.identity import Identity

    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1000, 40000, (2, stages), generator=g)
    return Identity(family="sd1", placeholder=placeholder, init_word="person",
                    k={"clip_l": table[idx[0]].float().clone()}, v={"clip_l": table[idx[1]].float().clone()})


def sample(model, clip, positive, sampler="euler", scheduler="normal", steps=6, batch=1, seed=1, cfg=5.0):
    import comfy.sample

    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, low quality"))
    latent = torch.zeros(batch, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   seed=seed, disable_pbar=True)


def expected_stage(model, sigmas: torch.Tensor, stages: int) -> list[int]:
    # independent of the pack: nearest discrete timestep of each sigma, then floor(t*S/1000)
    log_sigmas = model.get_model_object("model_sampling").sigmas.log()
    t = (sigmas.log()[:, None] - log_sigmas[None]).abs().argmin(dim=1)
    return [min(stages - 1, int(x) * stages // 1000) for x in t]


@pytest.mark.parametrize("sampler,scheduler,batch", [("euler", "normal", 1), ("dpmpp_2m", "karras", 2),
                                                     ("ddim", "ddim_uniform", 1)])
def test_each_step_gets_k_and_v_contexts_of_its_stage(sd1, sampler, scheduler, batch):
    from sefi_ide.host.conditioning import apply_identities, build_stage_contexts

    model, clip, _ = sd1
    ident = random_identity(clip)
    with torch.inference_mode():
        patched, positive = apply_identities(model, clip, TEXT, [ident])
        ck, cv, _, _ = build_stage_contexts(clip, TEXT, [ident])
        neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry, low quality"))[0][0][0]
    seen = []

    def probe(n, context, value, extra):  # runs after our patch, sees what attn2 will use
        seen.append((extra["sigmas"].clone(), list(extra["cond_or_uncond"]), context.clone(), value.clone()))
        return n, context, value

    patched.set_model_attn2_patch(probe)
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
                    assert torch.allclose(k_row, ck[stage[r]], atol=1e-6)
                    assert torch.allclose(v_row, cv[stage[r]], atol=1e-6)
                    stages_seen.add(stage[r])
                else:  # negative: untouched
                    assert torch.equal(k_row, neg) and torch.equal(v_row, neg)
    assert len(stages_seen) >= 3, stages_seen


def test_k_and_v_come_from_different_tokens(sd1):
    from sefi_ide.core.identity import Identity
    from sefi_ide.host.conditioning import apply_identities

    model, clip, _ = sd1
    ident = random_identity(clip)
    swapped = Identity(family="sd1", placeholder="<alice>", init_word="person", k=ident.v, v=ident.k)
    with torch.inference_mode():
        m1, p1 = apply_identities(model, clip, TEXT, [ident])
        a = sample(m1, clip, p1)
        m2, p2 = apply_identities(model, clip, TEXT, [swapped])
        b = sample(m2, clip, p2)
    assert (a - b).abs().max() > 1e-4


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _photo() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 96, 80, 3, generator=g) * 0.3
    img[:, 20:70, 20:60] += 0.6  # a bright "face" blob
    return img.clamp(0, 1)


def test_learn_apply_sample_leaves_model_and_clip_bit_identical(sd1):
    from sefi_ide.nodes.apply import ApplyPerStageIDTokens
    from sefi_ide.nodes.learn import FaceAttentionLossTrainer

    model, clip, vae = sd1
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    plain_before = sample(model, clip, positive)
    hashes = (_state_hash(model.model), _state_hash(clip.cond_stage_model))
    grad_before = torch.is_grad_enabled()
    with torch.inference_mode():
        ident, = FaceAttentionLossTrainer().train(
            model, clip, vae, _photo(), "<alice>", 2, 0, "person", "a photo of the face of {word}", 0.003,
            "3: all 77 token maps (paper's best)", "auto", 5, True, 0.005, 64, 0.2, 0.5, 0.8, 1.2, 1)
        m2, p2 = ApplyPerStageIDTokens().apply(model, clip, TEXT, ident)
        sample(m2, clip, p2)
    assert torch.is_grad_enabled() == grad_before
    assert (_state_hash(model.model), _state_hash(clip.cond_stage_model)) == hashes
    assert torch.equal(sample(model, clip, positive), plain_before)


def test_same_seed_gives_the_same_identity_file(sd1, tmp_path):
    from sefi_ide.core.identity import save_identity
    from sefi_ide.nodes.learn import LearnIDEmbedding

    model, clip, vae = sd1
    files = []
    for i in range(2):
        with torch.inference_mode():
            ident, = LearnIDEmbedding().learn(model, clip, vae, _photo(), "<alice>", 2, 7)
        files.append(save_identity(ident, tmp_path / f"{i}.safetensors").read_bytes())
    assert files[0] == files[1]
    with torch.inference_mode():
        other, = LearnIDEmbedding().learn(model, clip, vae, _photo(), "<alice>", 2, 8)
    assert save_identity(other, tmp_path / "x.safetensors").read_bytes() != files[0]


def _training_setup(sd1, **overrides):
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.images import prepare_reference

    model, clip, vae = sd1
    settings = TrainSettings(resolution=64, color_jitter=0.0, flip_p=0.0, scale_min=1.0, scale_max=1.0,
                             placeholder="<alice>", **overrides)
    reference, _ = prepare_reference(_photo(), None, 64)
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
    ref_ctx = backend.reference_context()
    out = []
    for t, eps in zip(ts, noises):
        s = int(stage_of_timestep(t, identity.num_stages))
        ctx = backend.target_contexts({"clip_l": torch.stack([identity.k["clip_l"][s], identity.v["clip_l"][s]])})
        pred, maps = backend.predict_noise(z0, eps, t[None], ctx[:1], ctx[1:], capture=True)
        if what == "ldm":
            out.append(ldm_loss(eps, pred).item())
        else:
            _, ref_maps = backend.predict_noise(z0, eps, t[None], ref_ctx, ref_ctx, capture=True)
            out.append(attention_loss(maps, ref_maps, TokenOption.ALL, backend.placeholder_index,
                                      backend.eos_index).item())
    return sum(out) / len(out)


def _train(sd1, **overrides):
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.grad_scope import training_scope

    settings, reference, backend = _training_setup(sd1, **overrides)
    with training_scope():
        result = train_identity(backend, reference, settings)
    return result, backend, reference


def test_training_lowers_the_denoising_loss_on_the_reference(sd1):
    from sefi_ide.core.training import _build_generators, _finish

    result, backend, reference = _train(sd1, steps=15, attn_lambda=0.0, seed=0)
    settings = _training_setup(sd1, steps=0)[0]
    untrained = _finish(_build_generators(backend.base_vectors(), settings, None), settings, reference, "sd1")
    with torch.no_grad():
        before = _eval(backend, untrained, reference, "ldm")
        after = _eval(backend, result.identity, reference, "ldm")
    assert after < before, (before, after)


def test_attention_loss_moves_identity_maps_toward_the_reference(sd1):
    plain, backend, reference = _train(sd1, steps=8, attn_lambda=0.0, seed=0)
    guided, _, _ = _train(sd1, steps=8, attn_lambda=1000.0, seed=0)
    with torch.no_grad():
        d_plain = _eval(backend, plain.identity, reference, "attn")
        d_guided = _eval(backend, guided.identity, reference, "attn")
    assert d_guided < d_plain, (d_plain, d_guided)


def test_heatmap_node_gives_one_overlay_per_stage(sd1):
    from sefi_ide.nodes.heatmap import IDAttentionHeatmap

    model, clip, vae = sd1
    ident = random_identity(clip)
    ident.training = {"layers": "auto"}
    with torch.inference_mode():
        maps, = IDAttentionHeatmap().render(model, clip, vae, _photo(), ident, 64, 0)
    assert maps.shape == (5, 64, 64, 3) and 0 <= maps.min() and maps.max() <= 1
    assert not torch.allclose(maps[0], maps[-1])  # stages use different tokens -> different maps


def test_mask_restricts_what_the_identity_learns(sd1):
    from sefi_ide.nodes.learn import LearnIDEmbedding

    model, clip, vae = sd1
    photo = _photo()
    mask = torch.zeros(1, *photo.shape[1:3])
    mask[:, 20:70, 20:60] = 1.0
    with torch.inference_mode():
        free, = LearnIDEmbedding().learn(model, clip, vae, photo, "<alice>", 2, 0)
        masked, = LearnIDEmbedding().learn(model, clip, vae, photo, "<alice>", 2, 0, mask=mask)
    assert not torch.equal(free.k["clip_l"], masked.k["clip_l"])
