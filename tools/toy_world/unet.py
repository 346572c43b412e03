"""A slim SD1 UNet that trains on a CPU and exports into the shape ComfyUI loads as SD1.

ComfyUI's checkpoint loader detects SD1 from the UNet's shapes: model_channels 320, context 768 (see
tests/tiny_models.py). Its smallest accepted UNet (one level, one res-block, transformer depth 1, no middle block)
has 18.7 M parameters, 37 MB in fp16, and costs 0.28 s per 16 x 16-latent picture for a training step on one core.
This module trains the same network with only `width` of the 320 channels (and `time_width` of the 1280 time
channels, `ff_width` of the 1280 feed-forward channels) and exports it padded with zeros to the full shape: the
padded network computes exactly what the slim one does, because
- every GroupNorm group is either all active or all zero (width is a multiple of 20: 320-channel norms have groups of
  10, the 640-channel norms after the skip concatenation groups of 20), and an all-zero group stays zero when its
  bias is zero;
- the transformer's LayerNorms run over all 320 channels: the slim model pads to 320 for them (ShellLayerNorm) and
  the padded weights and biases are zero, so inactive channels stay zero;
- attention runs over SD1's 8 heads of 40 channels; the slim model gives each of `heads` heads width/heads active
  channels (world v2: all 8 heads, 10 channels each at width 80; v1: 2 whole heads, the other 6 dead) at the shell's
  scale 1/sqrt(40), and a head's unused q/k/v channels are zero, so its scores, and its output, are the same.
Key names are ComfyUI's (`input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`, ...), so export is a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SHELL_CHANNELS = 320  # SD1's model_channels, required by ComfyUI's SD1 detection
SHELL_TIME = 4 * SHELL_CHANNELS  # SD1's time-embedding width
SHELL_FF = 4 * SHELL_CHANNELS  # GEGLU inner width
HEAD_DIM = 40  # SD1: 8 heads of 40 channels
SHELL_HEADS = SHELL_CHANNELS // HEAD_DIM
CONTEXT_DIM = 768
LATENT_CHANNELS = 4

# The UNet config ComfyUI reads from the exported state dict (for tests and the checkpoint builder)
COMFY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1],
    "transformer_depth": [1], "transformer_depth_output": [1, 1], "channel_mult": [1],
    "transformer_depth_middle": -2, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "num_head_channels": -1, "use_temporal_resblock": False, "use_temporal_attention": False,
}


@dataclass(frozen=True)
class SlimConfig:
    width: int = 160  # active channels of 320 (multiple of 40: whole norm groups)
    time_width: int = 320  # active time-embedding channels of 1280
    ff_width: int = 640  # active GEGLU inner channels of 1280
    heads: int = SHELL_HEADS  # attention heads in use, width // heads channels each (v1: width // 40, whole heads)

    def __post_init__(self) -> None:
        if self.width % 40 or not 0 < self.width <= SHELL_CHANNELS:
            raise ValueError(f"width must be a multiple of 40 up to 320, got {self.width}")
        if not 0 < self.heads <= SHELL_HEADS or self.width % self.heads or self.width // self.heads > HEAD_DIM:
            raise ValueError(f"heads must divide width into at most {HEAD_DIM} channels per head, one of "
                             f"{SHELL_HEADS} shell heads each; got {self.heads} heads for width {self.width}")

    @property
    def head_width(self) -> int:
        return self.width // self.heads
        if not 0 < self.time_width <= SHELL_TIME or not 0 < self.ff_width <= SHELL_FF:
            raise ValueError(f"time_width and ff_width must be in 1..1280, got {self.time_width}, {self.ff_width}")


def timestep_embedding(t: torch.Tensor, dim: int = SHELL_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    """SD1's sinusoidal embedding (cos half first), as ComfyUI computes it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# Roles say where a slim dimension sits in the shell: (shell size, slice starts) per role, filled per config.
def _role_indices(role: str, cfg: SlimConfig) -> tuple[int, torch.Tensor]:
    a, t, f = cfg.width, cfg.time_width, cfg.ff_width
    spans = {
        "lat": (LATENT_CHANNELS, [(0, LATENT_CHANNELS)]),
        "sin": (SHELL_CHANNELS, [(0, SHELL_CHANNELS)]),
        "ctx": (CONTEXT_DIM, [(0, CONTEXT_DIM)]),
        "ch": (SHELL_CHANNELS, [(0, a)]),
        "heads": (SHELL_CHANNELS, [(h * HEAD_DIM, cfg.head_width) for h in range(cfg.heads)]),  # q/k/v channels
        "cat": (2 * SHELL_CHANNELS, [(0, a), (SHELL_CHANNELS, a)]),  # [h, skip] after the skip concatenation
        "time": (SHELL_TIME, [(0, t)]),
        "ff": (SHELL_FF, [(0, f)]),
        "geglu": (2 * SHELL_FF, [(0, f), (SHELL_FF, f)]),  # GEGLU's value half, then its gate half
    }[role]
    size, parts = spans
    return size, torch.cat([torch.arange(start, start + n) for start, n in parts])


