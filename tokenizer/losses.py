"""Tokenizer losses (method §1.4): pixel, perceptual, semantic, VQ and GAN terms.

- pixel: `rec(x, x_hat)` with rec = l2 or l1, plus the official code's always-added MSE when
  `always_add_mse` (so the default l2 is 2 x MSE; l1 gives L1 + L2).
- perceptual: "lpips" needs the `lpips` package *and* a local VGG16 weight file (no downloads
  here); otherwise use "feature_matching", an honestly named substitute: mean over the frozen
  VFM's 4 levels of the MSE between per-token LayerNorm'ed features of x and x_hat (gradients
  flow through the frozen VFM into x_hat); or "none".  Asking for "lpips" without its weights is
  a ConfigError, never a silent substitute.
- semantic: mean over tokens of 1 - cos(pred, target); target = the VFM's final (LN'ed) tokens.
- GAN: hinge for D (0.5 * [relu(1 - D(x)) + relu(1 + D(x_hat))]), non-saturating softplus(-D(x_hat))
  for G; both scaled by `gan_weight` (0.5) and zero before `gan_start`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from study.config import ConfigError, bounded


@dataclass
class LossConfig:
    pixel: Literal["l2", "l1"] = "l2"
    always_add_mse: bool = True  # official-code quirk: l2 -> 2 x MSE
    pixel_weight: float = bounded(1.0, ge=0)
    perceptual: Literal["lpips", "feature_matching", "none"] = "feature_matching"
    perceptual_weight: float = bounded(1.0, ge=0)
    lpips_vgg_path: Optional[str] = None  # local VGG16 state_dict for the lpips package
    semantic_weight: float = bounded(1.0, ge=0)  # 0 disables the semantic objective (with model.semantic: false)
    vq_weight: float = bounded(1.0, ge=0)  # weight of (codebook + beta * commit)
    gan_weight: float = bounded(0.5, ge=0)  # 0 disables the discriminator entirely
    gan_start: float = bounded(0.4, ge=0)  # < 1: fraction of train.steps; >= 1: absolute step

    def __post_init__(self):
        if self.perceptual == "lpips":
            if self.lpips_vgg_path is None or not Path(self.lpips_vgg_path).is_file():
                raise ConfigError("perceptual 'lpips' needs a local VGG16 weight file (set loss.lpips_vgg_path, "
                                  "or use perceptual: feature_matching / none)", key="perceptual")

    def gan_start_step(self, total_steps: int) -> int:
        return int(self.gan_start * total_steps) if self.gan_start < 1 else int(self.gan_start)


def pixel_loss(x: torch.Tensor, x_hat: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    x, x_hat = x.float(), x_hat.float()
    rec = F.mse_loss(x_hat, x) if cfg.pixel == "l2" else F.l1_loss(x_hat, x)
    return rec + F.mse_loss(x_hat, x) if cfg.always_add_mse else rec


def semantic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over tokens; pred and target (B, T, C)."""
    if pred.shape != target.shape:
        raise ValueError(f"semantic prediction {tuple(pred.shape)} != target {tuple(target.shape)}")
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def feature_matching_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Substitute for LPIPS: MSE of per-token LayerNorm'ed frozen-VFM levels of x (`real`, no grad)
    and x_hat (`fake`, computed with `levels_with_grad` so the loss reaches x_hat)."""
    losses = [F.mse_loss(F.layer_norm(f.float().transpose(1, -1), f.shape[1:2]),
                         F.layer_norm(r.float().transpose(1, -1), r.shape[1:2])) for f, r in zip(fake, real)]
    return torch.stack(losses).mean()


class LPIPSLoss(nn.Module):
    """LPIPS (VGG) from the `lpips` package with a local VGG16 file; only built when both exist."""

    def __init__(self, vgg_path: str):
        super().__init__()
        try:
            import lpips  # noqa: F401
        except ImportError as err:
            raise ConfigError("perceptual 'lpips' needs the lpips package (pip install lpips)",
                              key="loss.perceptual") from err
        import torchvision
        self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        vgg = torchvision.models.vgg16()
        vgg.load_state_dict(torch.load(vgg_path, map_location="cpu", weights_only=True))
        # lpips slices vgg.features into 5 stages; copy the local weights into them
        feats = vgg.features
        for stage in (self.net.net.slice1, self.net.net.slice2, self.net.net.slice3, self.net.net.slice4, self.net.net.slice5):
            for name, layer in stage.named_children():
                layer.load_state_dict(feats[int(name)].state_dict())
        self.net.eval().requires_grad_(False)

    def forward(self, x, x_hat):
        return self.net(x_hat.float(), x.float()).mean()


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean())


def g_nonsat_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake.float()).mean()
