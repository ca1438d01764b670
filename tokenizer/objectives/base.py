"""The contract every pretraining objective meets.

An objective is one nn.Module that owns the backbone being pretrained (a timm
VisionTransformer, `self.backbone`), its heads and, where the recipe has one, its EMA
teacher (a frozen submodule, so the teacher rides in the module's state_dict: the Trainer
checkpoints it and resumes it exactly, and the optimiser never sees it).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from tokenizer.objectives.common import ema_update_


class Objective(nn.Module):
    name: str = ""
    family: str = ""
    exports: str = "online"  # which encoder becomes the VFM: "online" or "teacher"
    deviations: tuple[str, ...] = ()  # scaled-down or changed parts of the published recipe

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor, progress: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) for a batch of [-1, 1] images at training progress in [0, 1]."""

    # ---------------------------------------------------------------- EMA teacher
    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(teacher part, student part) pairs that the momentum update couples; none by default."""
        return []

    def momentum(self, progress: float) -> float:
        return 1.0

    @torch.no_grad()
    def update_teacher(self, progress: float) -> float:
        """teacher <- m * teacher + (1 - m) * student with m = momentum(progress)."""
        m = self.momentum(progress)
        for teacher, student in self.ema_pairs():
            ema_update_(teacher, student, m)
        return m

    # ---------------------------------------------------------------- export
    def export_backbone(self) -> nn.Module:
        """The backbone that becomes the frozen VFM (the teacher's, for teacher objectives)."""
        return self.backbone
