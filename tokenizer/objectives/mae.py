"""MAE: pixel masked image modelling (He et al. 2022).

Published recipe (facebookresearch/mae): the encoder sees only
the 25 % visible patches (75 % random masking), a light decoder (8 blocks × 512, fixed 2-D
sin-cos positions) reconstructs every patch, and the loss is the MSE on per-patch
normalised pixels (`norm_pix_loss`) over masked patches only; random resized crop
(0.2, 1) + flip, no other augmentation, no EMA.
Deviations: decoder 8 × 512 -> `decoder_depth` 2 × `decoder_dim` 64 (scaled with the
encoder; keep it no wider than the encoder, as MAE's 512 < 768/1024); everything else as published. The exported VFM is the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Block
from torch import nn

from generators.layers import sincos_2d
from study.config import bounded
from tokenizer.objectives.base import Inputs, Objective
from tokenizer.objectives.common import num_prefix, random_mask, random_resized_crop, vit_blocks, vit_embed


# The published recipe's parts this objective changes, one a line (logged with every run).
DEVIATIONS = """
decoder 8 blocks x 512 -> mae.decoder_depth x mae.decoder_dim
exported backbone: the encoder (all patches visible at inference)
"""


@dataclass
class MaeConfig:
    mask_ratio: float = bounded(0.75, ge=0, lt=1)
    decoder_dim: int = bounded(64, ge=1)
    decoder_depth: int = bounded(2, ge=1)
    decoder_heads: int = bounded(2, ge=1)
    crop_scale: tuple[float, float] = bounded((0.2, 1.0), gt=0, le=1)
    norm_pix_loss: bool = True


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p * p * 3), row-major patches as the patch embedding sees them."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class MAE(Objective, name="mae", family="pixel-mim", exports="online", config=MaeConfig, deviations=DEVIATIONS):
    def __init__(self, backbone, cfg: MaeConfig, inputs: Inputs):
        super().__init__(backbone, cfg, inputs)
        patch_size = inputs.patch_size
        grid = inputs.image_size // patch_size
        self.num_patches = grid * grid
        d = cfg.decoder_dim
        self.decoder_embed = nn.Linear(backbone.embed_dim, d)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.decoder_mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_2d(d, grid, grid)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(d, cfg.decoder_heads, mlp_ratio=4.0) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, patch_size * patch_size * 3)

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder on the prefix tokens + the kept patches only. keep: (B, n_keep) indices."""
        x = vit_embed(self.backbone, images)
        p = num_prefix(self.backbone)
        patches = torch.gather(x[:, p:], 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return vit_blocks(self.backbone, torch.cat([x[:, :p], patches], dim=1))

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Visible latents back at their positions, mask tokens elsewhere -> pixels (B, N, p*p*3)."""
        p = num_prefix(self.backbone)
        z = self.decoder_embed(latent)                                  # (B, P + n_keep, d)
        b, d = z.shape[0], z.shape[-1]
        full = self.decoder_mask_token.to(z.dtype).expand(b, self.num_patches, d).clone()
        full = full.scatter(1, keep[..., None].expand(-1, -1, d), z[:, p:])
        x = torch.cat([z[:, :p], full + self.decoder_pos.to(z.dtype)], dim=1)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, p:])

    def forward(self, images, labels, progress):
        c = self.cfg
        view = random_resized_crop(images, self.image_size, c.crop_scale)
        b = view.shape[0]
        n_mask = round(c.mask_ratio * self.num_patches)
        mask = random_mask(b, self.num_patches, n_mask, view.device)       # (B, N) True = hidden
        keep = (~mask).nonzero()[:, 1].reshape(b, -1)                      # (B, n_keep), sorted
        pred = self.decode(self.encode_visible(view, keep), keep)
        target = patchify(view, self.patch_size)
        if c.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, {"mask_ratio": mask.float().mean()}
