"""Resolution map of DetailFlow (spec §1.5): prefix length t -> content size r(t) -> canvas c(t).

Usage:
    from detailflow.models.configs import get_model_config
    from detailflow.models.resolution import ResolutionMap
    rmap = ResolutionMap.from_config(get_model_config("tiny").tokenizer)
    rmap.content_size(8), rmap.canvas_size(8), rmap.admissible, rmap.tokens_for_resolution(32)

The continuous map is R(t) = R - b (N - t)^alpha with b = (R - 1) / (N - 1)^alpha, so R(1) = 1 and
R(N) = R. The code that produced the released checkpoints floors R(t) for the content and rounds the
canvas UP to a multiple of the patch size (never below one patch); this module follows the code, not
the paper's "nearest multiple" wording (spec §5.1 item 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResolutionMap:
    image_size: int  # R: full resolution in pixels
    num_tokens: int  # N: latent tokens
    group_size: int  # g: tokens per group
    causal_num: int  # token-causal prefix length (first group)
    alpha: float  # degradation power
    patch_size: int  # f: decoder patch size; canvases are multiples of it
    admissible: list[int] = field(init=False)  # {1..causal_num} U {g*k, ..., N}

    def __post_init__(self) -> None:
        if self.num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {self.num_tokens}")
        if self.num_tokens % self.group_size or self.causal_num % self.group_size:
            raise ValueError(
                f"num_tokens={self.num_tokens} and causal_num={self.causal_num} must be multiples of "
                f"group_size={self.group_size}"
            )
        if not 0 < self.causal_num <= self.num_tokens:
            raise ValueError(f"causal_num={self.causal_num} must be in [1, num_tokens={self.num_tokens}]")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        first = list(range(1, self.causal_num + 1))
        later = list(range(self.causal_num + self.group_size, self.num_tokens + 1, self.group_size))
        object.__setattr__(self, "admissible", first + later)

    @classmethod
    def from_config(cls, tok_cfg) -> ResolutionMap:
        """Build from a TokenizerConfig (anything with the same field names)."""
        return cls(
            image_size=tok_cfg.image_size,
            num_tokens=tok_cfg.num_tokens,
            group_size=tok_cfg.group_size,
            causal_num=tok_cfg.causal_num,
            alpha=float(tok_cfg.alpha),
            patch_size=tok_cfg.patch_size,
        )

    def _check_t(self, t: int) -> int:
        t = int(t)
        if not 1 <= t <= self.num_tokens:
            raise ValueError(f"prefix length t={t} outside [1, {self.num_tokens}]")
        return t

    def resolution(self, t: int) -> float:
        """Continuous R(t) (paper Eq. 3)."""
        t = self._check_t(t)
        n, big_r = self.num_tokens, self.image_size
        b = (big_r - 1) / (n - 1) ** self.alpha
        return big_r - b * (n - t) ** self.alpha

    def content_size(self, t: int) -> int:
        """r(t) = floor(R(t)) clipped to [1, R]: the pixel size the target content is reduced to."""
        return min(self.image_size, max(1, math.floor(self.resolution(t))))

    def canvas_size(self, t: int) -> int:
        """c(t) = max(f, f * ceil(r(t) / f)): the decoder output size for prefix t."""
        f = self.patch_size
        return max(f, f * math.ceil(self.content_size(t) / f))

    def is_admissible(self, t: int) -> bool:
        return int(t) in self.admissible

    def check_admissible(self, t: int) -> int:
        """Return t as int, or raise ValueError naming the admissible prefix lengths."""
        if not self.is_admissible(t):
            raise ValueError(f"prefix length t={t} is not admissible; allowed: {self.admissible}")
        return int(t)

    def tokens_for_resolution(self, px: int) -> int:
        """The admissible t whose content size r(t) is closest to px (ties -> the larger t)."""
        if px < 1:
            raise ValueError(f"resolution must be >= 1 pixel, got {px}")
        return min(self.admissible, key=lambda t: (abs(self.content_size(t) - px), -t))

    def table(self) -> list[tuple[int, int, int]]:
        """(t, r(t), c(t)) for every admissible t; handy for logs and docs."""
        return [(t, self.content_size(t), self.canvas_size(t)) for t in self.admissible]
