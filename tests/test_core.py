"""Pure-torch core: no ComfyUI needed."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from helpers import OpCounter
from sefi_ide.core.errors import SeFiError
from sefi_ide.core.generator import TokenGenerator
from sefi_ide.core.identity import Identity, load_identity, safe_child_path, save_identity
from sefi_ide.core.losses import TokenOption, attention_loss, ldm_loss
from sefi_ide.core.stages import stage_of_timestep, stage_timestep_range


def make_identity(family="sd1", stages=5, seed=0) -> Identity:
    g = torch.Generator().manual_seed(seed)
    widths = {"sd1": {"clip_l": 768}, "sdxl": {"clip_l": 768, "clip_g": 1280}}[family]
    return Identity(family=family, placeholder="<alice>", init_word="person",
                    k={e: torch.randn(stages, w, generator=g) for e, w in widths.items()},
                    v={e: torch.randn(stages, w, generator=g) for e, w in widths.items()},
                    training={"steps": 3}, reference_sha256="ab" * 32,
                    generator_state={"clip_l.positions": torch.randn(2 * stages, 768, generator=g)})


def test_stage_mapping_splits_timesteps_evenly():
    t = torch.arange(1000)
    stages = stage_of_timestep(t, 5)
    assert stages.tolist() == [i // 200 for i in range(1000)]
    assert stage_of_timestep(999, 5).item() == 4 and stage_of_timestep(1000, 5).item() == 4
    for S in (1, 3, 7, 10):
        st = stage_of_timestep(t, S)
        for s in range(S):
            lo, hi = stage_timestep_range(s, S)
            assert (st[lo: hi + 1] == s).all() and (lo == 0 or st[lo - 1] == s - 1)


def test_generator_starts_at_init_word_and_gives_distinct_tokens_after_a_step():
    base = torch.randn(768) * 0.02
    gen = TokenGenerator(base, num_stages=5)
    k, v = gen()
    assert k.shape == v.shape == (5, 768)
    assert torch.allclose(k, base.expand(5, -1)) and torch.allclose(v, base.expand(5, -1))
    opt = torch.optim.Adam(gen.parameters(), lr=0.005)
    target = torch.randn(10, 768)
    loss = ((torch.cat(gen()) - target) ** 2).mean()
    loss.backward()
    opt.step()
    k2, v2 = gen()
    assert not torch.allclose(k2, k)
    assert (k2 - base).norm(dim=-1).max() < 10 * base.norm()  # one step moves tokens, does not blow them up
    assert len({tuple(r.tolist()) for r in torch.cat([k2, v2])}) == 10


def _reach_per_slot_targets(params, tokens, targets, steps=400) -> float:
    """Adam at the paper's lr; as in training, each step gives gradient to one stage's (k, v) pair only."""
    opt = torch.optim.Adam(params, lr=0.005)
    g = torch.Generator().manual_seed(0)
    S = targets.shape[0] // 2
    for _ in range(steps):
        s = int(torch.randint(0, S, (1,), generator=g))
        loss = (tokens()[[s, S + s]] - targets[[s, S + s]]).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (tokens() - targets).norm(dim=-1).mean().item()


def test_generator_reaches_different_per_slot_targets_about_as_well_as_free_tokens():
    """The paper's second idea needs 2·S tokens that can differ: with a different target per (stage, K|V) slot
    the generator must get about as close as optimising the 10 tokens directly (the version-1 generator stayed
    at 1.11 from a start of 1.16, free tokens reached 0.03)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(768, generator=g) * 0.014  # CLIP-L word-embedding scale (|e| ~ 0.4)
    targets = base + torch.randn(10, 768, generator=g) * 0.042
    start = (targets - base).norm(dim=-1).mean().item()
    free = base.expand(10, -1).clone().requires_grad_(True)
    direct = _reach_per_slot_targets([free], lambda: free, targets)
    torch.manual_seed(1)
    gen = TokenGenerator(base, num_stages=5)
    generated = _reach_per_slot_targets(list(gen.parameters()), lambda: torch.cat(gen()), targets)
    assert direct < 0.05 * start, (start, direct)
    assert generated < 0.1 * start and generated < 3 * direct, (start, direct, generated)


