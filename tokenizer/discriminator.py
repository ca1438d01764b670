"""DINO-style discriminator (the paper's default "dinogan", method §1.4; StyleGAN-T/VAR style).

Trainable heads on the tapped features of a frozen ViT.  Each head: SpectralNorm-Conv1d k=1
-> BatchNormLocal (virtual batch 8) -> LeakyReLU 0.2, then a residual block of the same with
k=9 and circular padding scaled by 1/sqrt(2), then SpectralNorm-Conv1d to 1 channel; logits of
all heads are concatenated to (B, heads * tokens).

Deviations from the paper (also listed in the run config's `deviations`):
- the backbone is any `build_vfm` entry (default: the tokenizer's own frozen VFM, or
  random:vit_tiny_p4), not the DINO ViT-S/16 checkpoint, which cannot be downloaded here;
- taps are the 4 `levels()` maps the registry exposes (the paper taps patch-embed + 4 blocks,
  i.e. 5 heads), and the CLS token is added to each tap only when the backbone exposes it per
  level (the registry's `levels()` returns patch tokens only, so it is not added);
- no 224 random-crop / area-resize step: the backbone resizes inputs itself.
The backbone is held outside the module's parameters (shared, frozen, never checkpointed);
gradients still flow through it to the generator's images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from tokenizer.model import FrozenRef, levels_with_grad


class BatchNormLocal(nn.Module):
    """BatchNorm over virtual batches of `virtual_bs` samples (and all positions), no running stats."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, L = x.shape
        groups = B // self.virtual_bs if B % self.virtual_bs == 0 and B >= self.virtual_bs else 1
        xg = x.float().view(groups, -1, C, L)
        mean = xg.mean(dim=(1, 3), keepdim=True)
        var = xg.var(dim=(1, 3), keepdim=True, unbiased=False)
        xg = (xg - mean) / torch.sqrt(var + self.eps)
        return (xg.view(B, C, L) * self.weight[None, :, None] + self.bias[None, :, None]).to(x.dtype)


class _ConvBlock(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = spectral_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular"))
        self.norm = BatchNormLocal(channels)

    def forward(self, x):
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class Head(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.inp = _ConvBlock(channels, 1)
        self.res = _ConvBlock(channels, 9)
        self.out = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, C, T)
        h = (h + self.res(h)) / math.sqrt(2)
        return self.out(h).flatten(1)  # (B, T)


class DinoDiscriminator(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self._backbone = FrozenRef(backbone)
        self.heads = nn.ModuleList([Head(backbone.width) for _ in range(4)])

    @property
    def backbone(self) -> nn.Module:
        return self._backbone.module

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.backbone._apply(fn)  # .to(device) also moves the unregistered frozen backbone
        return self

    def forward(self, images: torch.Tensor | None = None, taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> logits (B, 4 * h * w).  A caller that already holds the
        backbone's levels of the images (the tokenizer shares its frozen VFM) passes them as `taps`."""
        if taps is None:
            taps = levels_with_grad(self.backbone, images)  # 4 x (B, C, h, w), grads reach `images`
        return torch.cat([head(t.flatten(2)) for head, t in zip(self.heads, taps)], 1)