def _tag(module: nn.Module, *roles: str) -> nn.Module:
    module.shell_roles = roles  # (output role, input role) of a weight; a bias takes the output role
    return module


class ShellGroupNorm(nn.GroupNorm):
    """GroupNorm with the shell's group size (so its groups are the shell's active groups)."""

    def __init__(self, channels: int, group_size: int, eps: float) -> None:
        super().__init__(channels // group_size, channels, eps=eps)


class ShellLayerNorm(nn.Module):
    """LayerNorm over the 320 shell channels, of which the inactive ones are zero."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = SHELL_CHANNELS - x.shape[-1]
        out = F.layer_norm(F.pad(x, (0, pad)), (SHELL_CHANNELS,), F.pad(self.weight, (0, pad)),
                           F.pad(self.bias, (0, pad)), eps=1e-5)
        return out[..., : x.shape[-1]]


class ResBlock(nn.Module):
    def __init__(self, cfg: SlimConfig, concat: bool) -> None:
        super().__init__()
        a = cfg.width
        cin, role_in = (2 * a, "cat") if concat else (a, "ch")
        self.in_layers = nn.Sequential(_tag(ShellGroupNorm(cin, 20 if concat else 10, 1e-5), role_in), nn.SiLU(),
                                       _tag(nn.Conv2d(cin, a, 3, padding=1), "ch", role_in))
        self.emb_layers = nn.Sequential(nn.SiLU(), _tag(nn.Linear(cfg.time_width, a), "ch", "time"))
        self.out_layers = nn.Sequential(_tag(ShellGroupNorm(a, 10, 1e-5), "ch"), nn.SiLU(), nn.Dropout(0.0),
                                        _tag(nn.Conv2d(a, a, 3, padding=1), "ch", "ch"))
        self.skip_connection = _tag(nn.Conv2d(cin, a, 1), "ch", role_in) if concat else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, cfg: SlimConfig, context_dim: int | None) -> None:
        super().__init__()
        width = cfg.width
        src, role = (context_dim, "ctx") if context_dim else (width, "ch")
        self.heads = cfg.heads
        self.to_q = _tag(nn.Linear(width, width, bias=False), "heads", "ch")
        self.to_k = _tag(nn.Linear(src, width, bias=False), "heads", role)
        self.to_v = _tag(nn.Linear(src, width, bias=False), "heads", role)
        self.to_out = nn.Sequential(_tag(nn.Linear(width, width), "ch", "heads"), nn.Dropout(0.0))
        self.kept_probs: list[torch.Tensor] | None = None  # training: a list collects cross-attention maps

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        src = x if context is None else context
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        # the shell's scale: a head's zero channels add nothing to its scores
        q, k, v = split(self.to_q(x)), split(self.to_k(src)), split(self.to_v(src))
        if self.kept_probs is not None and context is not None:  # the same sum, its maps kept (B x heads x N x 77)
            probs = (q @ k.transpose(-1, -2) * HEAD_DIM ** -0.5).softmax(-1)
            self.kept_probs.append(probs)
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM ** -0.5)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.proj = _tag(nn.Linear(width, 2 * inner), "geglu", "ch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, cfg: SlimConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(cfg.width, cfg.ff_width), nn.Dropout(0.0),
                                 _tag(nn.Linear(cfg.ff_width, cfg.width), "ch", "ff"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: SlimConfig) -> None:
        super().__init__()
        a = cfg.width
        self.attn1 = CrossAttention(cfg, None)
        self.ff = FeedForward(cfg)
        self.attn2 = CrossAttention(cfg, CONTEXT_DIM)
        self.norm1, self.norm2, self.norm3 = (_tag(ShellLayerNorm(a), "ch") for _ in range(3))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, cfg: SlimConfig) -> None:
        super().__init__()
        a = cfg.width
        self.norm = _tag(ShellGroupNorm(a, 10, 1e-6), "ch")
        self.proj_in = _tag(nn.Conv2d(a, a, 1), "ch", "ch")
        self.transformer_blocks = nn.ModuleList([TransformerBlock(cfg)])
        self.proj_out = _tag(nn.Conv2d(a, a, 1), "ch", "ch")

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context)
        return self.proj_out(y.transpose(1, 2).reshape(b, c, h, w)) + x


class _Step(nn.Module):
    """A (ResBlock, SpatialTransformer) pair, ComfyUI's TimestepEmbedSequential."""

    def __init__(self, cfg: SlimConfig, concat: bool) -> None:
        super().__init__()
        self.add_module("0", ResBlock(cfg, concat))
        self.add_module("1", SpatialTransformer(cfg))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x, emb), context)

    def __getitem__(self, i: int) -> nn.Module:
        return self._modules[str(i)]


