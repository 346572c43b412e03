"""The toy text encoder: what the toy checkpoint's CLIP-L computes, trained on CPU inside CLIP-L's shape.

World v2 (the default): word rows at CLIP-L's scale (every row has norm ROW_NORM, about what CLIP-L's vocabulary
has), learned position embeddings, and one trained contextual layer (CLIP-L's first: pre-LayerNorm causal
self-attention with `heads` of its 12 heads of 64 channels, quick-GELU MLP with `mlp` of its 3072 channels); the
other 11 layers are exact identities (zero output projections). So word order and the other tokens matter, a learned
placeholder's row reaches the UNet through the same kind of layer it does in SD, and a token's step size means what
it means there. World v1 (TextConfig.bag_of_words()): free rows about 28 in norm, no positions, no layer.

The slim layer exports to CLIP-L's full shapes with zeros outside its active heads and MLP channels
(checkpoint.text_state_dict); a test checks ComfyUI's own CLIP computes the same context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import CONTEXT_LENGTH, load_token_ids, text_token_ids, tokenize

CLIP_WIDTH, CLIP_HEADS, CLIP_HEAD_DIM, CLIP_MLP, CLIP_VOCAB = 768, 12, 64, 3072, 49408
# CLIP-L's vocabulary rows are about 0.4 in norm (Kim et al. 2025, "Directional Textual Inversion", arXiv 2512.13672,
# who report textual inversion's learned rows inflating past 20); the toy's rows are held exactly there.
ROW_NORM = 0.4
POSITION_INIT_STD = 0.01  # a fresh encoder's position embeddings (train.py --position-init rescales them)


@dataclass(frozen=True)
class TextConfig:
    layers: int = 1  # trained contextual layers (CLIP-L's first ones); 0: bag of words (v1)
    heads: int = 2  # active heads of CLIP-L's 12 (64 channels each) in a trained layer
    mlp: int = 256  # active MLP channels of CLIP-L's 3072 in a trained layer
    positions: bool = True  # learned position embeddings (v1: none)
    row_norm: float = ROW_NORM  # every word row's norm; 0: free rows (v1)

    @classmethod
    def bag_of_words(cls) -> TextConfig:
        """World v1's encoder: final_layer_norm(row of each token)."""
        return cls(layers=0, heads=0, mlp=0, positions=False, row_norm=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # CLIP-L's activation, as ComfyUI's clip_model computes it


class TextLayer(nn.Module):
    """CLIP-L's encoder layer with `heads` heads and `mlp` MLP channels active; causal, as in CLIP."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        inner = cfg.heads * CLIP_HEAD_DIM
        self.heads = cfg.heads
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(CLIP_WIDTH), nn.LayerNorm(CLIP_WIDTH)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(CLIP_WIDTH, inner) for _ in range(3))
        self.out_proj = nn.Linear(inner, CLIP_WIDTH)
        self.fc1, self.fc2 = nn.Linear(CLIP_WIDTH, cfg.mlp), nn.Linear(cfg.mlp, CLIP_WIDTH)
        for layer in (self.out_proj, self.fc2):  # start as an identity layer (the v1 encoder), grow from there
            nn.init.normal_(layer.weight, std=0.002)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.layer_norm1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, CLIP_HEAD_DIM).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)),
                                           is_causal=True)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, n, -1))
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class TextEncoder(nn.Module):
    """The context (B x 77 x 768) the toy checkpoint's CLIP gives a caption of world words."""

    def __init__(self, cfg: TextConfig = TextConfig(), seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.ids = text_token_ids()
        gen = torch.Generator().manual_seed(seed)
        self.raw_rows = nn.Parameter(torch.randn(len(self.ids), CLIP_WIDTH, generator=gen))
        self.position = (nn.Parameter(POSITION_INIT_STD * torch.randn(CONTEXT_LENGTH, CLIP_WIDTH, generator=gen))
                         if cfg.positions else None)
        self.layers = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(CLIP_WIDTH)
        self.index = torch.full((CLIP_VOCAB,), -1, dtype=torch.long)
        self.index[torch.tensor(self.ids)] = torch.arange(len(self.ids))
        self.token_ids = load_token_ids()

    @property
    def rows(self) -> torch.Tensor:
        """The word rows (token ids `self.ids`), at norm cfg.row_norm (free when 0)."""
        if not self.cfg.row_norm:
            return self.raw_rows
        return self.cfg.row_norm * F.normalize(self.raw_rows, dim=-1)

    @property
    def positions(self) -> torch.Tensor | None:
        """The position embeddings, each no longer than a word row (so they shift words, never drown them)."""
        if self.position is None:
            return None
        return self.position / (self.position.norm(dim=-1, keepdim=True) / ROW_NORM).clamp_min(1.0)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.rows[self.index[tokens]]
        if self.position is not None:
            x = x + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode_tokens(torch.tensor([tokenize(t, self.token_ids) for t in texts]))

    def export(self) -> dict[str, torch.Tensor]:
        """The trained tensors, slim, as the committed file stores them (rows already at their norm)."""
        out = {"rows": self.rows.detach(), "final_layer_norm.weight": self.norm.weight.detach(),
               "final_layer_norm.bias": self.norm.bias.detach()}
        if self.position is not None:
            out["position"] = self.positions.detach()
        for i, layer in enumerate(self.layers):
            out.update({f"layers.{i}.{k}": v.detach() for k, v in layer.state_dict().items()})
        return out

    @classmethod
    def from_export(cls, cfg: TextConfig, tensors: dict[str, torch.Tensor]) -> TextEncoder:
        text = cls(cfg)
        state = {"raw_rows": tensors["rows"], "norm.weight": tensors["final_layer_norm.weight"],
                 "norm.bias": tensors["final_layer_norm.bias"],
                 **{k: v for k, v in tensors.items() if k.startswith("layers.")}}
        if cfg.positions:
            state["position"] = tensors["position"]
        text.load_state_dict({k: v.float() for k, v in state.items()})
        return text


def full_state_dict(cfg: TextConfig, tensors: dict[str, torch.Tensor], prefix: str, num_layers: int
                    ) -> dict[str, torch.Tensor]:
    """Every weight of CLIP-L (keys after `prefix`) from the slim trained tensors: the trained layers padded with
    zeros outside their active heads and MLP channels, the other layers identities (zero out_proj and fc2), every
    other word's row and (v1) every position zero."""
    ids = text_token_ids()
    embedding = torch.zeros(CLIP_VOCAB, CLIP_WIDTH)
    embedding[torch.tensor(ids)] = tensors["rows"].float()
    position = tensors["position"].float() if cfg.positions else torch.zeros(CONTEXT_LENGTH, CLIP_WIDTH)
    out = {f"{prefix}embeddings.token_embedding.weight": embedding,
           f"{prefix}embeddings.position_embedding.weight": position,
           f"{prefix}final_layer_norm.weight": tensors["final_layer_norm.weight"].float(),
           f"{prefix}final_layer_norm.bias": tensors["final_layer_norm.bias"].float()}
    shapes = {"self_attn.q_proj": (CLIP_WIDTH, CLIP_WIDTH), "self_attn.k_proj": (CLIP_WIDTH, CLIP_WIDTH),
              "self_attn.v_proj": (CLIP_WIDTH, CLIP_WIDTH), "self_attn.out_proj": (CLIP_WIDTH, CLIP_WIDTH),
              "mlp.fc1": (CLIP_MLP, CLIP_WIDTH), "mlp.fc2": (CLIP_WIDTH, CLIP_MLP)}
    slim_names = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
                  "self_attn.out_proj": "out_proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
    for layer in range(num_layers):
        key = f"{prefix}encoder.layers.{layer}."
        trained = layer < cfg.layers
        for norm in ("layer_norm1", "layer_norm2"):
            for part, fill in (("weight", 1.0), ("bias", 0.0)):
                slim = tensors.get(f"layers.{layer}.{norm}.{part}")
                out[f"{key}{norm}.{part}"] = slim.float() if trained else torch.full((CLIP_WIDTH,), fill)
        for name, shape in shapes.items():
            weight, bias = torch.zeros(shape), torch.zeros(shape[0])
            if trained:  # active heads and MLP channels come first: a slim weight is the top-left block
                w, b = (tensors[f"layers.{layer}.{slim_names[name]}.{p}"].float() for p in ("weight", "bias"))
                weight[: w.shape[0], : w.shape[1]] = w
                bias[: b.shape[0]] = b
            out[f"{key}{name}.weight"], out[f"{key}{name}.bias"] = weight, bias
    return out
