"""The training step's mechanism, watched from inside the real host's UNet (tiny SD1 loaded by ComfyUI's checkpoint
loader, tiny SDXL built through ComfyUI's classes). Image quality on tiny random models cannot show a wrong stage,
a wrong noise level or a wrong λ; these probes can.

Probes are plain PyTorch module hooks on the host's modules: what the UNet receives (input latent, timestep) and
returns (ε prediction), and what every cross-attention layer's to_k / to_v projections receive (the K and V
contexts). Expected values are computed independently: the seeded t/ε draws, ComfyUI's own noise scaling, and the
host's own text encoding with the token injected as ComfyUI injects embeddings (a tensor in place of a token id).
"""
from __future__ import annotations

import pytest
import torch
from helpers import CLOSE, photo

pytestmark = pytest.mark.usefixtures("comfy_host")

STAGES = 5
REFERENCE_TEXT = "a photo of the face of person"


@pytest.fixture(params=["sd1", "sdxl"])
def models(request):
    return request.getfixturevalue(request.param)


class UNetProbe:
    """Per UNet call: input latent, timestep, ε prediction, grad mode, and per attn2 layer the K / V contexts."""

    def __init__(self, model):
        unet = model.model.diffusion_model
        self.calls: list[dict] = []
        self.handles = [unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                        unet.register_forward_hook(self._post, with_kwargs=True)]
        for name, module in unet.named_modules():
            for kind in ("k", "v"):
                if name.endswith(f"attn2.to_{kind}"):
                    self.handles.append(module.register_forward_pre_hook(self._context(kind)))

    def _pre(self, module, args, kwargs):
        y = kwargs.get("y")  # SDXL: [pooled | size conditioning]
        self.calls.append({"x": args[0].detach().clone(), "t": args[1].detach().clone(), "k": [], "v": [],
                           "grad": torch.is_grad_enabled(), "y": None if y is None else y.detach().clone()})

    def _post(self, module, args, kwargs, output):
        self.calls[-1]["out"] = output.detach().clone()

    def _context(self, kind):
        def hook(module, args):
            self.calls[-1][kind].append(args[0].detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class GeneratorGradients:
    """Records each training step's generator outputs (k, v) and the gradient the loss sends to them."""

    def __init__(self, monkeypatch):
        from sefi_ide.core.generator import TokenGenerator

        self.steps: list[dict] = []
        original = TokenGenerator.forward

        def forward(gen):
            k, v = original(gen)
            if k.requires_grad:
                entry = {"k": k.detach().clone(), "v": v.detach().clone()}
                self.steps.append(entry)
                k.register_hook(lambda g: entry.__setitem__("k_grad", g.clone()))
                v.register_hook(lambda g: entry.__setitem__("v_grad", g.clone()))
            return k, v

        monkeypatch.setattr(TokenGenerator, "forward", forward)


class LossInputs:
    """Records the maps the attention loss compares (a pass-through wrapper of core.training.attention_loss)."""

    def __init__(self, monkeypatch):
        from sefi_ide.core import training

        self.calls: list[tuple[list, list]] = []
        original = training.attention_loss

        def attention_loss(tgt, ref, *args):
            self.calls.append((tgt, ref))
            return original(tgt, ref, *args)

        monkeypatch.setattr(training, "attention_loss", attention_loss)


def _settings(**overrides):
    from sefi_ide.core.settings import TrainSettings

    values = {"resolution": 64, "color_jitter": 0.0, "flip_p": 0.0, "scale_min": 1.0, "scale_max": 1.0,
              "placeholder": "<alice>", "steps": 1, "seed": 3, "batch_size": 3, "attn_lambda": 1000.0}
    values.update(overrides)
    return TrainSettings(**values)


def _distinct_start(backend, settings):
    """An identity to start from whose 10 tokens all differ (a generator with random per-slot offsets), so a
    wrong stage or a K/V mix-up shows. Returned with those tokens per encoder."""
    from sefi_ide.core.generator import GENERATOR_VERSION, TokenGenerator
    from sefi_ide.core.identity import Identity

    g = torch.Generator().manual_seed(11)
    state, tokens = {}, {}
    for enc, base in sorted(backend.base_vectors().items()):
        torch.manual_seed(0)
        gen = TokenGenerator(base, settings.num_stages)
        with torch.no_grad():
            gen.slot_offsets.copy_(torch.randn(gen.slot_offsets.shape, generator=g) * 0.05)
            tokens[enc] = gen()
        state.update({f"{enc}.{n}": t.clone() for n, t in gen.state_dict().items()})
    k = {e: t[0] for e, t in tokens.items()}
    v = {e: t[1] for e, t in tokens.items()}
    start = Identity(family=backend.family, placeholder="<alice>", init_word="person", k=k, v=v,
                     generator_state=state, generator_version=GENERATOR_VERSION)
    return start, k, v


def _host_encoding(clip, rows: dict[str, torch.Tensor] | None, pooled: bool = False):
    """The host's own encoding of the reference prompt, with `person` replaced by the given vectors (or not); with
    `pooled`, its pooled output (SDXL: OpenCLIP-G's)."""
    tokens = clip.tokenize(REFERENCE_TEXT)
    if rows is not None:
        person = clip.tokenize("person")["l"][0][1][0]
        for key, enc in (("l", "clip_l"), ("g", "clip_g")):
            if key in tokens:
                chunk = tokens[key][0]
                i = next(i for i, t in enumerate(chunk) if t[0] == person)
                chunk[i] = (rows[enc],) + tuple(chunk[i][1:])
    with torch.no_grad():
        cond, pooled_output = clip.encode_from_tokens(tokens, return_pooled=True)
    return pooled_output[0] if pooled else cond[0]


def _train(models, settings, resume=None):
    from sefi_ide.core.training import train_identity
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    model, clip, vae = models
    reference, _ = prepare_reference(photo(), None, settings.resolution)
    with torch.inference_mode(), training_scope():
        backend = ComfyTrainingBackend(model, clip, vae, settings)
        start = resume(backend, settings) if resume else None
        probe = UNetProbe(model)
        try:
            result = train_identity(backend, reference, settings, resume=start[0] if start else None)
        finally:
            probe.remove()
        z0 = backend.latents(reference)
    return result, probe.calls, start, z0


def _draws(settings, z0):
    """The step's t and ε, drawn from the seed as the loop's contract says (t first, then ε)."""
    rng = torch.Generator().manual_seed(settings.seed)
    t = torch.randint(0, 1000, (settings.batch_size,), generator=rng)
    return t, torch.randn((settings.batch_size, *z0.shape[1:]), generator=rng)


def test_the_latents_are_the_hosts_own_vae_encoding(models):
    """The step encodes on the device without the host's round trip through the CPU: the same numbers."""
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.images import prepare_reference

    model, clip, vae = models
    settings = _settings()
    images = torch.cat([prepare_reference(photo(), None, settings.resolution)[0]] * 2)
    images[1] = images[1].flip(-1)
    with torch.inference_mode(), training_scope():
        z0 = ComfyTrainingBackend(model, clip, vae, settings).latents(images)
        expected = model.model.process_latent_in(vae.encode(images.permute(0, 2, 3, 1)).float())
    assert z0.shape == expected.shape and torch.equal(z0, expected)


def test_sdxl_size_conditioning_is_the_hosts_own_built_once_and_joined_to_each_steps_pooled_rows(sdxl, monkeypatch):
    from sefi_ide.host.backend import UNetPass

    model = sdxl[0]
    calls = []
    host_encode_adm = model.model.encode_adm
    monkeypatch.setattr(model.model, "encode_adm", lambda **kw: calls.append(kw) or host_encode_adm(**kw))
    unet_pass = UNetPass(model, [])
    z0 = torch.zeros(3, 4, 8, 12)  # 64 x 96 px: height and width must not be swapped
    for seed in range(3):  # three steps
        pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(seed))
        expected = host_encode_adm(pooled_output=pooled, width=96, height=64, target_width=96, target_height=64,
                                   crop_w=0, crop_h=0).expand(3, -1)
        assert torch.equal(unet_pass._adm(pooled, z0), expected)
    assert len(calls) == 1  # the size part once, not every step


