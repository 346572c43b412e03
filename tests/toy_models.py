"""The toy world (tools/toy_world/) as the pack meets it, for the quality benchmark (bench/quality.py) and its CI
test (tests/test_toy_quality.py): the toy SD1 checkpoint through ComfyUI's loader, the one photo of an identity, the
prompts, pictures by ComfyUI's KSampler through the Apply node's code, and the scores the reader gives them.

The committed 2.8 MB of trained weights are built into the 290 MB checkpoint in the cache on first use and loaded by
ComfyUI's own `load_checkpoint_guess_config`, exactly as Load Checkpoint does.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from harness import PACK_ROOT, cache_root

if str(PACK_ROOT) not in sys.path:
    sys.path.insert(0, str(PACK_ROOT))
from tools.toy_world.attributes import CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, identity_values
from tools.toy_world.reader import Reader, agreement, subject_present
from tools.toy_world.world import caption, sample_scene

TRAINED = PACK_ROOT / "tools" / "toy_world" / "toy_sd1.safetensors"  # world v2 (issue 31)
TRAINED_V1 = PACK_ROOT / "tools" / "toy_world" / "toy_sd1_v1.safetensors"  # world v1 (issue 24), its history
PROBE_PROMPT = "a photo of the face of person, oval face, tan skin, long ginger hair, green eyes, wearing a hat"


def toy_checkpoint(trained: Path = TRAINED) -> Path:
    """The built toy checkpoint, keyed by the trained file's content (rebuilt when the weights change)."""
    from tools.toy_world import checkpoint

    tag = hashlib.sha256(trained.read_bytes()).hexdigest()[:10]
    path = cache_root() / "toy-world" / f"toy-sd1-{tag}.safetensors"
    if not path.exists():
        checkpoint.build_checkpoint(trained, path)
    return path


def _drop_idle_text_layers(clip) -> int:
    """Keep only the first of CLIP-L's 12 layers. The toy text encoder trains at most that one (v1: none): every
    other layer's attention output projection and MLP output are zero, so each adds exactly 0 to the residual stream
    and the context is the same bits with 1 layer or 12 (checked here on a probe prompt; an error if not). Saves
    ~half of a CPU learning step, which re-encodes the prompt with gradients at every step."""
    encoder = clip.cond_stage_model.clip_l.transformer.text_model.encoder
    with torch.inference_mode():
        before = clip.encode_from_tokens(clip.tokenize(PROBE_PROMPT))
        layers = encoder.layers
        encoder.layers = layers[:1]
        after = clip.encode_from_tokens(clip.tokenize(PROBE_PROMPT))
    if not torch.equal(before, after):
        encoder.layers = layers
        raise RuntimeError("the toy text encoder's layers 2..12 are not idle: the checkpoint is not the toy one")
    return len(layers) - 1


def load_toy(drop_idle_text_layers: bool = True, trained: Path = TRAINED):
    """(MODEL, CLIP, VAE) of the toy checkpoint through ComfyUI's checkpoint loader, under inference mode as the host
    loads them; by default without CLIP's 11 idle layers (bit-identical contexts, see `_drop_idle_text_layers`)."""
    import comfy.sd

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(toy_checkpoint(trained)), output_vae=True,
                                                                    output_clip=True)
    if drop_idle_text_layers:
        _drop_idle_text_layers(clip)
    return model, clip, vae


# --- the photo, the prompts, the pictures, the scores ------------------------------------------------------------
PHOTO_SEED = 2024  # the photos' contexts and jitter
PROMPT_SEED = 7
SUBJECT = "a photo of the face of {}"
PLACEHOLDER = "<id>"


TUNING_SEED = 5  # the trained identities' fixed order, where settings are tuned and the CI test picks its identity


def tuning_identities() -> list[tuple[str, ...]]:
    """The trained identities in a fixed random order (bench/quality.py's `--pool trained`, tests/test_toy_quality.py)."""
    from tools.toy_world.world import trained_identities

    trained = trained_identities()
    return [trained[i] for i in np.random.default_rng(TUNING_SEED).permutation(len(trained))]


def photo_rng(identity: tuple[str, ...], *extra: int) -> np.random.Generator:
    """The random stream of `identity`'s photo (`extra` keys: further photos of the same identity)."""
    key = [list(IDENTITY_ATTRIBUTES[a]).index(v) for a, v in identity_values(identity).items()]
    return np.random.default_rng([PHOTO_SEED, *extra, *key])


def photo_scene(identity: tuple[str, ...]):
    """The one picture of `identity`: a random context and jitter, fixed by the identity and PHOTO_SEED."""
    return sample_scene(photo_rng(identity), identity=identity)