def test_attention_loss_options_select_the_right_maps():
    tgt = torch.zeros(2, 4, 77)
    ref = torch.zeros(2, 4, 77)
    tgt[..., 7] = 1.0  # differs only in the placeholder column
    tgt[..., 20] = 1.0  # and in a padding column after EOS (index 9)
    one = attention_loss([tgt], [ref], TokenOption.PLACEHOLDER, placeholder=7, eos=9)
    two = attention_loss([tgt], [ref], TokenOption.PROMPT, placeholder=7, eos=9)
    three = attention_loss([tgt], [ref], TokenOption.ALL, placeholder=7, eos=9)
    # 4 pixels each off by 1 in one column: the per-pixel mean (1 per column) times the 256 reference pixels
    assert one.item() == pytest.approx(256.0) and two.item() == pytest.approx(256.0)
    assert three.item() == pytest.approx(512.0)


def test_attention_loss_means_the_same_at_any_map_size_and_the_papers_sum_at_16x16():
    """λ must weigh L_attn the same on SD1 (16x16 loss maps at 512 px) and SDXL (32x32 at 1024 px), and at 16x16
    equal the paper's sum over the map, so λ = 0.003 keeps its meaning there."""
    g = torch.Generator().manual_seed(0)
    tgt = torch.softmax(torch.randn(8, 16, 16, 77, generator=g), -1)
    ref = torch.softmax(torch.randn(8, 16, 16, 77, generator=g), -1)
    small = attention_loss([tgt.flatten(1, 2)], [ref.flatten(1, 2)], TokenOption.ALL, 5, 9)
    paper_sum = (tgt - ref).pow(2).sum(dim=(1, 2, 3)).mean()  # Σ over the 16x16 map and tokens, mean over heads
    torch.testing.assert_close(small, paper_sum)

    def upsample(m):  # the same map at 32x32
        return m.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).flatten(1, 2)

    large = attention_loss([upsample(tgt)], [upsample(ref)], TokenOption.ALL, 5, 9)
    torch.testing.assert_close(large, small)


def test_ldm_loss_mask_restricts_region():
    eps = torch.zeros(1, 4, 8, 8)
    pred = torch.zeros(1, 4, 8, 8)
    pred[..., :4] = 1.0
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0
    assert ldm_loss(eps, pred, mask).item() == 0.0
    assert ldm_loss(eps, pred).item() == pytest.approx(0.5)


