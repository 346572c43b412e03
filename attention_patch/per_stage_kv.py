"""Per-stage, K/V-disentangled contexts at every cross-attention layer.

Generation uses ONE model-level attn2 patch on a clone of the MODEL. It picks the stage from the
step's sigma (sigma -> timestep via the model's own schedule -> stage) and finds the rows that
belong to the identity conditioning by value: the CONDITIONING we emit carries a "nominal" context
(the K-path context of the middle stage), and every 77-token block of the incoming context that
equals it is replaced by C^K_stage for K and C^V_stage for V.

Why not a per-conditioning hook (comfy.hooks.TransformerOptionsHook)? Conds with different hooks
never share a batch, so cond and uncond would run as two UNet passes per step: too slow for our
≤ 3 % sampling overhead. Matching by value keeps CFG batched, leaves the negative prompt and any
other conditioning untouched, and survives the host repeating or concatenating contexts.
"""
from __future__ import annotations

import logging

import torch

from ..core.stages import stage_of_timestep
from .regions import RegionAttention, RegionBias

log = logging.getLogger(__name__)


class PerStageKVPatch:
    """attn2 patch: (n, context, value, extra_options) -> (n, K context, V context)."""

    def __init__(self, nominal: torch.Tensor, contexts_k: torch.Tensor, contexts_v: torch.Tensor, model_sampling,
                 regions: RegionBias | None = None, region_attention: RegionAttention | None = None):
        # nominal: (L, D); contexts_*: (S, L, D)
        self.regions = regions
        self.region_attention = region_attention
        self.nominal = nominal
        self.contexts_k = contexts_k
        self.contexts_v = contexts_v
        self.num_stages = contexts_k.shape[0]
        self.model_sampling = model_sampling
        self._device_cache: dict = {}
        self._last: tuple | None = None
        self.unmasked_layers: set[str] = set()  # layers where a region mask was not applied (see _note_unapplied_mask)
        self._reported = 0
        self._layer: str | None = None

    def _on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(t.to(device=like.device, dtype=like.dtype)
                                            for t in (self.nominal, self.contexts_k, self.contexts_v))
        return self._device_cache[key]

    def stages_for(self, sigmas: torch.Tensor) -> torch.Tensor:
        timesteps = self.model_sampling.timestep(sigmas.to(self.model_sampling.sigmas.device))
        return stage_of_timestep(timesteps, self.num_stages)  # stays on the device: no sync per step

    def stage_per_row(self, sigmas: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
        """The stage of each of `rows` batch rows (the sigmas repeat per conditioning chunk)."""
        stage = self.stages_for(sigmas.flatten()).to(device)
        return stage[torch.arange(rows, device=device) % stage.numel()]

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        sigmas = extra_options.get("sigmas")
        if sigmas is None or context_attn2 is None:
            return n, context_attn2, value_attn2
        last = self._last
        # same forward pass, next layer: reuse. The host hands every layer of one pass the same tensor objects,
        # and holding them here keeps their ids from being reused by a later pass.
        if last is not None and last[0] is context_attn2 and last[1] is value_attn2 and last[2] is sigmas:
            out_k, out_v, match, biases = last[3:]
        else:
            out_k, out_v, match = self._swap(context_attn2, value_attn2, sigmas)
            biases = {}
            self._last = (context_attn2, value_attn2, sigmas, out_k, out_v, match, biases)
        if self.region_attention is not None:
            self._note_unapplied_mask(extra_options, new_pass=last is None or last[0] is not context_attn2)
            if match is not None:  # region_attention and regions are installed together, only when a mask is set
                shape = extra_options.get("activations_shape")
                hw = (int(shape[-2]), int(shape[-1]))
                if hw not in biases:
                    biases[hw] = self.regions.build(match, hw, context_attn2.shape[1])
                self.region_attention.pending = biases[hw]
        return n, out_k, out_v

    def _note_unapplied_mask(self, extra_options: dict, new_pass: bool) -> None:
        """A region mask handed to the previous layer and never taken: that layer's attention call did not go through
        the host's `optimized_attention_override` (another pack replaced it without passing transformer_options), so
        the identity was not confined there. Logged once per new set of such layers, naming them: at the start of
        the next pass, and at the end of sampling (`report_unapplied_masks`) for the last pass's."""
        self._take_unapplied()
        if new_pass:
            self._report()
        block = extra_options.get("block")
        self._layer = None if block is None else f"{block[0]}.{block[1]}.{extra_options.get('block_index', 0)}"

    def _take_unapplied(self) -> None:
        attention = self.region_attention
        if (attention.pending is not None or attention.missed) and self._layer is not None:
            self.unmasked_layers.add(self._layer)
        attention.pending, attention.missed = None, False

    def _report(self) -> None:
        if len(self.unmasked_layers) > self._reported:
            self._reported = len(self.unmasked_layers)
            log.warning("SeFi-IDE: the region mask of an identity was not applied at cross-attention layer(s) %s: "
                        "another pack replaces the attention there without passing ComfyUI's transformer_options. "
                        "The identity may appear outside its region.", ", ".join(sorted(self.unmasked_layers)))

    def report_unapplied_masks(self, executor, *args, **kwargs):
        """An OUTER_SAMPLE wrapper: after sampling, the last pass's unapplied masks are noted and logged too (a
        one-step sampling has no next pass to report them)."""
        try:
            return executor(*args, **kwargs)
        finally:
            if self.region_attention is not None:
                self._take_unapplied()
                self._layer = None
                self._report()

    def _swap(self, context: torch.Tensor, value: torch.Tensor, sigmas: torch.Tensor):
        """(K context, V context, match (rows, blocks) or None)."""
        nominal, ck, cv = self._on(context)
        rows, tokens, dim = context.shape
        length = nominal.shape[0]
        if dim != nominal.shape[1] or tokens % length or value.shape != context.shape:
            return context, value, None
        blocks = context.view(rows, tokens // length, length, dim)
        # no `if match.any()` shortcut: asking waits for the GPU at every step (such syncs cost +12 % sampling time)
        match = (blocks == nominal).flatten(2).all(-1)  # (rows, blocks)
        stage_per_row = self.stage_per_row(sigmas, rows, context.device)
        sel = match[..., None, None]
        k_blocks = torch.where(sel, ck[stage_per_row][:, None], blocks)
        v_blocks = torch.where(sel, cv[stage_per_row][:, None], value.view(rows, tokens // length, length, dim))
        return k_blocks.reshape(rows, tokens, dim), v_blocks.reshape(rows, tokens, dim), match


class PerStagePooled:
    """SDXL's pooled text embedding, per stage: an APPLY_MODEL wrapper that gives every `y` row carrying the nominal
    pooled output (the middle stage's, which the CONDITIONING holds) the pooled output of the row's own stage, as the
    training step does (each stage's K row goes through OpenCLIP-G). Rows are found by value, like the contexts:
    the negative prompt and other conditioning keep theirs."""

    def __init__(self, nominal: torch.Tensor, stage_pooled: torch.Tensor, stage_per_row):
        self.nominal = nominal  # (P,)
        self.stage_pooled = stage_pooled  # (S, P)
        self.stage_per_row = stage_per_row  # (sigmas, rows, device) -> stage per row (PerStageKVPatch's)

    def __call__(self, executor, x, t, *args, **kwargs):
        y = kwargs.get("y")
        if y is not None and y.ndim == 2 and y.shape[1] > self.nominal.shape[0]:
            width = self.nominal.shape[0]
            nominal, table = self.nominal.to(y), self.stage_pooled.to(y)
            match = (y[:, :width] == nominal).all(-1, keepdim=True)  # no .any(): it would wait for the GPU
            pooled = table[self.stage_per_row(t, y.shape[0], y.device)]
            kwargs["y"] = torch.cat([torch.where(match, pooled, y[:, :width]), y[:, width:]], dim=1)
        return executor(x, t, *args, **kwargs)


class FixedKVPatch:
    """Training: K from `context_k`, V from `context_v` at every cross-attention layer."""

    def __init__(self, context_k: torch.Tensor, context_v: torch.Tensor):
        self.context_k = context_k
        self.context_v = context_v

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        return n, self.context_k.to(context_attn2), self.context_v.to(context_attn2)
