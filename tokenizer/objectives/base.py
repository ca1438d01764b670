"""The contract every pretraining objective meets.

An objective is one nn.Module that owns the backbone being pretrained (a timm
VisionTransformer, `self.backbone`), its heads and, where the recipe has one, its EMA
teacher (a frozen submodule, so the teacher rides in the module's state_dict: the Trainer
checkpoints it and resumes it exactly, and the optimiser never sees it).

An objective declares itself on its class line, and nowhere else, so adding one is one new
module in this package:

    class MAE(Objective, name="mae", family="pixel-mim", exports="online", config=MaeConfig,
              deviations=DEVIATIONS):

`family` is the registry family of the backbones it makes, `exports` which encoder becomes the
VFM, `config` the dataclass of its `pretrain.<name>` section and `deviations` the parts of the
published recipe it changes: a text of one deviation a line, logged with every run.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from tokenizer.objectives.common import cosine_ramp, ema_update_


REGISTRY: dict[str, type["Objective"]] = {}
EXPORTS = ("online", "teacher", "init")  # the trained encoder, the EMA teacher, the seeded init
DECLARED = ("name", "family", "exports", "config", "deviations")


@dataclass(frozen=True)
class Inputs:
    """What every objective is built from besides its backbone and config section."""
    image_size: int  # side of the training images (global crops are this size)
    patch_size: int  # the backbone's patch side
    class_names: tuple[str, ...] = ()


class Objective(nn.Module):
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    exports: ClassVar[str] = "online"
    config: ClassVar[Optional[type]] = None
    deviations: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, name: str = "", family: str = "", exports: str = "online",
                          config: Optional[type] = None, deviations: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if set(DECLARED) & set(vars(cls)):
            raise TypeError(f"{cls.__name__}: declare {', '.join(DECLARED)} on the class line, not in its body")
        if not name:  # a shared base such as TeacherObjective
            return
        if name in REGISTRY:
            raise TypeError(f"objective '{name}' is declared twice ({REGISTRY[name]} and {cls})")
        if not family or exports not in EXPORTS:
            raise TypeError(f"objective '{name}' needs a family and exports in {EXPORTS}")
        cls.name, cls.family, cls.exports, cls.config = name, family, exports, config
        cls.deviations = tuple(line.strip() for line in deviations.splitlines() if line.strip())
        REGISTRY[name] = cls

    def __init__(self, backbone: nn.Module, cfg: Any, inputs: Inputs):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.image_size, self.patch_size, self.class_names = inputs.image_size, inputs.patch_size, inputs.class_names

    @classmethod
    def build(cls, backbone: nn.Module, cfg: Any, inputs: Inputs) -> "Objective":
        """The objective on `backbone`; `cfg` is the pretrain config (its section `cfg.<name>`)."""
        return cls(backbone, getattr(cfg, cls.name), inputs)

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