def test_identity_file_round_trips_bit_exactly(tmp_path):
    ident = make_identity("sdxl")
    path = save_identity(ident, tmp_path / "a.safetensors")
    back = load_identity(path)
    for enc in ident.k:
        assert torch.equal(back.k[enc], ident.k[enc]) and torch.equal(back.v[enc], ident.v[enc])
    assert torch.equal(back.generator_state["clip_l.positions"], ident.generator_state["clip_l.positions"])
    assert (back.family, back.placeholder, back.init_word, back.training, back.reference_sha256) == (
        "sdxl", "<alice>", "person", {"steps": 3}, "ab" * 32)
    save_identity(back, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_tokens_only_file_is_small(tmp_path):
    path = save_identity(make_identity(), tmp_path / "a.safetensors", include_generator=False)
    assert path.stat().st_size < 40_000


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path):
    save_identity(make_identity(seed=1), tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(SeFiError, match="already exists"):
        save_identity(make_identity(seed=2), tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == before
    bad = make_identity()
    bad.k["clip_l"] = torch.full((5, 768), float("nan"))
    with pytest.raises(SeFiError, match="NaN"):
        save_identity(bad, tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def _write_raw(path, tensors, meta):
    import safetensors.torch

    safetensors.torch.save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("case,match", [
    ("truncated", "truncated or corrupted"),
    ("wrong_shape", "has shape"),
    ("future", "newer pack"),
    ("not_identity", "not a SeFi-IDE identity"),
    ("pickle", "safetensors only"),
])
def test_bad_files_are_refused_with_a_message_naming_the_file(tmp_path, case, match):
    path = save_identity(make_identity(), tmp_path / "id.safetensors")
    meta = {"format": "sefi-ide-identity", "format_version": "1", "family": "sd1", "stages": "5",
            "placeholder": "<a>", "init_word": "person", "training": json.dumps({})}
    if case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "wrong_shape":
        _write_raw(path, {"k.clip_l": torch.zeros(5, 1280), "v.clip_l": torch.zeros(5, 1280)}, meta)
    elif case == "future":
        _write_raw(path, {"k.clip_l": torch.zeros(5, 768), "v.clip_l": torch.zeros(5, 768)},
                   dict(meta, format_version="99"))
    elif case == "not_identity":
        _write_raw(path, {"x": torch.zeros(1)}, {"format": "pt"})
    elif case == "pickle":
        path = tmp_path / "id.pt"
        torch.save({"k": 1}, path)
    with pytest.raises(SeFiError, match=match) as err:
        load_identity(path)
    assert path.name in str(err.value)


def test_family_mismatch_names_both_families():
    with pytest.raises(SeFiError, match="SDXL.*Stable Diffusion 1.x"):
        make_identity("sdxl").check_family("sd1")


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/passwd", "a/../../b.safetensors", ""])
def test_file_names_cannot_escape_the_identities_folder(tmp_path, name):
    with pytest.raises(SeFiError):
        safe_child_path(tmp_path / "ids", name)


class _ToyBackend:
    """A pure-torch stand-in for the diffusion model, to test the loop's bookkeeping without ComfyUI."""

    family = "sd1"
    placeholder_index = 1
    eos_index = 2
    device = torch.device("cpu")

    def __init__(self, nan_at_call: int | None = None, nan_grad_at_call: int | None = None):
        self.calls = 0
        self.nan_at_call = nan_at_call
        self.nan_grad_at_call = nan_grad_at_call

    def base_vectors(self):
        return {"clip_l": torch.full((768,), 0.01)}

    def reference_context(self):
        return torch.zeros(1, 77, 768), None

    def target_contexts(self, rows):
        return rows["clip_l"][:, None, :].expand(-1, 77, -1), None

    def latents(self, images):
        return torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True).repeat(1, 4, 1, 1), 8)

    def latent_mask(self, mask, shape):
        return torch.nn.functional.interpolate(mask, size=shape[-2:])

    def predict_noise(self, z0, eps, t, context_k, context_v, capture, pooled=None, chunks=1):
        self.calls += 1
        pred = eps * 0 + (context_k.mean() + context_v.mean()) * 10
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            pred = pred * float("nan")
        if self.nan_grad_at_call is not None and self.calls >= self.nan_grad_at_call and pred.requires_grad:
            pred.register_hook(lambda g: g * float("nan"))  # a finite loss whose gradients are not
        maps = [torch.softmax(context_k.mean(-1, keepdim=True).expand(-1, 77, 77) * 0, -1)] if capture else []
        return pred, maps


class _Cancelled(BaseException):
    """Like ComfyUI 0.28's InterruptProcessingException: not an Exception."""


@pytest.mark.parametrize("cause", [_Cancelled, KeyboardInterrupt, RuntimeError])
def test_cancel_of_any_exception_base_keeps_the_last_good_state(cause):
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import TrainingStopped, train_identity

    def cancel_at_two(step, steps, record):
        if step == 2:
            raise cause()

    settings = TrainSettings(steps=6, resolution=64, attn_lambda=0.0, color_jitter=0.0, scale_min=1.0, scale_max=1.0)
    with pytest.raises(TrainingStopped) as stopped:
        train_identity(_ToyBackend(), torch.rand(1, 3, 64, 64), settings, on_step=cancel_at_two)
    assert type(stopped.value.cause) is cause and stopped.value.partial.identity.trained_steps == 2


def test_divergence_stops_reports_the_step_and_keeps_the_last_good_state():
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import TrainingStopped, train_identity

    settings = TrainSettings(steps=6, resolution=64, attn_lambda=0.0, color_jitter=0.0, scale_min=1.0, scale_max=1.0)
    with pytest.raises(TrainingStopped) as stopped:
        train_identity(_ToyBackend(nan_at_call=3), torch.rand(1, 3, 64, 64), settings)
    assert isinstance(stopped.value.cause, SeFiError) and "step 3" in str(stopped.value.cause)
    partial = stopped.value.partial.identity
    assert partial.trained_steps == 2 and torch.isfinite(partial.k["clip_l"]).all()
    with pytest.raises(TrainingStopped) as stopped:
        train_identity(_ToyBackend(nan_grad_at_call=2), torch.rand(1, 3, 64, 64), settings)
    assert "step 2" in str(stopped.value.cause) and "gradients became NaN" in str(stopped.value.cause)
    partial = stopped.value.partial.identity
    assert partial.trained_steps == 1 and torch.isfinite(partial.k["clip_l"]).all()
    for bad, match in (({"steps": 0}, "steps must be"), ({"lr": float("inf")}, "lr must be"),
                       ({"attn_lambda": float("nan")}, "λ must be"), ({"scale_min": 2.0}, "scale_min")):
        with pytest.raises(SeFiError, match=match):
            train_identity(_ToyBackend(), torch.rand(1, 3, 64, 64), TrainSettings(resolution=64, **bad))


def test_training_scope_lets_host_weight_moves_reach_the_real_weights():
    """The host moves weights with `param.data = moved` (Module.to) and may do so inside our scope (CLIP
    encode loads itself). The move must land on the real parameter, which stays an inference tensor;
    on a GPU the alias used to take the move and the host's model stayed behind on the CPU."""
    from sefi_ide.host.grad_scope import training_scope

    with torch.inference_mode():
        layer = torch.nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    with training_scope():
        layer.to(torch.float64)  # stands in for a device move: same code path (set_data)
        layer(x).sum().backward()
    assert layer.weight.dtype == torch.float64 and layer.weight.is_inference()
    assert torch.equal(layer.weight.float(), before)
    assert torch.allclose(x.grad, before.double().sum(0))
    with torch.inference_mode():
        assert layer(x.detach()).dtype == torch.float64


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))


