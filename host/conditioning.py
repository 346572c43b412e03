"""Generation: per-stage K/V contexts for a prompt with placeholders -> patched MODEL + CONDITIONING."""
from __future__ import annotations

import torch

from ..attention_patch.per_stage_kv import PerStageKVPatch, PerStagePooled
from ..attention_patch.regions import RegionAttention, RegionBias
from ..core.errors import SeFiError
from ..core.identity import Identity
from .text import check_placeholder, detect_family, encode_variants, inject, mark_prompt, word_embedding


def _scaled_tokens(clip, ident: Identity) -> dict[str, dict[str, torch.Tensor]]:
    """The identity's k/v tables (S, d) per encoder, moved toward its init word by strength:
    e + strength·(token − e); strength 0 gives the plain init word (the prompt without the identity)."""
    tables = {"k": ident.k, "v": ident.v}
    if ident.strength == 1.0:
        return tables
    if not ident.init_word:
        raise SeFiError(f"Identity '{ident.placeholder}' records no init word, so its strength cannot be changed.")
    base = word_embedding(clip, ident.init_word)
    return {name: {enc: base[enc] + ident.strength * (tok - base[enc]) for enc, tok in table.items()}
            for name, table in tables.items()}


def build_stage_contexts(clip, text: str, identities: list[Identity]):
    """Returns (contexts_k (S,T,D), contexts_v (S,T,D), nominal (T,D), pooled, marked prompt, stage_pooled).

    The nominal context (what the CONDITIONING carries, and what a model without our patch would see) and the
    pooled output both come from the K path of the middle stage. `stage_pooled` (S, D): each stage's K-path pooled
    output, as training gives the UNet at that stage (SDXL; None for SD1, whose UNet takes no pooled output). All
    distinct variants are encoded in one batch.
    """
    if not identities:
        raise SeFiError("Connect at least one identity.")
    stages = {i.num_stages for i in identities}
    if len(stages) != 1:
        raise SeFiError(f"Identities in one prompt must have the same number of stages, got {sorted(stages)}.")
    S = stages.pop()
    placeholders = [check_placeholder(i.placeholder) for i in identities]
    if len(set(placeholders)) != len(placeholders):
        raise SeFiError(f"Two identities share the placeholder {placeholders}; learn one under another name.")
    marked = mark_prompt(clip, text, placeholders)
    mid = S // 2
    # variant j < S: K path of stage j; j >= S: V path of stage j - S. Encode the middle K first so
    # that the pooled output the encoder returns (first variant only) is the nominal one.
    order = [mid] + [j for j in range(2 * S) if j != mid]
    scaled = [_scaled_tokens(clip, ident) for ident in identities]
    rows_of = {j: {p: {enc: tok[j % S] for enc, tok in tables["k" if j < S else "v"].items()}
                   for p, tables in zip(placeholders, scaled)} for j in order}
    variants = [inject(marked, rows_of[j]) for j in order]
    # Distinct variants only, in ONE text-encoder call (nominal first: the pooled output is the first row's).
    # At strength 0 every variant is the plain prompt: one variant, encoded alone, exactly as CLIPTextEncode
    # encodes it (a batched call may round differently).
    keys = [[t for p in placeholders for t in rows_of[j][p].values()] for j in order]
    distinct: list[int] = []  # index into `variants` of each distinct variant
    source = []  # per variant: its position in `distinct`
    for i, key in enumerate(keys):
        same = next((n for n, d in enumerate(distinct) if all(map(torch.equal, keys[d], key))), None)
        if same is None:
            distinct.append(i)
            same = len(distinct) - 1
        source.append(same)
    every_pooled = hasattr(clip.cond_stage_model, "clip_g")  # SDXL: its UNet takes the pooled output
    with torch.no_grad():
        encoded, pooled_rows = encode_variants(clip, [variants[i] for i in distinct], every_pooled=every_pooled)
        encoded = encoded[torch.tensor(source)]
        pooled = pooled_rows[:1]  # the first variant's: the nominal (middle stage K) pooled output
    contexts = torch.empty_like(encoded)
    contexts[torch.tensor(order)] = encoded
    stage_pooled = None
    if every_pooled:  # the K variants are order's first S (the nominal first: exactly the CONDITIONING's)
        stage_pooled = torch.empty_like(pooled_rows[:1]).expand(S, -1).clone()
        stage_pooled[torch.tensor(order[:S])] = pooled_rows[torch.tensor(source[:S])]
    return contexts[:S], contexts[S:], contexts[mid], pooled, marked, stage_pooled


def check_region_support() -> None:
    """Region masks reach the host's attention kernel through `optimized_attention_override` (ComfyUI 0.3.60+);
    an older host would ignore it and the identity would appear everywhere."""
    import comfy.ldm.modules.attention

    if not hasattr(comfy.ldm.modules.attention, "wrap_attn"):
        raise SeFiError("Region masks need ComfyUI 0.3.60 or newer (this ComfyUI has no attention override). Update "
                        "ComfyUI, or disconnect the mask from 'ID Embedding Options'.")


def apply_identities(model, clip, text: str, identities: list[Identity]):
    """A clone of `model` with the per-stage K/V patch, and the CONDITIONING to sample with."""
    family = detect_family(clip, model)
    for ident in identities:
        ident.check_family(family)
    contexts_k, contexts_v, nominal, pooled, marked, stage_pooled = build_stage_contexts(clip, text, identities)
    patched = model.clone()
    regions = region_attention = None
    if any(ident.region is not None for ident in identities):
        check_region_support()
        # token columns per identity within one prompt block (chunk·77 + index; same for CLIP-L and -G)
        columns = [[c * 77 + i for c, i in marked.positions[ident.placeholder]["l"]] for ident in identities]
        regions = RegionBias(columns, [ident.region for ident in identities], marked.num_tokens())
        options = patched.model_options.setdefault("transformer_options", {})
        region_attention = RegionAttention(previous=options.get("optimized_attention_override"))
        options["optimized_attention_override"] = region_attention
    kv_patch = PerStageKVPatch(nominal, contexts_k, contexts_v, model.get_model_object("model_sampling"), regions,
                               region_attention)
    patched.set_model_attn2_patch(kv_patch)
    from comfy.patcher_extension import WrappersMP

    if stage_pooled is not None:  # SDXL: each stage's pooled output in `y`, as in training
        patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "sefi_ide.stage_pooled",
                                     PerStagePooled(pooled[0], stage_pooled, kv_patch.stage_per_row))
    if region_attention is not None:
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "sefi_ide.region_masks", kv_patch.report_unapplied_masks)
    conditioning = [[nominal.unsqueeze(0).clone(), {"pooled_output": pooled}]]
    return patched, conditioning