class SlimUNet(nn.Module):
    """ComfyUI's one-level SD1 UNet (input conv, res+transformer, two res+transformer output steps) at slim width."""

    def __init__(self, cfg: SlimConfig = SlimConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        a, t = cfg.width, cfg.time_width
        self.time_embed = nn.Sequential(_tag(nn.Linear(SHELL_CHANNELS, t), "time", "sin"), nn.SiLU(),
                                        _tag(nn.Linear(t, t), "time", "time"))
        self.input_blocks = nn.ModuleList([nn.Sequential(_tag(nn.Conv2d(LATENT_CHANNELS, a, 3, padding=1), "ch", "lat")),
                                           _Step(cfg, concat=False)])
        self.output_blocks = nn.ModuleList([_Step(cfg, concat=True), _Step(cfg, concat=True)])
        self.out = nn.Sequential(_tag(ShellGroupNorm(a, 10, 1e-5), "ch"), nn.SiLU(),
                                 _tag(nn.Conv2d(a, LATENT_CHANNELS, 3, padding=1), "lat", "ch"))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """ε prediction for latents x (B x 4 x h x w, already scaled by SD1's 0.18215) at `timesteps`."""
        emb = self.time_embed(timestep_embedding(timesteps))
        h = self.input_blocks[0](x)
        skips = [h]
        h = self.input_blocks[1](h, emb, context)
        skips.append(h)
        for step in self.output_blocks:
            h = step(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def shell_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights at ComfyUI's full SD1 shapes (zeros outside the active channels), ComfyUI's key names."""
        out = {}
        for prefix, module in self.named_modules():
            roles = getattr(module, "shell_roles", None)
            if roles is None:
                continue
            for name, p in module.named_parameters(recurse=False):
                dims = [roles[0]] if (name == "bias" or p.ndim == 1) else list(roles)
                sizes, index = zip(*(_role_indices(r, self.cfg) for r in dims), strict=True)
                full = p.new_zeros(*sizes, *p.shape[len(dims):])
                grid = torch.meshgrid(*index, indexing="ij") if len(index) > 1 else index
                full[grid] = p.detach()
                out[f"{prefix}.{name}"] = full
        return out
