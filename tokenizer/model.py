"""VFMTok (discrete) and VFMAE (continuous): a frozen VFM turned into an image tokenizer.

    images (B, 3, H, W) in [-1, 1]
      -> frozen VFM levels          4 x (B, C_vfm, h, w)                (tokenizer.vfm)
      -> sampler                    (B, N, d)  region-adaptive or grid   (tokenizer.sampler)
      -> bottleneck                 ids (B, N) | latent (B, C_lat, s, s) (tokenizer.quantizer)
      -> ViT decoder + CNN          (B, 3, H, W)                         (tokenizer.decoder)
      -> semantic branch (train)    predicted VFM final features

The VFM is held by reference (`FrozenRef`): it is never in `state_dict` (checkpoints strip the
backbone, as the official code does), EMA copies share it, and `.to()` still moves it.
`load_tokenizer` rebuilds it from the saved `VFMSpec`.

Public API: `encode(images)` -> ids (B, N) long in raster order of the anchor grid, or latents
(B, C, s, s); `decode(ids_or_latents)` -> images in [-1, 1] (not clamped during training;
clamped here); `reconstruct(images)`; `forward(images)` -> dict used by the training losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from study.config import ConfigError, bounded
from tokenizer.decoder import CNNUpsampler, ViTDecoder
from tokenizer.quantizer import ContinuousBottleneck, CosineVQ
from tokenizer.sampler import GridSampler, RegionSampler


@dataclass
class TokenizerConfig:
    kind: Literal["vfmtok", "vfmae"] = "vfmtok"
    sampler: Literal["region", "grid"] = "region"  # grid = ablation without region-adaptive sampling
    image_size: int = bounded(32, ge=1)
    num_queries: int = bounded(64, ge=1)  # N tokens on a sqrt(N) x sqrt(N) anchor grid
    dim: int = bounded(128, ge=1)
    enc_depth: int = bounded(2, ge=1)
    enc_heads: int = bounded(4, ge=1)
    enc_points: int = bounded(4, ge=1)
    enc_ffn: int = bounded(256, ge=1)
    # discrete bottleneck
    codebook_size: int = bounded(512, ge=1)
    code_dim: int = bounded(8, ge=1)
    beta: float = bounded(0.25, ge=0)
    usage_buffer: int = bounded(65536, ge=1)
    # continuous bottleneck
    latent_channels: int = bounded(8, ge=1)
    bottleneck_groups: int = bounded(32, ge=1)
    # decoder
    dec_depth: int = bounded(2, ge=1)
    dec_heads: int = bounded(4, ge=1)
    attn_dropout: float = bounded(0.1, ge=0, lt=1)
    n_registers: int = bounded(4, ge=0)
    decoder_patch: int = bounded(4, ge=1)  # pixel grid = image_size / decoder_patch (paper: 336 / 16 = 21)
    cnn_ch: int = bounded(32, ge=1)
    cnn_mult: tuple[int, ...] = bounded((1, 2, 4), ge=1)
    cnn_res_blocks: int = bounded(1, ge=0)  # ResBlocks per stage = this + 1 (LlamaGen convention)
    cnn_groups: int = bounded(8, ge=1)
    semantic: bool = True  # False: no semantic branch (the paper's ablation)
    kv_cls: Optional[bool] = None  # add the VFM CLS to KV features; None = True for vfmae only

    def __post_init__(self):
        if math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ConfigError(f"must be a perfect square, got {self.num_queries}", key="num_queries")
        if self.image_size % self.decoder_patch:
            raise ConfigError(f"image_size {self.image_size} not divisible by decoder_patch {self.decoder_patch}",
                              key="decoder_patch")
        if 2 ** (len(self.cnn_mult) - 1) != self.decoder_patch:
            raise ConfigError(f"cnn_mult {self.cnn_mult} upsamples x{2 ** (len(self.cnn_mult) - 1)}, but "
                              f"decoder_patch is {self.decoder_patch} (use len(cnn_mult) = log2(patch) + 1)",
                              key="cnn_mult")
        for key in ("dim",):
            if self.dim % self.enc_heads or self.dim % self.dec_heads:
                raise ConfigError(f"dim {self.dim} must be divisible by enc_heads and dec_heads", key=key)

    @property
    def causal(self) -> bool:
        return self.kind == "vfmtok"

    @property
    def use_kv_cls(self) -> bool:
        return self.kind == "vfmae" if self.kv_cls is None else self.kv_cls


class FrozenRef:
    """Holds a frozen module without registering it: absent from state_dict, shared by deepcopy."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class VFMTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, vfm: nn.Module):
        super().__init__()
        self.cfg = cfg
        self._vfm = FrozenRef(vfm)
        d, N = cfg.dim, cfg.num_queries
        self.side = math.isqrt(N)
        if cfg.sampler == "region":
            self.sampler = RegionSampler(vfm.width, d, N, cfg.enc_depth, cfg.enc_heads, 4, cfg.enc_points,
                                         cfg.enc_ffn, cfg.causal)
        else:
            self.sampler = GridSampler(vfm.width, d, N, cfg.enc_depth, cfg.enc_heads, 4, cfg.enc_ffn, cfg.causal)
        if cfg.kind == "vfmtok":
            self.pre_quant = nn.Linear(d, cfg.code_dim)
            self.quantizer = CosineVQ(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.usage_buffer)
            self.post_quant = nn.Linear(cfg.code_dim, d)
        else:
            self.bottleneck = ContinuousBottleneck(d, cfg.latent_channels, cfg.bottleneck_groups)
            self.post_quant = nn.Linear(cfg.latent_channels, d)
        pixel = cfg.image_size // cfg.decoder_patch
        semantic = "none" if not cfg.semantic else ("shared" if cfg.kind == "vfmtok" else "separate")
        cnn = CNNUpsampler(d, cfg.cnn_ch, tuple(cfg.cnn_mult), cfg.cnn_res_blocks, cfg.cnn_groups)
        self.decoder = ViTDecoder(dim=d, depth=cfg.dec_depth, n_heads=cfg.dec_heads, attn_dropout=cfg.attn_dropout,
                                  causal=cfg.causal, num_tokens=N, n_registers=cfg.n_registers,
                                  vfm_grid=tuple(vfm.grid), pixel_grid=(pixel, pixel), semantic=semantic,
                                  vfm_width=vfm.width, cnn=cnn)

    # ---------------------------------------------------------------- plumbing
    @property
    def vfm(self) -> nn.Module:
        return self._vfm.module

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.vfm._apply(fn)  # keep the unregistered frozen VFM on the same device
        return self

    @property
    def grid(self) -> tuple[int, int]:
        return (self.side, self.side)

    # ---------------------------------------------------------------- encoder side
    @torch.no_grad()
    def vfm_features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Frozen features: 4 levels (B, C, h, w) (+ CLS for KV when configured) and the semantic
        target: final patch tokens (B, h*w, C) for vfmtok, [CLS, patches] (B, 1+h*w, C) for vfmae."""
        levels = [f.float() for f in self.vfm.levels(images)]
        # vfmtok's target: final-norm patch tokens == the last level (saves a second VFM pass)
        final_patches = levels[-1].flatten(2).transpose(1, 2)  # (B, G, C)
        final_with_cls = None
        if self.cfg.use_kv_cls or (self.cfg.semantic and self.cfg.kind == "vfmae"):
            final_with_cls = self.vfm.final_tokens(images, with_cls=True).float()  # (B, 1+G, C)
        if self.cfg.use_kv_cls:
            # deviation: the registry exposes the CLS of the final layer only; it is broadcast-added
            # to every level (the paper adds each level's own CLS)
            cls = final_with_cls[:, 0, :, None, None]
            levels = [f + cls for f in levels]
        if not self.cfg.semantic:
            target = None
        elif self.cfg.kind == "vfmtok":
            target = final_patches
        else:
            target = final_with_cls
        return levels, target

    def tokens(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.sampler(levels)  # (B, N, d)

    def quantize(self, tokens: torch.Tensor) -> dict:
        if self.cfg.kind == "vfmtok":
            z_q, ids, losses = self.quantizer(self.pre_quant(tokens))
            return {"ids": ids, "z": self.post_quant(z_q), "vq": losses}
        latent = self.bottleneck(tokens)  # (B, C, s, s)
        return {"latent": latent, "z": self.post_quant(latent.flatten(2).transpose(1, 2)), "vq": {}}

    # ---------------------------------------------------------------- public API
    def encode_parts(self, images: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
        """The encoder side in fp32 under any autocast (the official code forces fp32 in the
        encoder's attention): training and `encode` then give the same ids for the same images.
        Returns the bottleneck's dict and the semantic target."""
        with torch.autocast(images.device.type, enabled=False):
            levels, target = self.vfm_features(images.float())
            return self.quantize(self.tokens(levels)), target

    def forward(self, images: torch.Tensor) -> dict:
        q, target = self.encode_parts(images)
        recon, sem_pred = self.decoder.forward_train(q["z"])
        return {**q, "recon": recon, "sem_pred": sem_pred, "sem_target": target}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """ids (B, N) long in raster order of the anchor grid, or latents (B, C, s, s)."""
        q, _ = self.encode_parts(images)
        return q["ids"] if self.cfg.kind == "vfmtok" else q["latent"]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """ids (B, N) or latents (B, C, s, s) -> images (B, 3, H, W) clamped to [-1, 1]."""
        if self.cfg.kind == "vfmtok":
            z = self.post_quant(self.quantizer.lookup(codes.long()))
        else:
            z = self.post_quant(codes.flatten(2).transpose(1, 2))
        return self.decoder(z).clamp(-1, 1)