def _inference_mlp() -> torch.nn.Module:
    with torch.inference_mode():
        torch.manual_seed(0)
        return _mlp()


def _ordinary_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The same network with ordinary (non-inference) weights: the gradients to expect."""
    with torch.inference_mode(False):
        copy = _mlp()
        copy.load_state_dict({k: v.clone() for k, v in module.state_dict().items()})
    return copy.requires_grad_(False)


def test_grad_pass_runs_on_swapped_aliases_without_the_per_call_hook_and_restores_the_weights():
    """The fast gradient pass: inside it the host's weights are ordinary zero-copy aliases and training_scope's
    mode is off torch's stack (no Python hook per call); after it, the very same inference parameters."""
    from sefi_ide.host.grad_scope import grad_pass, training_scope

    mlp = _inference_mlp()
    originals = {n: p for n, p in mlp.named_parameters()}
    values = {n: p.detach().clone() for n, p in originals.items()}
    seen = {}

    def pass_():
        seen["mode"] = torch.overrides._get_current_function_mode()
        seen["weights"] = {n: (p.is_inference(), p.data_ptr()) for n, p in mlp.named_parameters()}
        return mlp(x)

    x = torch.randn(5, 3, requires_grad=True)
    with training_scope():
        grad_pass(mlp, pass_).square().sum().backward()
        assert torch.overrides._get_current_function_mode() is not None  # the scope's mode is back
    assert seen["mode"] is None
    assert seen["weights"] == {n: (False, p.data_ptr()) for n, p in originals.items()}  # aliases, same storage
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, p in mlp.named_parameters():
        assert p is originals[n] and p.is_inference() and torch.equal(p, values[n])
    assert torch.allclose(x.grad, torch.autograd.grad(_ordinary_copy(mlp)(x).square().sum(), x)[0])


def test_grad_pass_moves_the_real_weights_when_the_host_moves_them_inside_the_pass():
    """A host load/offload inside the pass lands on the aliases; on exit the real parameters follow."""
    from sefi_ide.host.grad_scope import grad_pass, training_scope

    mlp = _inference_mlp()
    weight = mlp[0].weight
    before = weight.detach().clone()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with training_scope():
        out = grad_pass(mlp, lambda: (mlp.to(torch.float64), mlp(x))[1])  # stands in for a device move
        out.sum().backward()
    assert mlp[0].weight is weight and weight.dtype == torch.float64 and weight.is_inference()
    assert torch.equal(weight.float(), before) and x.grad is not None
    with torch.inference_mode():
        assert mlp(x.detach()).dtype == torch.float64


