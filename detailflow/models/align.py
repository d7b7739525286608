"""First-token ("global token") alignment (spec §1.9): -cos(MLP(q_0), teacher(image)).

Teachers (cfg.align_teacher):
  "thumbnail": the §6.2 stand-in, flattened 4x4 area-downsampled image (48-d), l2-normalised.
               A documented substitution for the SigLIP2 teacher, not the paper's loss.
  "siglip2":   any frozen feature net loaded from cfg.align_teacher_path (featurenets.load_feature_net);
               the last feature map is mean-pooled over tokens and l2-normalised.
  "none":      no alignment loss (also when cfg.align_weight == 0).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow.models.featurenets import FrozenNet, FrozenPlacement, load_feature_net


class ThumbnailTeacher:
    dim = 48

    def __call__(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        thumb = F.interpolate(img_BCHW.float(), size=(4, 4), mode="area")
        return F.normalize(thumb.flatten(1), dim=-1)


class NetworkTeacher:
    """Mean-pooled, l2-normalised last features of a frozen network."""

    def __init__(self, net: nn.Module, image_size: int, where: FrozenPlacement | None = None):
        self.net = FrozenNet(net, where)
        with torch.no_grad():
            self.dim = int(self._pool(self.net(torch.zeros(1, 3, image_size, image_size))).shape[-1])

    @staticmethod
    def _pool(feats: list[torch.Tensor]) -> torch.Tensor:
        last = feats[-1]
        return last.float().flatten(2).mean(-1) if last.ndim > 2 else last.float()

    def __call__(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self._pool(self.net(img_BCHW)), dim=-1)


def build_teacher(cfg, where: FrozenPlacement | None = None) -> ThumbnailTeacher | NetworkTeacher | None:
    """The teacher named by cfg.align_teacher, or None when alignment is off; a network teacher is
    loaded onto where.device and probed at the micro-batch where.batch."""
    kind = cfg.align_teacher
    if cfg.align_weight == 0 or kind == "none":
        return None
    if kind == "thumbnail":
        return ThumbnailTeacher()
    if kind == "siglip2":
        if not cfg.align_teacher_path:
            raise ValueError(
                "align_teacher='siglip2' needs align_teacher_path (a local file; nothing is "
                "downloaded); use align_teacher='thumbnail' or 'none' without pretrained weights"
            )
        batches = where.batches() if where else ()
        net = load_feature_net(cfg.align_teacher_path, where, cfg.image_size, batches)
        return NetworkTeacher(net, cfg.image_size, where)
    raise ValueError(f"unknown align_teacher {kind!r}; expected 'siglip2', 'thumbnail' or 'none'")


class AlignHead(nn.Module):
    """Student MLP: code -> hidden -> hidden -> teacher dim (SiLU), l2-normalised output."""

    def __init__(self, code_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(code_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, q0_BD: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(q0_BD).float(), dim=-1)


def align_loss(student_BD: torch.Tensor, teacher_BD: torch.Tensor) -> torch.Tensor:
    """Batch mean of -cos(student, teacher) (inputs already unit-norm)."""
    return -(student_BD * teacher_BD.to(student_BD.dtype)).sum(-1).mean()
