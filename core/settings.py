"""Training settings that travel together (the paper's defaults)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .errors import SeFiError
from .losses import TokenOption

# Default step count: the paper optimises ~5 min on a TITAN RTX; textual-inversion style single-image
# runs plateau in a few hundred steps at lr 0.005. 400 steps is our default (docs/how-it-works.md).
DEFAULT_STEPS = 400
NATIVE_RESOLUTION = {"sd1": 512, "sdxl": 1024}


@dataclass
class TrainSettings:
    steps: int = DEFAULT_STEPS
    seed: int = 0
    lr: float = 0.005
    attn_lambda: float = 0.003  # λ
    token_option: TokenOption = TokenOption.ALL
    num_stages: int = 5
    kv_split: bool = True  # False: V uses the K token (ablation)
    placeholder: str = "<id>"
    init_word: str = "person"
    reference_prompt: str = "a photo of the face of {word}"
    # "auto" = cross-attention layers at 1/4 of the latent size (16x16 at 512 px SD1)
    layers: str = "auto"
    resolution: int = 0  # 0 = the family's native size: 512 (SD1), 1024 (SDXL)
    color_jitter: float = 0.2
    flip_p: float = 0.5
    scale_min: float = 0.8
    scale_max: float = 1.2
    batch_size: int = 1
    # reference pass in the same UNet batch as the target pass: fewer launches, more activation memory.
    # None = by family: on for SD1, off for SDXL (keeps 1024 px training inside 20 GB)
    reference_in_batch: bool | None = None
    # recompute each UNet block in backward instead of keeping its activations: less memory, more compute
    gradient_checkpointing: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse settings that cannot train, naming the setting and its valid range."""
        checks = [
            (1 <= self.steps <= 100_000, f"steps must be 1..100000 (got {self.steps})"),
            (math.isfinite(self.lr) and 0 < self.lr <= 1, f"lr must be in (0, 1] (got {self.lr})"),
            (math.isfinite(self.attn_lambda) and self.attn_lambda >= 0,
             f"λ must be finite and >= 0 (got {self.attn_lambda})"),
            (1 <= self.num_stages <= 10, f"stages must be 1..10 (got {self.num_stages})"),
            (1 <= self.batch_size <= 64, f"batch_size must be 1..64 (got {self.batch_size})"),
            (0 < self.scale_min <= self.scale_max,
             f"need 0 < scale_min <= scale_max (got {self.scale_min}, {self.scale_max})"),
            (0 <= self.flip_p <= 1 and 0 <= self.color_jitter <= 1, "flip_p and color_jitter must be in [0, 1]"),
            (self.resolution >= 64 and self.resolution % 8 == 0,
             f"resolution must be >= 64 and a multiple of 8 (got {self.resolution})"),
        ]
        for ok, message in checks:
            if not ok:
                raise SeFiError(f"Invalid training setting: {message}.")

    def with_family_resolution(self, family: str) -> TrainSettings:
        """Settings with `resolution` resolved (0 -> the family's native training size)."""
        if self.resolution:
            return self
        return replace(self, resolution=NATIVE_RESOLUTION[family])

    def to_metadata(self) -> dict:
        d = asdict(self)
        d["token_option"] = int(self.token_option)
        d.pop("extra")
        return d
