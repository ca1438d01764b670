"""DINO: multi-crop global self-distillation with an EMA teacher (Caron et al. 2021).

Published recipe (facebookresearch/dino main_dino.py) and what
this scaled-down version changes (every change is a named deviation, also written to the
checkpoint provenance by tokenizer.pretrain):
  * head out-dim 65536, hidden 2048, bottleneck 256  -> `out_dim` 1024, `hidden` 256, `bottleneck` 64
  * 2 global crops (0.4, 1) at 224 + 8 local (0.05, 0.4) at 96
        -> 2 global (0.4, 1) at the data resolution + `n_local` 4 local (0.05, 0.4) at half of it
  * no blur / solarize at 32 px; colour distortion (jitter, hue, grayscale) per `dino.color`
  * teacher temperature 0.04 -> 0.07 warm-up over 30 of 100 epochs -> over `teacher_temp_warmup` 0.3 of the steps
  * EMA momentum 0.996 -> 1 (cosine) -> `momentum` 0.99 -> 1: a few hundred steps need a faster teacher
  * last layer frozen for the first epoch -> for the first `freeze_prototypes` fraction of steps
  * weight decay 0.04 -> 0.4 schedule -> the study's one constant AdamW weight decay (tokenizer.pretrain)
The exported VFM is the teacher backbone, as DINO releases it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from study.config import bounded
from tokenizer.objectives.base import Inputs, TeacherObjective
from tokenizer.objectives.common import (DINOHead, all_reduce_mean, ColorAugConfig, color_augment,
                                         linear_warmup, make_teacher, random_resized_crop, vit_tokens)


# The published recipe's parts this objective changes, one a line (logged with every run).
DEVIATIONS = """
DINO head out_dim 65536/hidden 2048/bottleneck 256 -> dino.out_dim/hidden/bottleneck
multi-crop 2 global (0.4,1)@224 + 8 local (0.05,0.4)@96 -> 2 global @image size + dino.n_local local @local_size_ratio
no blur/solarize; colour jitter/hue/grayscale per dino.color (recipe: 0.4/0.1/0.2)
teacher temp warm-up 30 epochs -> dino.teacher_temp_warmup fraction of steps
EMA momentum 0.996->1 -> dino.momentum (faster teacher for a few hundred steps)
last layer frozen 1 epoch -> dino.freeze_prototypes fraction of steps
exported backbone: EMA teacher (as DINO releases it)
"""


@dataclass
class DinoConfig:
    out_dim: int = bounded(1024, ge=1)
    hidden: int = bounded(256, ge=1)
    bottleneck: int = bounded(64, ge=1)
    head_layers: int = bounded(3, ge=1)
    n_local: int = bounded(4, ge=0)
    global_scale: tuple[float, float] = bounded((0.4, 1.0), gt=0, le=1)
    local_scale: tuple[float, float] = bounded((0.05, 0.4), gt=0, le=1)
    local_size_ratio: float = bounded(0.5, gt=0, le=1)  # local crop side / image side (96 / 224 ≈ 0.43 in DINO)
    color: ColorAugConfig = field(default_factory=ColorAugConfig)
    student_temp: float = bounded(0.1, gt=0)
    teacher_temp: tuple[float, float] = bounded((0.04, 0.07), gt=0)  # (start, end) of the warm-up
    teacher_temp_warmup: float = bounded(0.3, ge=0, le=1)  # fraction of training
    center_momentum: float = bounded(0.9, ge=0, le=1)
    momentum: tuple[float, float] = bounded((0.99, 1.0), ge=0, le=1)  # EMA teacher, cosine from start to end
    freeze_prototypes: float = bounded(0.01, ge=0, le=1)  # fraction of training with the prototypes frozen


# --------------------------------------------------------------------------- loss pieces
def teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution."""
    return F.softmax((logits - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> None:
    """center <- m * center + (1 - m) * batch mean of teacher logits (global batch under DDP)."""
    batch_mean = all_reduce_mean(logits.float().mean(dim=tuple(range(logits.ndim - 1))))
    center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)


def cross_view_ce(t_chunks: list[torch.Tensor], s_chunks: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Mean over (teacher view i, student view j != i) of CE(teacher_i, student_j)."""
    total, pairs = 0.0, 0
    for i, t in enumerate(t_chunks):
        for j, s in enumerate(s_chunks):
            if i == j:
                continue
            total = total + torch.sum(-t * F.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


# --------------------------------------------------------------------------- objective
class DINO(TeacherObjective, name="dino", family="self-distillation", exports="teacher", config=DinoConfig,
           deviations=DEVIATIONS):
    def __init__(self, backbone, cfg: DinoConfig, inputs: Inputs):
        super().__init__(backbone, cfg, inputs)
        p = inputs.patch_size
        self.local_size = max(p, round(inputs.image_size * cfg.local_size_ratio / p) * p)
        self.head = DINOHead(backbone.embed_dim, cfg.hidden, cfg.bottleneck, cfg.out_dim, cfg.head_layers)
        self.teacher_backbone = make_teacher(self.backbone)
        self.teacher_head = make_teacher(self.head)
        self.register_buffer("center", torch.zeros(cfg.out_dim))

    def ema_pairs(self):
        return [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]

    def views(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        c = self.cfg

        def view(size, scale):
            return color_augment(random_resized_crop(images, size, scale), c.color)
        return ([view(self.image_size, c.global_scale) for _ in range(2)],
                [view(self.local_size, c.local_scale) for _ in range(c.n_local)])

    def student_logits(self, crops: list[torch.Tensor], progress: float) -> list[torch.Tensor]:
        """Crops of one size go through the backbone together (DINO's MultiCropWrapper)."""
        frozen = progress < self.cfg.freeze_prototypes
        out = self.head(vit_tokens(self.backbone, torch.cat(crops))[:, 0], freeze_prototypes=frozen)
        return list(out.chunk(len(crops)))

    @torch.no_grad()
    def teacher_logits(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.teacher_head(vit_tokens(self.teacher_backbone, torch.cat(crops))[:, 0])

    def teacher_temp(self, progress: float) -> float:
        return linear_warmup(*self.cfg.teacher_temp, progress, self.cfg.teacher_temp_warmup)

    def forward(self, images, labels, progress):
        c = self.cfg
        globals_, locals_ = self.views(images)
        s = self.student_logits(globals_, progress)
        if locals_:
            s += self.student_logits(locals_, progress)
        t_logits = self.teacher_logits(globals_)
        t = teacher_probs(t_logits, self.center, self.teacher_temp(progress))
        loss = cross_view_ce(list(t.chunk(2)), s, c.student_temp)
        update_center(self.center, t_logits, c.center_momentum)
        metrics = {"teacher_entropy": entropy(t).mean(), "teacher_batch_entropy": entropy(t.mean(0))}
        return loss, metrics
