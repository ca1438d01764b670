"""DiT-DH (RAE's `DiTwDDTHead`) and plain DiT velocity networks for flow matching on latents.

DiT-DH = a DiT trunk plus a wide, shallow "DDT head":
  trunk:  s = PatchEmbed_trunk(x_t) + frozen 2-D sincos pos;  blocks conditioned on c = SiLU(t + y)
  head:   h = PatchEmbed_head(x_t) (re-embeds the noisy input at head width, RoPE only);
          blocks conditioned *per token* on s' = Linear(SiLU(t + s_trunk))
  final:  AdaLN (shift, scale; no gate) + Linear, both zero-initialised -> velocity
The plain DiT variant (`ddt_depth = 0`) applies the final layer to the trunk output with c.

Every block: AdaLN-Zero (SiLU -> Linear to shift, scale, gate; zero-init), so the trunk's c goes
through a second SiLU and the head's s' through its first; RMSNorm with a learned gain (eps 1e-6),
SwiGLU with biases and hidden int(2/3 * mlp_ratio * dim), qkv and output biases, no qk-norm,
2-D RoPE (head_dim/4 frequencies per axis).
Time embedding: Gaussian Fourier features of `fourier_freqs` frozen N(0, scale^2) frequencies
(sin and cos: 2 x fourier_freqs features) -> MLP.  The frozen tables (positions, frequencies)
are buffers, so `num_params` counts trainable weights plus them (`frozen_params`), as the
official model holds them as parameters without gradient.
Labels: table of num_classes + 1 rows (null = num_classes), dropout `class_dropout` in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from study.config import bounded

from generators.layers import RMSNorm, SwiGLU, apply_rope, rope_2d, sincos_2d


@dataclass
class DiTConfig:
    in_channels: int = bounded(8, ge=1)
    grid: tuple[int, int] = bounded((8, 8), ge=1)  # latent spatial size (h, w)
    patch_size: int = bounded(1, ge=1)
    num_classes: int = bounded(10, ge=1)
    dim: int = bounded(128, ge=1)  # trunk width
    depth: int = bounded(4, ge=1)
    heads: int = bounded(4, ge=1)
    ddt_width: int = bounded(256, ge=1)  # head width (wider than the trunk)
    ddt_depth: int = bounded(2, ge=0)  # 0: plain DiT, no head
    ddt_heads: int = bounded(4, ge=1)
    mlp_ratio: float = bounded(4.0, gt=0)
    class_dropout: float = bounded(0.1, ge=0, lt=1)
    fourier_freqs: int = bounded(256, ge=1)
    fourier_scale: float = bounded(1.0, gt=0)
    rope_base: float = bounded(10000.0, gt=0)
    norm_eps: float = bounded(1e-6, gt=0)

    def __post_init__(self):
        for name, width, heads in (("trunk", self.dim, self.heads), ("ddt", self.ddt_width, self.ddt_heads)):
            if width % heads or (width // heads) % 4:
                raise ValueError(f"{name} width {width} / heads {heads} must give a head_dim divisible by 4 (2-D RoPE)")
        if self.grid[0] % self.patch_size or self.grid[1] % self.patch_size:
            raise ValueError(f"grid {self.grid} is not divisible by patch_size {self.patch_size}")

    @property
    def tokens_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.patch_size, self.grid[1] // self.patch_size

    @property
    def latent_dim(self) -> int:
        return self.in_channels * self.grid[0] * self.grid[1]


# Presets (method §2.2; tiny from §7). Plain DiT = the same trunk without the head.
def DiTDH_tiny(**kw) -> DiTConfig: return DiTConfig(**{"dim": 128, "depth": 4, "heads": 4, "ddt_width": 256, "ddt_depth": 2, "ddt_heads": 4, **kw})
def DiTDH_S(**kw) -> DiTConfig: return DiTConfig(**{"dim": 384, "depth": 12, "heads": 6, "ddt_width": 2048, "ddt_depth": 2, "ddt_heads": 16, **kw})
def DiTDH_XL(**kw) -> DiTConfig: return DiTConfig(**{"dim": 1152, "depth": 28, "heads": 16, "ddt_width": 2048, "ddt_depth": 2, "ddt_heads": 16, **kw})
def DiT_tiny(**kw) -> DiTConfig: return DiTDH_tiny(**{"ddt_depth": 0, **kw})
def DiT_S(**kw) -> DiTConfig: return DiTDH_S(**{"ddt_depth": 0, **kw})
def DiT_XL(**kw) -> DiTConfig: return DiTDH_XL(**{"ddt_depth": 0, **kw})


DIT_PRESETS = {"DH-tiny": DiTDH_tiny, "DH-S": DiTDH_S, "DH-XL": DiTDH_XL,
               "tiny": DiT_tiny, "S": DiT_S, "XL": DiT_XL}


# --------------------------------------------------------------------------- embeddings
class FourierTimeEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): [sin, cos](2 pi t W), W ~ N(0, scale^2) frozen, then an MLP."""

    def __init__(self, dim: int, n_freqs: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(n_freqs) * scale)  # saved: part of the model
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t.float()[:, None] * self.freqs[None]  # (B, F/2)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, dim)  # row num_classes = null class

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


