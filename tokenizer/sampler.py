"""Region-adaptive sampler (the VFMTok encoder) and the grid baseline used for its ablation.

RegionSampler (method §1.2): the 4 frozen-VFM feature levels are projected by 4 independent
MLPs; N learnable queries sit on a sqrt(N) x sqrt(N) anchor grid whose cell centres are the
reference points of a post-norm deformable transformer.  Each layer is
[deformable cross-attention -> self-attention among queries -> FFN], each followed by
residual + LayerNorm.  Self-attention is causal (lower triangular) for the discrete tokenizer,
so token k depends only on queries <= k (and all VFM features): the ids form a 1-D causal
sequence in raster order.  q, k and v are all projected from src + pos, as in the paper's code.

GridSampler (ablation "no region-adaptive sampling"): the same projected levels are averaged
and adaptive-average-pooled to the same sqrt(N) x sqrt(N) token grid, then go through the same
number of post-norm [self-attention -> FFN] layers (no cross-attention, since there is
nothing to sample).  Both return (B, N, d) in raster order of the anchor grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.decoder import Attention
from tokenizer.deform_attn import MSDeformAttn


def grid_side(num_queries: int) -> int:
    side = math.isqrt(num_queries)
    if side * side != num_queries:
        raise ValueError(f"num_queries {num_queries} must be a perfect square (anchor grid)")
    return side


class LevelProjector(nn.Module):
    """Linear(no bias) -> LN -> ReLU -> Linear(no bias) -> LN, then the extra LN of the paper."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(),
                                 nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, S, in_dim) -> (B, S, dim)


class SelfAttention(Attention):
    """The decoder's multi-head attention over the queries' src + pos (one qkv projection),
    without dropout or a key/value prefix; causal or not is fixed per sampler."""

    def __init__(self, dim: int, n_heads: int, causal: bool):
        super().__init__(dim, n_heads, attn_dropout=0.0)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, self.causal)[0]


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: cross (deformable) -> self -> FFN, each with residual + LayerNorm."""

    def __init__(self, dim: int, n_heads: int, n_levels: int, n_points: int, ffn_dim: int, causal: bool):
        super().__init__()
        self.cross = MSDeformAttn(dim, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, n_heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, src, pos, ref, value, shapes):
        src = self.norm1(src + self.cross(src + pos, ref, value, shapes))  # (B, N, d)
        src = self.norm2(src + self.self_attn(src + pos))
        return self.norm3(src + self.ffn(src))


class RegionSampler(nn.Module):
    """levels [(B, C_vfm, h, w)] * L -> tokens (B, N, d) on the anchor grid (raster order)."""

    def __init__(self, vfm_dim: int, dim: int, num_queries: int, depth: int, n_heads: int,
                 n_levels: int, n_points: int, ffn_dim: int, causal: bool):
        super().__init__()
        self.side = grid_side(num_queries)
        self.n_levels = n_levels
        self.projectors = nn.ModuleList([LevelProjector(vfm_dim, dim) for _ in range(n_levels)])
        # the paper's "carrier tokens": N(0,1) * d^-0.5, LayerNorm'ed before use (norm_pre1)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim ** -0.5)
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.norm_pre = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([DeformableEncoderLayer(dim, n_heads, n_levels, n_points, ffn_dim, causal)
                                     for _ in range(depth)])
        # query (i, j) has reference point ((j + .5) / side, (i + .5) / side), the same at every level
        centres = (torch.arange(self.side, dtype=torch.float32) + 0.5) / self.side
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        ref = torch.stack([xx, yy], -1).view(1, num_queries, 1, 2).repeat(1, 1, n_levels, 1)  # (1, N, L, 2)
        self.register_buffer("reference_points", ref, persistent=False)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        if len(levels) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} feature levels, got {len(levels)}")
        B = levels[0].shape[0]
        shapes = [tuple(f.shape[-2:]) for f in levels]
        value = torch.cat([proj(f.flatten(2).transpose(1, 2)) for proj, f in zip(self.projectors, levels)], 1)  # (B, L*h*w, d)
        src = self.norm_pre(self.queries).expand(B, -1, -1)  # (B, N, d)
        pos = self.query_pos.expand(B, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, self.reference_points, value, shapes)
        return src  # (B, N, d)


class GridEncoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_dim: int, causal: bool):
        super().__init__()
        self.self_attn = SelfAttention(dim, n_heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, src, pos):
        src = self.norm2(src + self.self_attn(src + pos))
        return self.norm3(src + self.ffn(src))


class GridSampler(nn.Module):
    """Ablation baseline: the VFM patch grid, projected and average-pooled to sqrt(N)^2 tokens."""

    def __init__(self, vfm_dim: int, dim: int, num_queries: int, depth: int, n_heads: int,
                 n_levels: int, ffn_dim: int, causal: bool):
        super().__init__()
        self.side = grid_side(num_queries)
        self.n_levels = n_levels
        self.projectors = nn.ModuleList([LevelProjector(vfm_dim, dim) for _ in range(n_levels)])
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.layers = nn.ModuleList([GridEncoderLayer(dim, n_heads, ffn_dim, causal) for _ in range(depth)])

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        B, _, h, w = levels[0].shape
        projected = [proj(f.flatten(2).transpose(1, 2)) for proj, f in zip(self.projectors, levels)]  # L x (B, h*w, d)
        grid = torch.stack(projected, 0).mean(0).transpose(1, 2).reshape(B, -1, h, w)  # (B, d, h, w)
        src = F.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)  # (B, N, d)
        pos = self.query_pos.expand(B, -1, -1)
        for layer in self.layers:
            src = layer(src, pos)
        return src