def prompt_contexts(photo_context: dict[str, str], count: int, key: int) -> list[dict[str, str]]:
    """`count` contexts that differ from the photo's in every context attribute (fixed by PROMPT_SEED and `key`), so
    a picture that copies the photo scores 0 on the prompt."""
    rng = np.random.default_rng([PROMPT_SEED, key])
    return [{a: str(rng.choice([v for v in vals if v != photo_context[a]])) for a, vals in CONTEXT_ATTRIBUTES.items()}
            for _ in range(count)]


def image_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float().div(255)[None]  # ComfyUI IMAGE (1, H, W, 3)


def word_identity(clip, word: str, num_stages: int = 5):
    """An identity whose every token is `word`'s embedding: the prompt then reads exactly '... of WORD'."""
    from sefi_ide.core.identity import Identity
    from sefi_ide.host.text import word_embedding

    e = word_embedding(clip, word)["clip_l"].float().reshape(1, -1)
    return Identity(family="sd1", placeholder=PLACEHOLDER, init_word="person", k={"clip_l": e.repeat(num_stages, 1)},
                    v={"clip_l": e.repeat(num_stages, 1)})


def init_word_identity(clip, num_stages: int = 5):
    """The init word alone ("person"): the floor a learned identity must beat."""
    return word_identity(clip, "person", num_stages)


def photo_and_prompts(identity: tuple[str, ...], prompts: int, key: int):
    """(scene, render, photo as a ComfyUI IMAGE, `prompts` contexts unlike the photo's) of `identity`."""
    from tools.toy_world.render import render

    scene = photo_scene(identity)
    picture = render(scene)
    contexts = prompt_contexts({a: scene.values[a] for a in CONTEXT_ATTRIBUTES}, prompts, key)
    return scene, picture, image_tensor(picture.image), contexts


def generate(model, clip, vae, text: str, identity, seed: int, count: int = 1, steps: int = 20,
             cfg: float = 4.0) -> torch.Tensor:
    """`count` pictures (count, 128, 128, 3) of `text` by ComfyUI's KSampler (ddim, ddim_uniform), with `identity`
    applied through Apply Per-Stage ID Tokens' code, or (identity None) the plain prompt through CLIP Text Encode."""
    from sefi_ide.host.conditioning import apply_identities

    import nodes as comfy_nodes

    with torch.inference_mode():
        if identity is None:
            patched, positive = model, comfy_nodes.CLIPTextEncode().encode(clip, text)[0]
        else:
            patched, positive = apply_identities(model, clip, text, [identity])
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = {"samples": torch.zeros(count, 4, 16, 16)}
        out = comfy_nodes.common_ksampler(patched, seed, steps, cfg, "ddim", "ddim_uniform", positive, negative,
                                          latent)[0]["samples"]
        return vae.decode(out)


def scores(reader: Reader, images: torch.Tensor, values: dict[str, str]) -> list[tuple[float, float, bool]]:
    """(identity score, prompt score, subject drawn) of each picture: the shares of identity and context attributes
    (those the picture can show) read back as in `values`. A picture the reader says shows no head scores 0 for
    identity (nothing of the subject is drawn) and its expression counts as not drawn."""
    return read_scores(reader.read(images), values)


def read_scores(reads: list[dict[str, str]], values: dict[str, str]) -> list[tuple[float, float, bool]]:
    """`scores` of pictures the reader has already read."""
    out = []
    for read in reads:
        if subject_present(read):
            out.append((agreement(read, values, list(IDENTITY_ATTRIBUTES)),
                        agreement(read, values, list(CONTEXT_ATTRIBUTES)), True))
        else:
            context = [a for a in CONTEXT_ATTRIBUTES if a != "expression"]
            out.append((0.0, agreement(read, values, context) * len(context) / len(CONTEXT_ATTRIBUTES), False))
    return out


def prompt_text(identity_values_: dict[str, str], context: dict[str, str], identity) -> str:
    """The prompt for `context`: the placeholder as subject, or (identity None) the identity spelled out in words."""
    subject = caption(identity_values_) if identity is None else SUBJECT.format(PLACEHOLDER)
    return caption(context, subject=subject)


@contextlib.contextmanager
def _photo_pass(model, clip, vae, photo: torch.Tensor, settings):
    """(backend, z0, ε) for forward passes over the photo (a ComfyUI IMAGE) as the heat-map node makes them: the
    user's own MODEL (no learning copy), the photo's latents, noise from seed 0."""
    from sefi_ide.host.backend import ComfyTrainingBackend
    from sefi_ide.host.grad_scope import training_scope
    from sefi_ide.host.heatmap import noised_reference

    with training_scope(), torch.no_grad():
        backend = ComfyTrainingBackend(model, clip, vae, settings, learning=False)
        yield (backend, *noised_reference(backend, photo.permute(0, 3, 1, 2)))