def test_grad_pass_falls_back_to_per_call_aliasing_for_an_unreachable_inference_tensor(caplog):
    """Another pack's patch may hold an inference tensor the swap cannot reach: autograd refuses it at once,
    the pass re-runs under per-call aliasing (same result), is logged, and that module stays per-call."""
    from sefi_ide.host.grad_scope import _ACTIVE, grad_pass, training_scope

    mlp = _inference_mlp()
    with torch.inference_mode():
        patch_scale = torch.full((2,), 3.0)  # held outside the module, made under inference mode
    x = torch.randn(4, 3, requires_grad=True)
    calls = []

    def pass_():
        calls.append(torch.overrides._get_current_function_mode())
        return mlp(x) * patch_scale * mlp(x)  # saving patch_scale for backward needs an ordinary tensor

    with training_scope():
        out = grad_pass(mlp, pass_)
        out.sum().backward()
        assert id(mlp) in _ACTIVE[-1].per_call
        grad_pass(mlp, pass_)
    assert calls[0] is None and calls[1] is not None and calls[2] is not None  # swapped, then per-call twice
    assert "holds inference tensors" in caplog.text
    assert all(p.is_inference() for p in mlp.parameters())
    plain = _ordinary_copy(mlp)
    assert torch.allclose(x.grad, torch.autograd.grad((plain(x) * 3.0 * plain(x)).sum(), x)[0])


def test_grad_pass_restores_the_weights_when_the_pass_fails():
    from sefi_ide.host.grad_scope import grad_pass, training_scope

    mlp = _inference_mlp()
    originals = list(mlp.parameters())

    def failing():
        raise ValueError("boom")

    with training_scope(), pytest.raises(ValueError, match="boom"):
        grad_pass(mlp, failing)
    assert all(a is b and a.is_inference() for a, b in zip(mlp.parameters(), originals))


class _HalfPrecisionToyBackend(_ToyBackend):
    """The toy model's backward runs through an fp16 op with a small weight, as a deep fp16 UNet's does: the
    per-element gradient there (~1e-8) is below fp16's smallest subnormal (6e-8) unless the loss is scaled."""

    compute_dtype = torch.float16

    def __init__(self, inf_grad_at_call: int | None = None):
        super().__init__()
        self.inf_grad_at_call = inf_grad_at_call

    def predict_noise(self, z0, eps, t, context_k, context_v, capture, pooled=None, chunks=1):
        self.calls += 1
        h = ((context_k.mean() + context_v.mean()) * torch.ones_like(eps)).half()
        pred = (h * torch.tensor(1e-6, dtype=torch.float16)).float() + eps * 0.5
        if self.inf_grad_at_call == self.calls and pred.requires_grad:
            pred.register_hook(lambda g: g * float("inf"))  # one overflow, as a too-high scale gives
        return pred, []


class _Float32TwinToyBackend(_HalfPrecisionToyBackend):
    """The same toy model in float32: nothing underflows, nothing is scaled; what the fp16 run must reproduce."""

    compute_dtype = torch.float32

    def predict_noise(self, z0, eps, t, context_k, context_v, capture, pooled=None, chunks=1):
        self.calls += 1
        return (context_k.mean() + context_v.mean()) * torch.ones_like(eps) * 1e-6 + eps * 0.5, []


def test_fp16_backward_is_loss_scaled_unscaled_exactly_and_an_overflow_skips_the_step():
    from sefi_ide.core.loss_scale import INITIAL_SCALE
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import train_identity

    settings = TrainSettings(steps=4, resolution=64, attn_lambda=0.0, color_jitter=0.0, scale_min=1.0, scale_max=1.0)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    base = _ToyBackend().base_vectors()["clip_l"]

    scaled = train_identity(_HalfPrecisionToyBackend(), image, settings)
    assert [r["loss_scale"] for r in scaled.history] == [INITIAL_SCALE] * 4
    assert not torch.equal(scaled.identity.k["clip_l"], base.expand(5, -1))  # a gradient came through the fp16 op
    # ... and was unscaled before Adam: the tokens land where the float32 twin's do (an update from gradients still
    # multiplied by the scale goes far further: Adam's epsilon makes it scale-dependent); fp16 rounding only
    twin = train_identity(_Float32TwinToyBackend(), image, settings).identity
    for table in ("k", "v"):
        got, want = getattr(scaled.identity, table)["clip_l"], getattr(twin, table)["clip_l"]
        moved = (want - base).norm()
        assert moved > 0 and (got - want).norm() / moved < 0.05, (table, float((got - want).norm() / moved))

    unscaled_backend = _HalfPrecisionToyBackend()
    unscaled_backend.compute_dtype = torch.float32  # same fp16 op, no scaling: its gradient underflows to zero
    unscaled = train_identity(unscaled_backend, image, settings)
    assert torch.equal(unscaled.identity.k["clip_l"], base.expand(5, -1))

    # an overflow: that step is skipped (no error), the scale halves for the next steps, the run goes on
    skipped = train_identity(_HalfPrecisionToyBackend(inf_grad_at_call=2), image, settings)
    assert [r["skipped"] for r in skipped.history] == [False, True, False, False]
    assert [r["loss_scale"] for r in skipped.history] == [INITIAL_SCALE] * 2 + [INITIAL_SCALE / 2] * 2  # as used
    assert torch.isfinite(skipped.identity.k["clip_l"]).all()
    assert not torch.equal(skipped.identity.k["clip_l"], scaled.identity.k["clip_l"])
    with pytest.raises(Exception) as stopped:  # the same overflow without scaling is a divergence
        train_identity(_ToyBackend(nan_grad_at_call=2), image, settings)
    assert "gradients became NaN" in str(stopped.value)


