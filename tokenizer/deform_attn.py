"""Multi-scale deformable attention (Deformable-DETR's MSDeformAttn) in pure PyTorch.

The official VFMTok code runs the compiled CUDA op; its pure-PyTorch `grid_sample` twin
(`ms_deform_attn_core_pytorch`) only exists for a test.  Here the `grid_sample` path *is* the
implementation, so it runs on CPU and on any GPU without a build step:

    grid = 2 * loc - 1, bilinear, zeros padding, align_corners=False, one call per level,
    then a softmax-weighted sum over (level, point) per head.

Parametrisation and init follow the paper's code (method §1.2): offsets from a zero-weight
Linear whose bias puts head h's points on direction 2*pi*h/H at distances 1..P (in feature
pixels, since offsets are divided by each level's (W, H)); attention weights from a zero-init
Linear (so the initial softmax is uniform); xavier value/output projections.
With 8 heads this is the paper's "8 compass directions x point index"; with fewer heads
(tiny presets use 4) the same rule gives H evenly spaced directions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The sampling core.

    value: (B, S, H, D) with S = sum(h*w) over levels, levels flattened row-major
    sampling_locations: (B, Q, H, L, P, 2) as (x, y) in [0, 1] of each level
    attention_weights: (B, Q, H, L, P), already normalised
    returns (B, Q, H*D)
    """
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] convention
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, h, w)  # (B*H, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*H, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # (B*H, D, Q, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*H, D, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)  # (B*H, 1, Q, L*P)
    out = (stacked * weights).sum(-1)  # (B*H, D, Q)
    return out.view(B, H * D, Q).transpose(1, 2).contiguous()  # (B, Q, H*D)


class MSDeformAttn(nn.Module):
    """Deformable cross-attention from queries to a flattened multi-level feature set."""

    def __init__(self, dim: int, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} must be divisible by n_heads {n_heads}")
        self.dim, self.n_levels, self.n_heads, self.n_points = dim, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(initial_offsets(self.n_heads, self.n_levels, self.n_points).flatten())
        # zero weights and bias: every (level, point) starts with the same attention weight
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                spatial_shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, C); reference_points (B or 1, Q, L, 2) as (x, y) in [0, 1];
        value_in (B, S, C) with S = sum(h*w); spatial_shapes [(h, w)] * L. Returns (B, Q, C)."""
        B = query.shape[0]
        H = self.n_heads
        value = self.value_proj(value_in).view(B, value_in.shape[1], H, self.dim // H)  # (B, S, H, D)
        loc, weights = self.sampling(query, reference_points, spatial_shapes)
        out = ms_deform_attn_core(value, spatial_shapes, loc, weights)  # (B, Q, C)
        return self.output_proj(out)

    def sampling(self, query: torch.Tensor, reference_points: torch.Tensor,
                 spatial_shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each query looks: locations (B, Q, H, L, P, 2) as (x, y) in [0, 1] of each level,
        and their attention weights (B, Q, H, L, P), summing to 1 over (L, P) per head."""
        B, Q, _ = query.shape
        H, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        # offsets are in feature pixels of each level: divide by that level's (W, H)
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)  # (L, 2)
        loc = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]  # (B, Q, H, L, P, 2)
        return loc, weights


def initial_offsets(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """(H, L, P, 2) offset bias: head h points along angle 2*pi*h/H, scaled so the larger of
    |cos|, |sin| is 1 (a compass direction on the pixel grid), times point index 1..P."""
    thetas = torch.arange(n_heads, dtype=torch.float64) * (2.0 * math.pi / n_heads)
    dirs = torch.stack([thetas.cos(), thetas.sin()], -1)  # (H, 2)
    dirs = dirs / dirs.abs().max(-1, keepdim=True).values
    grid = dirs.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
    grid = grid * torch.arange(1, n_points + 1, dtype=torch.float64).view(1, 1, n_points, 1)
    return grid.float()
