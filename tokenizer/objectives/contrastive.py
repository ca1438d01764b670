"""MoCo v3: symmetrised InfoNCE between a query (backbone + projector + predictor) and the
key of a momentum encoder on the other view; in-batch negatives, no queue (Chen et al. 2021).

Published recipe (facebookresearch/moco-v3): τ 0.2, loss × 2τ,
momentum 0.99 -> 1 (cosine), projector 3 layers (4096 hidden, 256 out, BN), predictor 2
layers, frozen random patch projection (`--stop-grad-conv1`), BYOL augmentations.
Deviations: hidden 4096 / out 256 -> `hidden` 256 / `out_dim` 64; crops (0.08, 1) ->
`crop_scale` (0.2, 1) at 32 px; no blur / solarize; colour distortion per `contrastive.color`. The exported
VFM is the base (query) encoder, as MoCo v3's convert_to_deit.py exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from study.config import bounded
from tokenizer.objectives.base import Inputs, TeacherObjective
from tokenizer.objectives.common import (all_gather_nograd, ColorAugConfig, color_augment, make_teacher, mlp,
                                         rank, random_resized_crop, vit_tokens)


# The published recipe's parts this objective changes, one a line (logged with every run).
DEVIATIONS = """
MoCo v3 projector/predictor hidden 4096, out 256 -> contrastive.hidden / out_dim
crop scale (0.08,1) -> contrastive.crop_scale; no blur/solarize (colour: contrastive.color)
batch 4096 -> the study batch (in-batch negatives only)
exported backbone: the base (query) encoder, as convert_to_deit.py exports it
"""


@dataclass
class ContrastiveConfig:
    temperature: float = bounded(0.2, gt=0)
    hidden: int = bounded(256, ge=1)
    out_dim: int = bounded(64, ge=1)
    momentum: tuple[float, float] = bounded((0.99, 1.0), ge=0, le=1)
    crop_scale: tuple[float, float] = bounded((0.2, 1.0), gt=0, le=1)
    color: ColorAugConfig = field(default_factory=ColorAugConfig)
    freeze_patch_embed: bool = True


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE over q·k / τ with the positives on the (rank-offset) diagonal, scaled by 2τ."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k = all_gather_nograd(k)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits, labels) * 2 * temperature


class MoCoV3(TeacherObjective, name="contrastive", family="contrastive", exports="online", config=ContrastiveConfig,
             deviations=DEVIATIONS):
    def __init__(self, backbone, cfg: ContrastiveConfig, inputs: Inputs):
        super().__init__(backbone, cfg, inputs)
        if cfg.freeze_patch_embed:  # stability trick of MoCo v3 for ViTs
            backbone.patch_embed.requires_grad_(False)
        d = backbone.embed_dim
        self.projector = mlp([d, cfg.hidden, cfg.hidden, cfg.out_dim], batch_norm=True, last_norm=True)
        self.predictor = mlp([cfg.out_dim, cfg.hidden, cfg.out_dim], batch_norm=True)
        self.momentum_backbone = make_teacher(backbone)
        self.momentum_projector = make_teacher(self.projector)

    def ema_pairs(self):
        return [(self.momentum_backbone, self.backbone), (self.momentum_projector, self.projector)]

    def view(self, images):
        return color_augment(random_resized_crop(images, self.image_size, self.cfg.crop_scale), self.cfg.color)

    def forward(self, images, labels, progress):
        c = self.cfg
        v1, v2 = self.view(images), self.view(images)
        q1, q2 = (self.predictor(self.projector(vit_tokens(self.backbone, v)[:, 0])) for v in (v1, v2))
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(vit_tokens(self.momentum_backbone, v)[:, 0]) for v in (v1, v2))
        loss = info_nce(q1, k2, c.temperature) + info_nce(q2, k1, c.temperature)
        return loss, {}