class _RowOverflowToyBackend(_HalfPrecisionToyBackend):
    """Identities learned together share the toy's batch (rows 0..B-1: the first identity); at one call the gradient
    of the first identity's rows only overflows."""

    def predict_noise(self, z0, eps, t, context_k, context_v, capture, pooled=None, chunks=1):
        self.calls += 1
        rows = context_k.mean(-1).mean(-1)[:, None, None, None]  # each row sees its own identity's tokens
        h = (rows * torch.ones_like(eps)).half()
        pred = (h * torch.tensor(1e-6, dtype=torch.float16)).float() + eps * 0.5
        if self.inf_grad_at_call == self.calls and pred.requires_grad:
            first = torch.zeros(pred.shape[0], 1, 1, 1)
            first[: pred.shape[0] // 2] = float("inf")
            pred.register_hook(lambda g: g + first)
        return pred, []


def _jobs(n: int, steps: int = 4):
    from dataclasses import replace

    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import IdentityJob

    settings = TrainSettings(steps=steps, resolution=64, attn_lambda=0.0, color_jitter=0.0, scale_min=1.0,
                             scale_max=1.0)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return [IdentityJob(image, replace(settings, seed=i, placeholder=f"<p{i}>")) for i in range(n)]


def test_one_identitys_skipped_step_leaves_it_alone_in_the_update_all_identities_share():
    from sefi_ide.core.training import train_identities

    a, b = _jobs(2)
    together = train_identities(_RowOverflowToyBackend(inf_grad_at_call=2), [a, b])
    alone_a = train_identities(_HalfPrecisionToyBackend(inf_grad_at_call=2), [a])[0]  # the same overflow, alone
    alone_b = train_identities(_HalfPrecisionToyBackend(), [b])[0]
    assert [r["skipped"] for r in together[0].history] == [False, True, False, False]
    assert [r["skipped"] for r in together[1].history] == [False] * 4
    for got, expected in ((together[0], alone_a), (together[1], alone_b)):
        assert torch.isfinite(got.identity.k["clip_l"]).all()
        torch.testing.assert_close(got.identity.k["clip_l"], expected.identity.k["clip_l"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.identity.optimizer_state, expected.identity.optimizer_state)


def test_without_the_one_kernel_gradient_check_the_per_gradient_check_gives_the_same_run(monkeypatch, caplog):
    """A device whose torch build lacks `_amp_foreach_non_finite_check_and_unscale_` (MPS, the CPU on older torch)
    learns the same, the skipped step included, and the log says why the check takes more ops there."""
    from sefi_ide.core import loss_scale
    from sefi_ide.core.training import train_identities

    jobs = _jobs(2)
    with_kernel = train_identities(_RowOverflowToyBackend(inf_grad_at_call=2), jobs)

    def missing(*args):
        raise NotImplementedError("Could not run '_amp_foreach_non_finite_check_and_unscale_' with arguments from "
                                  "the 'MPS' backend.")

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    monkeypatch.setattr(loss_scale, "_NO_CHECK_KERNEL", set())
    with caplog.at_level("INFO"):
        without = train_identities(_RowOverflowToyBackend(inf_grad_at_call=2), jobs)
    assert "no one-kernel gradient check on cpu" in caplog.text
    for got, expected in zip(without, with_kernel):
        assert [r["skipped"] for r in got.history] == [r["skipped"] for r in expected.history]
        assert torch.equal(got.identity.k["clip_l"], expected.identity.k["clip_l"])
    assert [r["skipped"] for r in without[0].history] == [False, True, False, False]


@pytest.mark.parametrize("identities", [1, 3])
def test_every_identity_is_checked_in_one_kernel_and_all_take_one_adam_update_per_step(identities):
    from sefi_ide.core.training import train_identities

    jobs = _jobs(identities, steps=3)
    with OpCounter() as counter:
        train_identities(_ToyBackend(), jobs)
    ops = counter.ops
    assert ops["_amp_foreach_non_finite_check_and_unscale_"] == 3 * identities
    assert ops["eq"] == ops["ne"] == 0  # no check per gradient tensor (`isfinite` dispatches as eq + ne)
    adam_updates = ops["_fused_adam_"] or ops["_foreach_addcdiv_"]
    assert adam_updates == 3  # one per step, whatever the number of identities


def test_loss_scale_grows_after_a_run_of_good_steps_and_round_trips():
    from sefi_ide.core.loss_scale import GROWTH_INTERVAL, INITIAL_SCALE, LossScale

    scale = LossScale.for_dtype(torch.float16)
    assert LossScale.for_dtype(torch.bfloat16).dynamic is False and LossScale.for_dtype(torch.float32).value == 1.0
    for _ in range(GROWTH_INTERVAL):
        assert scale.update(True)
    assert scale.value == 2 * INITIAL_SCALE and scale.good_steps == 0
    assert not scale.update(False) and scale.value == INITIAL_SCALE
    restored = LossScale.for_dtype(torch.float16)
    restored.load(scale.state().float())
    assert (restored.value, restored.good_steps) == (scale.value, scale.good_steps)


def test_resuming_from_a_version_1_generator_is_refused_and_its_tokens_still_load(tmp_path):
    from safetensors import safe_open
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import train_identity

    old = make_identity()  # generator_state with the version-1 'positions'
    path = save_identity(old, tmp_path / "old.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del meta["generator_version"]  # files written before the field existed
    _write_raw(path, tensors, meta)
    loaded = load_identity(path)
    assert loaded.generator_version == 1 and torch.equal(loaded.k["clip_l"], old.k["clip_l"])
    settings = TrainSettings(steps=2, resolution=64, attn_lambda=0.0)
    with pytest.raises(SeFiError, match="generator version 1.*learn it again"):
        train_identity(_ToyBackend(), torch.rand(1, 3, 64, 64), settings, resume=loaded)


def test_trained_identity_records_token_norms_and_its_generator_version(tmp_path):
    from sefi_ide.core.generator import GENERATOR_VERSION
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import train_identity

    settings = TrainSettings(steps=3, resolution=64, attn_lambda=0.0)
    ident = train_identity(_ToyBackend(), torch.rand(1, 3, 64, 64), settings).identity
    back = load_identity(save_identity(ident, tmp_path / "a.safetensors"))
    norms = back.token_norms["clip_l"]
    assert back.generator_version == GENERATOR_VERSION
    assert norms["init_word"] == pytest.approx(0.01 * 768 ** 0.5, abs=1e-4)
    assert norms["k"] == pytest.approx(ident.k["clip_l"].norm(dim=-1).tolist(), abs=1e-4) and len(norms["v"]) == 5
    tokens_only = load_identity(save_identity(ident, tmp_path / "b.safetensors", include_generator=False))
    assert tokens_only.token_norms == back.token_norms and tokens_only.generator_version == 0


@pytest.mark.parametrize("key,value,match", [
    ("trained_steps", "abc", "'trained_steps' is 'abc', expected a whole number"),
    ("stages", "five", "'stages' is 'five'"),
    ("training", "[1, 2]", "'training' is '\\[1, 2\\]', expected a JSON object"),
    ("training", "{not json", "'training'.*expected a JSON object"),
    ("training", '{"layers": 5}', "'training.layers' is 5, expected a text"),
    ("token_norms", "3", "'token_norms'"),
    ("generator_version", "-1", "'generator_version'"),
])
def test_damaged_metadata_is_refused_naming_the_file_and_the_field(tmp_path, key, value, match):
    from safetensors import safe_open

    path = save_identity(make_identity(), tmp_path / "damaged.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    _write_raw(path, tensors, dict(meta, **{key: value}))
    with pytest.raises(SeFiError, match=match) as err:
        load_identity(path)
    assert "'damaged.safetensors'" in str(err.value)


def test_augmentation_moves_the_mask_with_the_image_and_the_seed_fixes_it():
    from sefi_ide.core.augment import augment, make_augmenter
    from sefi_ide.core.settings import TrainSettings

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(4, 1, 32, 32, generator=g) > 0.5).float()
    image = mask.expand(-1, 3, -1, -1).clone()  # the image is the mask: geometry must keep them equal
    geometric = make_augmenter(TrainSettings(color_jitter=0.0, flip_p=0.5, scale_min=0.8, scale_max=1.2))
    out_image, out_mask = augment(geometric, image, mask, seed=5)
    assert not torch.equal(out_mask, mask)  # something moved
    torch.testing.assert_close(out_image, out_mask.expand(-1, 3, -1, -1))
    again_image, again_mask = augment(geometric, image, mask, seed=5)
    assert torch.equal(again_image, out_image) and torch.equal(again_mask, out_mask)
    assert not torch.equal(augment(geometric, image, mask, seed=6)[1], out_mask)


@pytest.mark.parametrize("settings", [{}, {"color_jitter": 0.0}, {"flip_p": 0.0, "scale_min": 1.0, "scale_max": 1.0}],
                         ids=["all", "no-jitter", "jitter-only"])
def test_augmenting_identities_together_gives_each_its_own_augmentation_in_fewer_kornia_calls(settings):
    """Each identity's own seeded augmentation (as if alone), with masks on some identities only; the flip and the
    scaling run once for all, the colour jitter once per random order of its adjustments."""
    from sefi_ide.core.augment import augment, augment_together, make_augmenter
    from sefi_ide.core.settings import TrainSettings

    g = torch.Generator().manual_seed(0)
    n = 8
    images = [torch.rand(2, 3, 32, 32, generator=g)] * n  # one photo: only the seeds tell the identities apart
    masks = [(torch.rand(2, 1, 32, 32, generator=g) > 0.5).float() if i % 3 else None for i in range(n)]
    seeds = [1_000_003 * i + 7 for i in range(n)]
    augmenter = make_augmenter(TrainSettings(**settings))
    expected = [augment(augmenter, x, m, seed) for x, m, seed in zip(images, masks, seeds)]
    calls: Counter[str] = Counter()
    modules = [("colour", augmenter.photometric)] + [(type(m).__name__, m) for m in augmenter.geometric]
    handles = [m.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
               for name, m in modules if m is not None]
    try:
        got_images, got_masks = augment_together(augmenter, images, masks, seeds)
    finally:
        for h in handles:
            h.remove()
    for (image, mask), got_image, got_mask in zip(expected, got_images, got_masks):
        torch.testing.assert_close(got_image, image, rtol=1e-5, atol=1e-6)
        assert (got_mask is None) == (mask is None)
        if mask is not None:
            torch.testing.assert_close(got_mask, mask, rtol=1e-5, atol=1e-6)
    assert all(calls[type(m).__name__] == 1 for m in augmenter.geometric)
    if augmenter.photometric is not None:
        assert 1 <= calls["colour"] < n  # these seeds give some identities the same order of adjustments
    assert not all(torch.equal(x, got_images[0]) for x in got_images[1:])  # the seeds give different augmentations


def test_the_noise_stream_is_the_seeded_draw_step_by_step_across_chunks_and_a_resume():
    from sefi_ide.core.noise import CHUNK_STEPS, NoiseStream

    steps = CHUNK_STEPS + 3  # crosses a chunk boundary
    rng = torch.Generator().manual_seed(5)
    expected = [(torch.randint(0, 1000, (2,), generator=rng), torch.randn((2, 4, 8, 8), generator=rng))
                for _ in range(steps)]
    stream = NoiseStream(5, 2, 8, torch.device("cpu"))
    for t_expected, eps_expected in expected:
        t_cpu, t, eps = stream.take()
        assert torch.equal(t_cpu, t_expected) and torch.equal(t, t_expected) and torch.equal(eps, eps_expected)
    resumed = NoiseStream(5, 2, 8, torch.device("cpu"))
    resumed.skip(CHUNK_STEPS - 1)
    for t_expected, eps_expected in expected[CHUNK_STEPS - 1:]:
        _, t, eps = resumed.take()
        assert torch.equal(t, t_expected) and torch.equal(eps, eps_expected)
