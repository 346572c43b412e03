"""Several identities learned in one loop (one UNet batch per step): each equals the same identity learned alone,
a diverging one spoils nothing, and the batch node saves one file per photo."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_same_identity, photo

pytestmark = pytest.mark.usefixtures("comfy_host")


@pytest.fixture(params=["sd1", "sdxl"])
def models(request):
    return request.getfixturevalue(request.param)


def _other_photo() -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    img = torch.rand(1, 80, 96, 3, generator=g) * 0.4
    img[:, 10:60, 30:80] += 0.5
    return img.clamp(0, 1)


def _jobs(steps=3, **overrides):
    from dataclasses import replace

    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.training import IdentityJob
    from sefi_ide.host.images import prepare_reference

    settings = TrainSettings(resolution=64, steps=steps, placeholder="<alice>", **overrides)  # the default λ
    a, _ = prepare_reference(photo(), None, 64)
    b, _ = prepare_reference(_other_photo(), None, 64)
    return [IdentityJob(a, settings), IdentityJob(b, replace(settings, seed=7, placeholder="<bob>"))]


def _backend(models, settings):
    from sefi_ide.host.backend import ComfyTrainingBackend

    return ComfyTrainingBackend(*models, settings)


def test_identities_learned_together_equal_each_learned_alone(models):
    from sefi_ide.core.training import train_identities, train_identity
    from sefi_ide.host.grad_scope import training_scope

    jobs = _jobs()
    with torch.inference_mode(), training_scope():
        backend = _backend(models, jobs[0].settings)
        base = backend.base_vectors()
        together = train_identities(backend, jobs)
        alone = [train_identity(backend, j.image, j.settings) for j in jobs]
    for t, a in zip(together, alone, strict=True):
        assert t.error is None and t.identity.placeholder == a.identity.placeholder
        assert t.identity.trained_steps == a.identity.trained_steps == 3
        assert_same_identity(t.identity, a.identity, base)
        for rt, ra in zip(t.history, a.history, strict=True):
            assert (rt["t"], rt["stage"]) == (ra["t"], ra["stage"])
            assert rt["ldm"] == pytest.approx(ra["ldm"], rel=1e-4)
            assert rt["attn"] == pytest.approx(ra["attn"], rel=1e-3, abs=1e-9)  # step 1: both ~1e-12 (float noise)
    assert not torch.allclose(together[0].identity.k["clip_l"], together[1].identity.k["clip_l"])


def test_both_identities_share_each_unet_pass(sd1):
    """The point of learning together: one UNet call per step carries every identity's rows."""
    from sefi_ide.core.training import train_identities
    from sefi_ide.host.grad_scope import training_scope

    model = sd1[0]
    rows = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        with torch.inference_mode(), training_scope():
            jobs = _jobs(steps=2)
            train_identities(_backend(sd1, jobs[0].settings), jobs)
    finally:
        hook.remove()
    assert rows == [4, 4]  # per step: 2 identities x (reference + target row), one pass


def test_sdxl_identities_share_one_text_encoder_call_and_each_keeps_its_own_pooled_output(sdxl):
    """SDXL's pooled output (the UNet's `y`) is each identity's own: every UNet row gets the pooled output of its
    own K row, the K token of that row's stage (core/training.py `_train_step`, `pooled_of`). Read from the one call
    for all identities, a K row's pooled output equals what a call of its own returns."""
    from helpers import close
    from sefi_ide.core.training import train_identities
    from sefi_ide.host.grad_scope import training_scope

    jobs = _jobs(steps=2)
    clip_g = sdxl[1].cond_stage_model.clip_g
    calls = []
    hook = clip_g.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        with torch.inference_mode(), training_scope():
            backend = _backend(sdxl, jobs[0].settings)
            g = torch.Generator().manual_seed(3)
            rows = {enc: torch.randn(4, width, generator=g) * 0.02 for enc, width in backend.encoders.items()}
            calls.clear()
            joined, pooled = backend.target_contexts(rows, pooled_of=[0, 2])
            alone = [backend.target_contexts({enc: r[2 * i:2 * i + 2] for enc, r in rows.items()}) for i in (0, 1)]
            assert calls == [4, 2, 2]  # sections per call: all four rows at once, then two each
            for i, (ctx, own_pooled) in enumerate(alone):
                assert close(joined[2 * i:2 * i + 2], ctx) and close(pooled[i], own_pooled[0])
            assert not close(pooled[0], pooled[1])
            calls.clear()
            train_identities(backend, jobs)
    finally:
        hook.remove()
    assert calls == [1, 4, 4]  # the reference prompt once, then per step one call: 2 identities x (K + V)


