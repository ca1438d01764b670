"""Latent masked image modelling, data2vec-style (Baevski et al. 2022): the student sees a
block-masked view and regresses, at masked positions, the EMA teacher's contextualised
patch features on the full view (the average of its top-K blocks' outputs, each instance-
normalised over the tokens, the average layer-normalised).

Published recipe (fairseq data2vec vision v1 base): EMA 0.999
-> 0.9998, top-K = 6 of 12 blocks, BEiT block masking ≈ 60 %, smooth-L1 with β 2,
linear regression head, random resized crop + flip + colour jitter, one view shared by
student and teacher.
Deviations: EMA `momentum` 0.99 -> 0.999 (a few hundred steps, not 300 epochs); top-K as a
fraction of depth (`top_k_frac` 0.5 = 6/12); targets from block outputs (post-residual)
rather than the FFN output before the last residual; loss averaged over elements rather
than summed over channels / sqrt(D). The exported VFM is the teacher backbone (the EMA
encoder, as for DINO/iBOT; data2vec itself releases the student, noted here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from study.config import bounded
from tokenizer.objectives.base import Inputs, TeacherObjective
from tokenizer.objectives.common import (block_mask, ColorAugConfig, color_augment, make_teacher, num_prefix,
                                         random_resized_crop, vit_blocks, vit_embed)


# The published recipe's parts this objective changes, one a line (logged with every run).
DEVIATIONS = """
data2vec v1 EMA 0.999->0.9998 -> latent_mim.momentum
top-K 6 of 12 blocks -> round(depth * latent_mim.top_k_frac)
targets from block outputs (post-residual), not the FFN output before the last residual
smooth-L1 averaged over elements, not summed over channels / sqrt(D)
crop scale (0.08,1) at 224 -> latent_mim.crop_scale at 32 px; colour distortion per latent_mim.color
exported backbone: EMA teacher (data2vec releases the student)
"""


@dataclass
class LatentMimConfig:
    mask_ratio: float = bounded(0.6, ge=0, lt=1)
    top_k_frac: float = bounded(0.5, gt=0, le=1)
    loss_beta: float = bounded(2.0, gt=0)
    momentum: tuple[float, float] = bounded((0.99, 0.999), ge=0, le=1)
    crop_scale: tuple[float, float] = bounded((0.3, 1.0), gt=0, le=1)
    color: ColorAugConfig = field(default_factory=ColorAugConfig)


def layer_targets(layers: list[torch.Tensor], k: int, prefix: int) -> torch.Tensor:
    """Average of the last k blocks' patch outputs, each instance-normalised over tokens
    (per channel), then layer-normalised: (B, N, D)."""
    normed = [F.instance_norm(x[:, prefix:].float().transpose(1, 2)).transpose(1, 2) for x in layers[-k:]]
    avg = torch.stack(normed).mean(0)
    return F.layer_norm(avg, avg.shape[-1:])


class LatentMIM(TeacherObjective, name="latent_mim", family="latent-mim", exports="teacher", config=LatentMimConfig,
                deviations=DEVIATIONS):
    def __init__(self, backbone, cfg: LatentMimConfig, inputs: Inputs):
        super().__init__(backbone, cfg, inputs)
        self.grid = (inputs.image_size // inputs.patch_size,) * 2
        d = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.regressor = nn.Linear(d, d)
        self.teacher_backbone = make_teacher(backbone)
        self.top_k = max(1, round(len(backbone.blocks) * cfg.top_k_frac))

    def ema_pairs(self):
        return [(self.teacher_backbone, self.backbone)]

    def forward(self, images, labels, progress):
        c = self.cfg
        view = color_augment(random_resized_crop(images, self.image_size, c.crop_scale), c.color)
        b, n = view.shape[0], self.grid[0] * self.grid[1]
        mask = block_mask(b, self.grid, [round(c.mask_ratio * n)] * b, view.device)   # (B, N)
        p = num_prefix(self.backbone)
        student = vit_blocks(self.backbone, vit_embed(self.backbone, view, mask, self.mask_token))
        pred = self.regressor(student[:, p:])[mask]                                  # (M, D)
        with torch.no_grad():
            _, layers = vit_blocks(self.teacher_backbone, vit_embed(self.teacher_backbone, view), keep_layers=True)
            target = layer_targets(layers, self.top_k, p)[mask]
        loss = F.smooth_l1_loss(pred.float(), target, beta=c.loss_beta)
        return loss, {"mask_ratio": mask.float().mean(), "target_std": target.std()}