def test_the_text_encoders_outputs_stay_on_the_unets_device_and_never_pass_through_the_hosts_intermediate_device(
        models, monkeypatch):
    """The host's text encoder sends its outputs to `intermediate_device()` (the CPU beside a GPU: a copy the step
    waits on, forward and backward). Here the host's intermediate device is one that holds no data (meta): a
    training run whose text outputs went there could not learn. It learns exactly what it learns without it, and
    the host's function is back afterwards."""
    import comfy.model_management

    settings = _settings(steps=2)
    expected = _train(models, settings)[0].identity
    meta = lambda: torch.device("meta")
    monkeypatch.setattr(comfy.model_management, "intermediate_device", meta)
    got = _train(models, settings)[0].identity
    assert comfy.model_management.intermediate_device is meta
    for table in ("k", "v"):
        for enc, tokens in getattr(expected, table).items():
            assert torch.equal(getattr(got, table)[enc], tokens), (table, enc)


def test_each_step_encodes_the_text_before_it_queues_the_vae_and_the_unet(models, monkeypatch):
    """The text encoder's token ids are uploaded from host memory, and each such upload waits for the GPU's queue to
    drain: the step issues them before the VAE's and the UNet's work, so they never wait for that."""
    import itertools

    model, clip, vae = models
    events: list[str] = []
    handles = [getattr(clip.cond_stage_model, enc).register_forward_pre_hook(lambda *_: events.append("text"))
               for enc in ("clip_l", "clip_g") if hasattr(clip.cond_stage_model, enc)]
    handles.append(model.model.diffusion_model.register_forward_pre_hook(lambda *_: events.append("unet")))
    encode = vae.first_stage_model.encode
    monkeypatch.setattr(vae.first_stage_model, "encode", lambda *a, **kw: events.append("vae") or encode(*a, **kw))
    try:
        _train(models, _settings(steps=3))
    finally:
        for handle in handles:
            handle.remove()
    phases = [phase for phase, _ in itertools.groupby(events)]
    # 3 steps (the reference prompt's encoding joins the first step's text), then _train's own z0
    assert phases == ["text", "vae", "unet"] * 3 + ["vae"]