def attention_on_subject(model, clip, vae, photo: torch.Tensor, mask: np.ndarray, identity, settings) -> float:
    """Share of the placeholder's attention mass (loss layers, each stage's middle timestep, over the photo) inside
    the subject's mask; mean over stages."""
    from dataclasses import replace

    from sefi_ide.host.heatmap import placeholder_attention

    with _photo_pass(model, clip, vae, photo, replace(settings, num_stages=identity.num_stages)) as (backend, z0, eps):
        heats = placeholder_attention(backend, z0, eps, identity, photo.shape[2])  # (1, H, W, 3)
    inside = torch.from_numpy(mask.astype(np.float32))
    return float(((heats * inside).sum((1, 2)) / heats.sum((1, 2))).mean())


DEAD_HEAD = 1e-4  # a head whose maps stay within this of 1/77 everywhere is dead (zero q or k)


def prompt_maps(model, clip, vae, photo: torch.Tensor, text: str, stages: int = 5) -> list[list[torch.Tensor]]:
    """Per stage's middle timestep, per cross-attention layer: the attention maps (heads, HW, 77) of `text` over the
    photo (noised with a fixed seed), through the pack's own UNet pass and map capture."""
    from sefi_ide.core.settings import TrainSettings
    from sefi_ide.core.stages import stage_middle_timestep

    settings = TrainSettings(resolution=128, placeholder=PLACEHOLDER, layers="all", num_stages=stages)
    maps = []
    with _photo_pass(model, clip, vae, photo, settings) as (backend, z0, eps):
        context = clip.encode_from_tokens(clip.tokenize(text)).to(z0)
        for s in range(stages):
            t = torch.tensor([stage_middle_timestep(s, stages)])
            _, layer_maps = backend.predict_noise(z0, eps, t, context, context, capture=True)
            maps.append([m.float().cpu() for m in layer_maps])
    return maps


def head_liveness(maps: list[list[torch.Tensor]]) -> torch.Tensor:
    """(layers, heads): each head's largest distance from the uniform 1/77, over stages, pixels and tokens."""
    return torch.stack([torch.stack([(m - 1 / m.shape[-1]).abs().amax((1, 2)) for m in stage])
                        for stage in maps]).amax(0)


def word_attention(maps: list[list[torch.Tensor]], index: int, subject_mask: np.ndarray) -> tuple[float, float]:
    """(mass, share) of token `index`: its attention probability averaged over pixels (how much of the picture's
    attention it draws; uniform is 1/77) and the part of that mass inside the subject's mask; means over the ACTIVE
    heads only (dead heads' uniform maps would pull both toward what even attention gets), the layers and stages."""
    live = head_liveness(maps)
    inside = torch.from_numpy(subject_mask.astype(np.float32))[None, None]
    mass, share = [], []
    for stage in maps:
        for m, alive in zip(stage, live, strict=True):
            side = int(m.shape[1] ** 0.5)
            mask = torch.nn.functional.interpolate(inside, size=(side, side), mode="area").flatten()
            column = m[alive > DEAD_HEAD][:, :, index]
            mass += column.mean(1).tolist()
            share += ((column * mask).sum(1) / column.sum(1)).tolist()
    return float(np.mean(mass)), float(np.mean(share))


def attention_gap(model, clip, vae, photo: torch.Tensor, identity, settings) -> float:
    """How far the learned prompt's cross-attention maps are from the reference prompt's over the photo: per loss
    layer, (256 / HW) x the squared difference summed over all 77 token columns and the pixels, averaged over heads;
    then over layers and each stage's middle timestep. What the default L_attn (option 3) measures, computed here on
    its own (not through core.losses), so that a loss reading the wrong maps cannot also fool the measure."""
    from dataclasses import replace

    from sefi_ide.core.stages import stage_middle_timestep
    from sefi_ide.host.heatmap import identity_stage_maps

    gaps = []
    with _photo_pass(model, clip, vae, photo, replace(settings, num_stages=identity.num_stages)) as (backend, z0, eps):
        reference, ref_pooled = backend.reference_context()
        for s in range(identity.num_stages):
            t = torch.tensor([stage_middle_timestep(s, identity.num_stages)])
            learned = identity_stage_maps(backend, z0, eps, identity, s)
            _, wanted = backend.predict_noise(z0, eps, t, reference, reference, capture=True, pooled=ref_pooled)
            for a, b in zip(learned, wanted, strict=True):
                gaps.append(float((a.float() - b.float()).pow(2).sum((1, 2)).mean() * 256 / a.shape[1]))
    return float(np.mean(gaps))
