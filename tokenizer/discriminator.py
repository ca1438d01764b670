"""DINO-style discriminator (the paper's default "dinogan", method §1.4; StyleGAN-T/VAR style).

Trainable heads on the tapped tokens of a frozen ViT:
- input: [-1, 1] images; larger than the backbone's input size, a random crop of that size with
  p = 0.5, otherwise an area resize to it (the paper: 224 for DINO ViT-S/16);
- 5 taps: the patch embedding (with positions) and the raw outputs of 4 evenly spaced blocks
  ([2, 5, 8, 11] of 12), no final norm; at each tap the CLS token is added to every patch token;
- each head: SpectralNorm-Conv1d k=1 -> BatchNormLocal (virtual batch 8) -> LeakyReLU 0.2, then a
  residual block of the same with k=9 and circular padding scaled by 1/sqrt(2), then
  SpectralNorm-Conv1d to 1 channel; logits of all heads concatenated to (B, 5 * tokens).

BatchNormLocal normalises each set of images on its own: `disc(cat([real, fake]), sets=2)` runs both
sets in one forward (one DDP reduction) but the statistics of the real images never see the fake ones, as
when the official code calls D on each set separately.

The backbone is any `build_vfm` entry held outside the module's parameters (shared, frozen, never
checkpointed), chosen by `disc_vfm` and therefore the same whatever VFM the tokenizer studies;
gradients still flow through it to the generator's images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from tokenizer.model import FrozenRef
from tokenizer.vfm import level_indices


class BatchNormLocal(nn.Module):
    """BatchNorm without running stats over virtual batches of up to `virtual_bs` samples (and
    all positions).  The batch is first cut into `sets` equal parts that never share statistics."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, sets: int = 1) -> torch.Tensor:
        B, C, L = x.shape
        per_set = B // sets
        groups = sets * math.ceil(per_set / self.virtual_bs)
        if B % groups:
            raise ValueError(f"BatchNormLocal: batch {B} in {sets} sets does not split into {groups} equal groups")
        xg = x.float().view(groups, B // groups, C, L)
        mean = xg.mean(dim=(1, 3), keepdim=True)
        var = xg.var(dim=(1, 3), keepdim=True, unbiased=False)
        xg = (xg - mean) / torch.sqrt(var + self.eps)
        return (xg.view(B, C, L) * self.weight[None, :, None] + self.bias[None, :, None]).to(x.dtype)


class _ConvBlock(nn.Module):
    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv = spectral_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular"))
        self.norm = BatchNormLocal(channels)

    def forward(self, x: torch.Tensor, sets: int) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x), sets), 0.2)


class Head(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.inp = _ConvBlock(channels, 1)
        self.res = _ConvBlock(channels, 9)
        self.out = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, x: torch.Tensor, sets: int = 1) -> torch.Tensor:
        h = self.inp(x, sets)  # (B, C, T)
        h = (h + self.res(h, sets)) / math.sqrt(2)
        return self.out(h).flatten(1)  # (B, T)


def crop_or_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images larger than `size`: a random `size` crop with p = 0.5, else an area resize."""
    H, W = images.shape[-2:]
    if (H, W) == (size, size):
        return images
    if H > size and W > size and torch.rand(()) < 0.5:
        top, left = int(torch.randint(H - size + 1, ())), int(torch.randint(W - size + 1, ()))
        return images[..., top:top + size, left:left + size]
    return F.interpolate(images, size=(size, size), mode="area")


class DinoDiscriminator(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self._backbone = FrozenRef(backbone)
        self.tap_blocks = level_indices(backbone.depth)  # [2, 5, 8, 11] for 12 blocks
        self.heads = nn.ModuleList([Head(backbone.width) for _ in range(1 + len(self.tap_blocks))])

    @property
    def backbone(self) -> nn.Module:
        return self._backbone.module

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.backbone._apply(fn)  # .to(device) also moves the unregistered frozen backbone
        return self

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """5 x (B, C, T): patch embedding and the tapped blocks, CLS added to each patch token.
        Not under no_grad: the generator's term needs d(logits)/d(images)."""
        vfm = self.backbone
        vit, prefix = vfm.model, vfm.num_prefix_tokens
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(vfm.preprocess(images)))))  # (B, P + T, C)
        taps = [x]
        for i, block in enumerate(vit.blocks[:self.tap_blocks[-1] + 1]):
            x = block(x)
            if i in self.tap_blocks:
                taps.append(x)
        return [(t[:, prefix:] + t[:, :1]).transpose(1, 2) for t in taps]

    def forward(self, images: torch.Tensor, sets: int = 1) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], made of `sets` equal parts normalised separately
        -> logits (B, 5 * T)."""
        parts = [crop_or_resize(part, self.backbone.input_size) for part in images.chunk(sets)]
        taps = self.taps(torch.cat(parts))
        return torch.cat([head(t, sets) for head, t in zip(self.heads, taps)], 1)
