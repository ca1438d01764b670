"""The contract every pretraining objective meets.

An objective is one nn.Module that owns the backbone being pretrained (a timm
VisionTransformer, `self.backbone`), its heads and, where the recipe has one, its EMA
teacher (a frozen submodule, so the teacher rides in the module's state_dict: the Trainer
checkpoints it and resumes it exactly, and the optimiser never sees it).

A subclass with a `name` registers itself: its `family`, `exports` and `config` (the dataclass
of its `pretrain.<name>` section) are declared on the class and nowhere else, so adding an
objective is one new module in this package.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from tokenizer.objectives.common import cosine_ramp, ema_update_


REGISTRY: dict[str, type["Objective"]] = {}


class Objective(nn.Module):
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # the registry family of the backbones it makes
    exports: ClassVar[str] = "online"  # which encoder becomes the VFM: "online", "teacher" or "init"
    config: ClassVar[Optional[type]] = None  # dataclass of its `pretrain.<name>` section
    deviations: ClassVar[tuple[str, ...]] = ()  # scaled-down or changed parts of the published recipe

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in REGISTRY:
                raise TypeError(f"objective '{cls.name}' is declared twice ({REGISTRY[cls.name]} and {cls})")
            REGISTRY[cls.name] = cls

    def __init__(self, backbone: nn.Module, cfg: Any = None, image_size: Optional[int] = None):
        super().__init__()
        self.backbone, self.cfg, self.image_size = backbone, cfg, image_size

    @classmethod
    def build(cls, backbone: nn.Module, cfg: Any, *, image_size: int, patch_size: int,
              class_names: list[str]) -> "Objective":
        """The objective on `backbone`; `cfg` is the pretrain config (its section `cfg.<name>`)."""
        return cls(backbone, getattr(cfg, cls.name), image_size, patch_size)

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
        """The backbone that becomes the frozen VFM: the one its `exports` names."""
        return self.backbone


class TeacherObjective(Objective):
    """An objective with an EMA teacher: its config's `momentum` (start, end) is ramped on a
    cosine, and where it `exports` the teacher, that is its `teacher_backbone`."""

    def momentum(self, progress: float) -> float:
        return cosine_ramp(*self.cfg.momentum, progress)

    def export_backbone(self) -> nn.Module:
        return self.teacher_backbone if self.exports == "teacher" else self.backbone
