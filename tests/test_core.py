"""Pure-torch core: no ComfyUI needed."""
from __future__ import annotations

import json

import pytest
import torch
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


def test_attention_loss_options_select_the_right_maps():
    tgt = torch.zeros(2, 4, 77)
    ref = torch.zeros(2, 4, 77)
    tgt[..., 7] = 1.0  # differs only in the placeholder column
    tgt[..., 20] = 1.0  # and in a padding column after EOS (index 9)
    one = attention_loss([tgt], [ref], TokenOption.PLACEHOLDER, placeholder=7, eos=9)
    two = attention_loss([tgt], [ref], TokenOption.PROMPT, placeholder=7, eos=9)
    three = attention_loss([tgt], [ref], TokenOption.ALL, placeholder=7, eos=9)
    assert one.item() == pytest.approx(4.0) and two.item() == pytest.approx(4.0) and three.item() == pytest.approx(8.0)


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

    def predict_noise(self, z0, eps, t, context_k, context_v, capture, pooled=None):
        self.calls += 1
        pred = eps * 0 + (context_k.mean() + context_v.mean()) * 10
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            pred = pred * float("nan")
        if self.nan_grad_at_call is not None and self.calls >= self.nan_grad_at_call and pred.requires_grad:
            pred.register_hook(lambda g: g * float("nan"))  # a finite loss whose gradients are not
        maps = [torch.softmax(context_k.mean(-1, keepdim=True).expand(-1, 77, 77) * 0, -1)] if capture else []
        return pred, maps


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