def test_a_diverging_identity_stops_at_its_last_good_state_and_spoils_nothing(sd1):
    from sefi_ide.core.training import train_identities, train_identity
    from sefi_ide.host.grad_scope import training_scope

    jobs = _jobs()
    jobs[1].image = jobs[1].image.clone()
    jobs[1].image[..., :8, :8] = float("nan")  # its latents, then its loss, become NaN at the first step
    with torch.inference_mode(), training_scope():
        backend = _backend(sd1, jobs[0].settings)
        good, bad = train_identities(backend, jobs)
        alone = train_identity(backend, jobs[0].image, jobs[0].settings)
        base = backend.base_vectors()
    assert good.error is None and bad.error is not None and "diverged at step 1" in str(bad.error)
    assert bad.identity.trained_steps == 0 and torch.isfinite(bad.identity.k["clip_l"]).all()
    assert good.identity.trained_steps == 3 and len(good.history) == 3
    assert_same_identity(good.identity, alone.identity, base)


def test_a_pass_that_runs_out_of_memory_is_split_and_learned_again(sd1, monkeypatch, caplog):
    from sefi_ide.core import training
    from sefi_ide.host import batch
    from sefi_ide.host.grad_scope import training_scope

    real = training.train_identities
    sizes = []

    def limited_device(backend, jobs, on_step=None):  # a device where two identities do not fit in one pass
        sizes.append(len(jobs))
        if len(jobs) > 1:
            raise training.TrainingStopped(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), [])
        return real(backend, jobs, on_step)

    monkeypatch.setattr(batch, "train_identities", limited_device)
    jobs = _jobs(steps=2)
    progress = []
    with torch.inference_mode(), training_scope():
        results = batch.learn_identities(*sd1, jobs, per_pass=2, on_step=lambda d, t, r: progress.append((d, t)))
    assert sizes == [2, 1, 1] and [r.identity.placeholder for r in results] == ["<alice>", "<bob>"]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert "ran out of memory; learning them 1 and 1 at a time" in caplog.text


def test_batch_node_learns_one_identity_per_photo_and_saves_each(sd1, tmp_path, monkeypatch):
    import folder_paths
    from sefi_ide.core.errors import SeFiError
    from sefi_ide.core.identity import load_identity
    from sefi_ide.nodes.learn import LearnIDEmbeddingsBatch

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sefi_identities", ([str(tmp_path)], {".safetensors"}))
    model, clip, vae = sd1
    a = torch.nn.functional.interpolate(photo().permute(0, 3, 1, 2), size=(80, 80)).permute(0, 2, 3, 1)
    b = _other_photo()[:, :80, :80]
    images = torch.cat([a, b])
    node = LearnIDEmbeddingsBatch()
    with pytest.raises(SeFiError, match="Got 2 photos and 3 placeholders"), torch.inference_mode():
        node.learn(model, clip, vae, images, "<a>\n<b>\n<c>", 1, 0, "team", False, 0)
    with pytest.raises(SeFiError, match="same file name"), torch.inference_mode():
        node.learn(model, clip, vae, images, "<a>, a", 1, 0, "team", False, 0)
    assert not list(tmp_path.iterdir())  # refused before anything was learned or written
    with torch.inference_mode():
        (identities,) = node.learn(model, clip, vae, images, "<alice>\n<bob>", 1, 5, "team", False, 0, resolution=64)
    assert [i.placeholder for i in identities] == ["<alice>", "<bob>"]
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["team_alice.safetensors", "team_bob.safetensors"]
    loaded = load_identity(tmp_path / "team_bob.safetensors")
    assert torch.equal(loaded.k["clip_l"], identities[1].k["clip_l"]) and loaded.training["seed"] == 6
    with pytest.raises(SeFiError, match="already exist"), torch.inference_mode():
        node.learn(model, clip, vae, images, "<alice>\n<bob>", 1, 5, "team", False, 0)