def test_outside_the_training_text_call_and_in_other_threads_the_hosts_intermediate_device_is_unchanged():
    import threading

    import comfy.model_management
    from sefi_ide.host.text import host_outputs_on

    host = comfy.model_management.intermediate_device
    seen = {}
    with host_outputs_on(torch.device("meta")):
        thread = threading.Thread(target=lambda: seen.update(other=comfy.model_management.intermediate_device()))
        thread.start()
        thread.join()
        seen["this"] = comfy.model_management.intermediate_device()
    assert seen == {"this": torch.device("meta"), "other": host()}
    assert comfy.model_management.intermediate_device is host


def _step_in_several_stages(models, settings):
    """One learning step from tokens away from the init word: (the UNet call with gradient, (k, v) tokens, the rows'
    timesteps, the rows' stages), the seed drawing rows in at least two stages."""
    _, calls, (_, k, v), z0 = _train(models, settings, resume=_distinct_start)
    t, _ = _draws(settings, z0)
    stages = [min(STAGES - 1, int(x) * STAGES // 1000) for x in t]
    assert len(set(stages)) >= 2, stages  # the seed gives rows in different stages
    return next(c for c in calls if c["grad"]), (k, v), t, stages


@pytest.mark.parametrize("kv_split", [True, False])
def test_each_row_gets_its_stages_k_and_v_tokens_at_every_cross_attention_layer_and_only_they_get_gradient(
        models, monkeypatch, kv_split):
    _, clip, _ = models
    settings = _settings(kv_split=kv_split)
    grads = GeneratorGradients(monkeypatch)
    target, (k, v), t, stages = _step_in_several_stages(models, settings)
    rows = slice(target["x"].shape[0] - settings.batch_size, None)  # the target rows (after any reference rows)
    torch.testing.assert_close(target["t"][rows], t.float())
    assert len(target["k"]) == len(target["v"]) > 0
    for r, s in enumerate(stages):
        expect_k = _host_encoding(clip, {e: k[e][s] for e in k})
        expect_v = _host_encoding(clip, {e: (v if kv_split else k)[e][s] for e in k})
        for ck, cv in zip(target["k"], target["v"]):
            torch.testing.assert_close(ck[rows][r], expect_k, **CLOSE)
            torch.testing.assert_close(cv[rows][r], expect_v, **CLOSE)
        if s != (s + 1) % STAGES:  # the neighbour stage's tokens would not match: the check can tell stages apart
            wrong = _host_encoding(clip, {e: k[e][(s + 1) % STAGES] for e in k})
            assert not torch.allclose(target["k"][0][rows][r], wrong, **CLOSE)
    # gradient: only the sampled stages' rows, K and V each through its own path (V none when V uses the K token)
    assert len(grads.steps) == len(k)  # one generator per text encoder, each called once in the step
    for entry in grads.steps:
        entry.setdefault("v_grad", torch.zeros_like(entry["v"]))  # no V path in the graph at all: no hook call
        for s in range(STAGES):
            assert (entry["k_grad"][s].abs().sum() > 0) == (s in stages), (s, stages)
            assert (entry["v_grad"][s].abs().sum() > 0) == (s in stages and kv_split), (s, stages)


def test_sdxl_each_row_gets_the_pooled_output_of_its_own_stages_k_token(sdxl):
    """Rows draw their own timesteps, so their own stages: each row's `y` starts with the host's pooled output of the
    prompt with that row's stage K token (as sampling gives each step its stage's), not row 0's."""
    _, clip, _ = sdxl
    settings = _settings()
    target, (k, _), _, stages = _step_in_several_stages(sdxl, settings)
    y = target["y"][target["y"].shape[0] - settings.batch_size:].float()  # the target rows
    for r, s in enumerate(stages):
        expected = _host_encoding(clip, {e: k[e][s] for e in k}, pooled=True).float()
        torch.testing.assert_close(y[r, :expected.shape[-1]], expected, **CLOSE)
        other = next(o for o in stages if o != s)  # another stage's pooled output differs: the check tells them apart
        wrong = _host_encoding(clip, {e: k[e][other] for e in k}, pooled=True).float()
        assert not torch.allclose(y[r, :expected.shape[-1]], wrong, **CLOSE)


@pytest.mark.parametrize("in_batch", [True, False])
def test_the_unet_sees_comfyuis_noise_scaling_at_the_sampled_timestep_and_l_ldm_uses_that_noise(
        sd1, monkeypatch, in_batch):
    model = sd1[0]
    settings = _settings(reference_in_batch=in_batch)
    result, calls, _, z0 = _train(sd1, settings)
    t, eps = _draws(settings, z0)
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigma(t)
    x = ms.noise_scaling(sigma, eps, z0.expand(settings.batch_size, -1, -1, -1))  # ComfyUI's own z_t
    target = next(c for c in calls if c["grad"])
    rows = slice(target["x"].shape[0] - settings.batch_size, None)
    torch.testing.assert_close(target["x"][rows], ms.calculate_input(sigma.view(-1, 1, 1, 1), x), **CLOSE)
    torch.testing.assert_close(target["t"][rows], t.float())
    l_ldm = (eps - target["out"][rows]).pow(2).mean().item()  # the UNet's ε prediction against the drawn ε
    assert result.history[0]["ldm"] == pytest.approx(l_ldm, rel=1e-4)
    assert result.history[0]["t"] == int(t[0])


@pytest.mark.parametrize("in_batch", [True, False])
def test_the_reference_pass_is_the_plain_reference_prompt_on_the_same_latent_and_timestep_without_gradient(
        models, monkeypatch, in_batch):
    _, clip, _ = models
    recorded = LossInputs(monkeypatch)
    settings = _settings(reference_in_batch=in_batch)
    _, calls, _, _ = _train(models, settings)
    B = settings.batch_size
    plain = clip.encode_from_tokens_scheduled(clip.tokenize(REFERENCE_TEXT))[0][0][0]  # what CLIPTextEncode gives
    if in_batch:
        (joint,) = calls  # reference rows first, then the target rows
        ref = {"x": joint["x"][:B], "t": joint["t"][:B], "k": [c[:B] for c in joint["k"]],
               "v": [c[:B] for c in joint["v"]]}
        tgt = {"x": joint["x"][B:], "t": joint["t"][B:]}
    else:
        ref_call, tgt_call = calls
        assert not ref_call["grad"] and tgt_call["grad"]
        ref, tgt = ref_call, tgt_call
    assert torch.equal(ref["x"], tgt["x"]) and torch.equal(ref["t"], tgt["t"])
    for ck, cv in zip(ref["k"], ref["v"]):
        for r in range(B):
            torch.testing.assert_close(ck[r], plain, **CLOSE)
            torch.testing.assert_close(cv[r], plain, **CLOSE)
    (tgt_maps, ref_maps), = recorded.calls
    assert all(m.requires_grad for m in tgt_maps) and not any(m.requires_grad for m in ref_maps)


def test_reference_maps_are_the_same_in_one_batch_and_in_a_separate_pass(sd1, monkeypatch):
    maps = {}
    for in_batch in (True, False):
        recorded = LossInputs(monkeypatch)
        _train(sd1, _settings(reference_in_batch=in_batch))
        maps[in_batch] = recorded.calls[0][1]
    for a, b in zip(maps[True], maps[False], strict=True):
        torch.testing.assert_close(a, b, **CLOSE)


def test_the_loss_is_l_ldm_plus_lambda_times_l_attn_and_lambda_scales_the_attention_gradient(sd1, monkeypatch):
    """Recorded loss = L_LDM + λ·L_attn at λ = 0, the default and a large one, and the gradient the generator gets is
    linear in λ with the attention part entering at exactly λ (g(λ) − g(0) = λ/λ'·(g(λ') − g(0))). Starts from
    tokens away from the init word: at the init word the two prompts' maps are equal and L_attn is 0."""
    grads, histories = {}, {}
    for lam in (0.0, 0.003, 500.0, 1000.0):
        recorder = GeneratorGradients(monkeypatch)
        result, _, _, _ = _train(sd1, _settings(attn_lambda=lam, batch_size=1), resume=_distinct_start)
        histories[lam] = result.history[0]
        grads[lam] = torch.cat([recorder.steps[0]["k_grad"], recorder.steps[0]["v_grad"]])
    for lam, rec in histories.items():
        assert rec["loss"] == pytest.approx(rec["ldm"] + lam * rec["attn"], rel=1e-5, abs=1e-9)
        assert (rec["attn"] == 0.0) == (lam == 0.0)
    attn_part = grads[1000.0] - grads[0.0]
    assert attn_part.abs().max() > 10 * grads[0.0].abs().max() * 1e-3  # the attention gradient is not negligible
    torch.testing.assert_close(grads[500.0] - grads[0.0], attn_part * 0.5, rtol=1e-3, atol=1e-3 * attn_part.abs().max())
    torch.testing.assert_close(grads[0.003] - grads[0.0], attn_part * 3e-6, rtol=0.05,
                               atol=0.05 * 3e-6 * attn_part.abs().max().item())


@pytest.mark.parametrize("option", [1, 2, 3])
def test_each_token_option_compares_the_columns_it_names(models, monkeypatch, option):
    """Independently of the loss code: option 1 = the placeholder's column (where 'person' sits in the host's
    tokenization), 2 = BOS..EOS, 3 = all 77; L_attn = mean over layers of 256 · mean over rows·heads·pixels of the
    column-summed squared difference."""
    from sefi_ide.core.losses import TokenOption

    _, clip, _ = models
    ids = [t[0] for t in clip.tokenize(REFERENCE_TEXT)["l"][0]]
    placeholder = ids.index(clip.tokenize("person")["l"][0][1][0])
    eos = ids.index(clip.tokenize("")["l"][0][1][0], 1)
    columns = {1: [placeholder], 2: list(range(eos + 1)), 3: list(range(77))}[option]
    recorded = LossInputs(monkeypatch)
    result, _, _, _ = _train(models, _settings(token_option=TokenOption(option), batch_size=1),
                             resume=_distinct_start)  # tokens away from the init word: the maps differ
    (tgt, ref), = recorded.calls
    expected = torch.stack([(a.detach()[..., columns] - b[..., columns]).pow(2).sum(-1).mean() * 256
                            for a, b in zip(tgt, ref)]).mean().item()
    assert result.history[0]["attn"] == pytest.approx(expected, rel=1e-4)
    others = [c for c in range(77) if c not in columns]
    if others:  # the columns left out do differ: leaving them out changes the loss
        assert any((a.detach()[..., others] - b[..., others]).abs().max() > 1e-6 for a, b in zip(tgt, ref))


def test_strength_gives_e_plus_s_times_token_minus_e_at_every_stage(models):
    import dataclasses

    from helpers import random_identity
    from sefi_ide.host.conditioning import build_stage_contexts
    from sefi_ide.host.text import word_embedding

    _, clip, _ = models
    ident = random_identity(clip, placeholder="<alice>")
    e = word_embedding(clip, "person")
    text = "a photo of the face of <alice>"
    for s in (0.25, 0.6, 1.5):
        with torch.inference_mode():
            ck, cv, *_ = build_stage_contexts(clip, text, [dataclasses.replace(ident, strength=s)])
        for stage in (0, 3):
            for table, got in (("k", ck), ("v", cv)):
                rows = {enc: e[enc] + s * (getattr(ident, table)[enc][stage] - e[enc]) for enc in e}
                torch.testing.assert_close(got[stage], _host_encoding(clip, rows), **CLOSE)