# --------------------------------------------------------------------------- blocks
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """AdaLN-Zero block; the conditioning c is (B, D) (global) or (B, N, D) (per token)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim), bias=True)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if c.ndim == 2:
            c = c[:, None]  # (B, 1, D) broadcasts over tokens
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.ndim == 2:
            c = c[:, None]
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------- model
class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        C, p, D = cfg.in_channels, cfg.patch_size, cfg.dim
        th, tw = cfg.tokens_grid
        self.t_embedder = FourierTimeEmbedder(D, cfg.fourier_freqs, cfg.fourier_scale)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout)
        self.trunk_embed = PatchEmbed(C, D, p)
        self.register_buffer("pos_embed", sincos_2d(D, th, tw)[None], persistent=False)  # (1, N, D), frozen
        self.register_buffer("rope_trunk", rope_2d(th, tw, D // cfg.heads, cfg.rope_base), persistent=False)
        self.trunk = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio, cfg.norm_eps) for _ in range(cfg.depth))
        out_dim = p * p * C
        if cfg.ddt_depth > 0:
            W = cfg.ddt_width
            self.s_proj = nn.Linear(D, W)
            self.ddt_embed = PatchEmbed(C, W, p)
            self.register_buffer("rope_ddt", rope_2d(th, tw, W // cfg.ddt_heads, cfg.rope_base), persistent=False)
            self.ddt = nn.ModuleList(DiTBlock(W, cfg.ddt_heads, cfg.mlp_ratio, cfg.norm_eps) for _ in range(cfg.ddt_depth))
            self.final = FinalLayer(W, out_dim, cfg.norm_eps)
        else:
            self.final = FinalLayer(D, out_dim, cfg.norm_eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for embed in [self.trunk_embed] + ([self.ddt_embed] if self.cfg.ddt_depth else []):
            nn.init.xavier_uniform_(embed.proj.weight.view(embed.proj.weight.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        blocks = list(self.trunk) + (list(self.ddt) if self.cfg.ddt_depth else [])
        for block in blocks:  # AdaLN-Zero: every residual branch starts closed
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        for layer in (self.final.ada, self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        C, p = self.cfg.in_channels, self.cfg.patch_size
        th, tw = self.cfg.tokens_grid
        x = x.view(x.shape[0], th, tw, p, p, C)  # (B, th, tw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], C, th * p, tw * p)  # (B, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noisy latent at time t (B,) in [0, 1] (1 = noise), labels y (B,) -> velocity (B, C, H, W)."""
        t_emb = self.t_embedder(t)  # (B, D)
        c = F.silu(t_emb + self.y_embedder(y))  # (B, D)
        s = self.trunk_embed(x) + self.pos_embed  # (B, N, D)
        for block in self.trunk:
            s = block(s, c, self.rope_trunk)
        if self.cfg.ddt_depth == 0:
            return self.unpatchify(self.final(s, c))
        s = self.s_proj(F.silu(t_emb[:, None] + s))  # (B, N, W) per-token conditioning of the head
        h = self.ddt_embed(x)  # (B, N, W)
        for block in self.ddt:
            h = block(h, s, self.rope_ddt)
        return self.unpatchify(self.final(h, s))  # (B, C, H, W)

    def num_params(self) -> int:
        """Trainable weights plus the frozen tables the official model counts as parameters."""
        return sum(p.numel() for p in self.parameters()) + self.frozen_params()

    def frozen_params(self) -> int:
        return self.pos_embed.numel() + self.t_embedder.freqs.numel()
