"""iBOT: DINO's [CLS] self-distillation plus masked-patch self-distillation, the teacher
acting as an online tokenizer (Zhou et al. 2022).

Published recipe (bytedance/ibot main_ibot.py): the student's
global crops are block-masked (a learnable mask token replaces masked patch embeddings)
and its patch tokens at masked positions predict the teacher's patch distributions on the
unmasked crops; prediction ratio U[0.1, 0.5] on half of the images; patch teacher
temperature 0.04 -> 0.07; its own centre (momentum 0.9); shared head; λ1 = λ2 = 1.
Deviations besides DINO's (see tokenizer.objectives.dino): out-dim 8192 -> the DINO
`out_dim`; 10 local crops (0.05, 0.25) -> DINO's `n_local` local crops and scale, so that
dino and ibot differ only by the patch term. The exported VFM is the teacher backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from study.config import bounded
from tokenizer.objectives.base import Inputs
from tokenizer.objectives.common import block_mask, linear_warmup, num_prefix, vit_blocks, vit_embed, vit_tokens
from tokenizer.objectives.dino import (DEVIATIONS as DINO_DEVIATIONS, DINO, DinoConfig, cross_view_ce, entropy,
                                       teacher_probs, update_center)


# The published recipe's parts iBOT changes besides DINO's, one a line (a run logs both: the
# [CLS] part is DINO's recipe).
DEVIATIONS = """
iBOT out-dim 8192 -> dino.out_dim (shared head, as in the S/16 recipe)
10 local crops (0.05,0.25) -> the dino block's local crops, so dino and ibot differ only by the patch term
block masks topped up with random patches so the prediction ratio is exact
patch centre updated from the teacher's outputs at masked positions (a subsample) rather than all patches
"""


@dataclass
class IbotConfig:
    """Only the patch-level additions: the [CLS] part reads the study's `dino` block, so dino
    and ibot cannot drift apart in their shared hyperparameters."""
    mask_ratio: tuple[float, float] = bounded((0.1, 0.5), ge=0, lt=1)  # per-image ratio ~ U[lo, hi] (0.3 ± 0.2)
    mask_prob: float = bounded(0.5, ge=0, le=1)  # fraction of images that get a mask at all
    patch_teacher_temp: tuple[float, float] = bounded((0.04, 0.07), gt=0)
    patch_weight: float = bounded(1.0, ge=0)  # λ2 (λ1 = 1)


class IBOT(DINO, name="ibot", family="self-distillation+latent-mim", exports="teacher", config=IbotConfig,
           deviations=DINO_DEVIATIONS + DEVIATIONS):
    @classmethod
    def build(cls, backbone, cfg, inputs):
        return cls(backbone, cfg.dino, cfg.ibot, inputs)  # iBOT extends the dino block

    def __init__(self, backbone, dino: DinoConfig, cfg: IbotConfig, inputs: Inputs):
        super().__init__(backbone, dino, inputs)
        self.icfg = cfg
        self.grid = (inputs.image_size // inputs.patch_size,) * 2
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("center_patch", torch.zeros(dino.out_dim))

    def sample_masks(self, batch: int, device) -> torch.Tensor:
        """Block masks; each image is masked with prob `mask_prob`, ratio ~ U[mask_ratio]."""
        n = self.grid[0] * self.grid[1]
        lo, hi = self.icfg.mask_ratio
        on = torch.rand(batch) < self.icfg.mask_prob
        ratio = torch.empty(batch).uniform_(lo, hi) * on
        return block_mask(batch, self.grid, [round(float(r) * n) for r in ratio], device)

    def forward(self, images, labels, progress):
        c, ic = self.cfg, self.icfg
        globals_, locals_ = self.views(images)
        crops = torch.cat(globals_)                                         # (2B, 3, H, W)
        masks = self.sample_masks(crops.shape[0], crops.device)             # (2B, N)
        tokens = vit_blocks(self.backbone, vit_embed(self.backbone, crops, masks, self.mask_token))
        p = num_prefix(self.backbone)
        frozen = progress < c.freeze_prototypes
        s = list(self.head(tokens[:, 0], freeze_prototypes=frozen).chunk(2))
        if locals_:
            s += self.student_logits(locals_, progress)
        # the patch head runs at masked positions only: the loss needs nothing else
        s_patch = self.head(tokens[:, p:][masks], freeze_prototypes=frozen)          # (M, K)

        with torch.no_grad():
            t_tokens = vit_tokens(self.teacher_backbone, crops)
            t_cls = self.teacher_head(t_tokens[:, 0])                                 # (2B, K)
            t_patch = self.teacher_head(t_tokens[:, p:][masks])                       # (M, K)
        t = teacher_probs(t_cls, self.center, self.teacher_temp(progress))
        cls_loss = cross_view_ce(list(t.chunk(2)), s, c.student_temp)

        patch_temp = linear_warmup(*ic.patch_teacher_temp, progress, c.teacher_temp_warmup)
        tp = teacher_probs(t_patch, self.center_patch, patch_temp)
        per_patch = torch.sum(-tp * F.log_softmax(s_patch / c.student_temp, dim=-1), dim=-1)  # (M,)
        # per image: mean over its masked patches; unmasked images count as 0 (main_ibot.py)
        m = masks.float()
        image_of = masks.nonzero()[:, 0]
        per_image = torch.zeros(m.shape[0], device=m.device, dtype=per_patch.dtype).index_add(0, image_of, per_patch)
        patch_loss = (per_image / m.sum(1).clamp(min=1.0)).mean()

        update_center(self.center, t_cls, c.center_momentum)
        if len(t_patch):
            update_center(self.center_patch, t_patch, c.center_momentum)
        loss = cls_loss + ic.patch_weight * patch_loss
        metrics = {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach(),
                   "teacher_entropy": entropy(t).mean(), "mask_ratio": m.mean()}
        return loss, metrics
