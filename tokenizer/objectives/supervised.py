"""Supervised: cross-entropy of a linear head on pooled tokens (DeiT-like, scaled down).

Deviations from DeiT: no mixup / cutmix / RandAugment / repeated augmentation / stochastic
depth; random resized crop (`crop_scale` 0.35, 1) + flip only; label smoothing 0.1 kept;
the head reads the mean of the patch tokens (`pool` 'avg') rather than the CLS token, which
is what the tokenizer consumes. The exported VFM is the trained backbone (head dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import nn

from study.config import bounded
from tokenizer.objectives.base import Inputs, Objective
from tokenizer.objectives.common import pool, random_resized_crop, vit_tokens


# The published recipe's parts this objective changes, one a line (logged with every run).
DEVIATIONS = """
DeiT: no mixup/cutmix/RandAugment/repeated aug/stochastic depth; crop + flip only
linear head on supervised.pool tokens (default: mean of patch tokens) rather than CLS
"""


@dataclass
class SupervisedConfig:
    pool: Literal["avg", "cls"] = "avg"
    label_smoothing: float = bounded(0.1, ge=0, lt=1)
    crop_scale: tuple[float, float] = bounded((0.35, 1.0), gt=0, le=1)


class Supervised(Objective, name="supervised", family="supervised", exports="online", config=SupervisedConfig,
                 deviations=DEVIATIONS):
    def __init__(self, backbone, cfg: SupervisedConfig, inputs: Inputs):
        super().__init__(backbone, cfg, inputs)
        self.classifier = nn.Linear(backbone.embed_dim, len(inputs.class_names))

    def forward(self, images, labels, progress):
        view = random_resized_crop(images, self.image_size, self.cfg.crop_scale)
        logits = self.classifier(pool(self.backbone, vit_tokens(self.backbone, view), self.cfg.pool))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        return loss, {"train_acc": (logits.argmax(1) == labels).float().mean()}
