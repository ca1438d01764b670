"""Building blocks shared by the generators (gpt.py, dit.py) and MAE's decoder: RMSNorm, SwiGLU,
2-D RoPE, sin-cos positions.

Both LlamaGen's GPT and RAE's DiT-DH rotate query/key pairs by 2-D positions with head_dim/4
frequencies per axis: the first half of the rotated pairs turns with the row index, the second
half with the column index (LlamaGen `precompute_freqs_cis_2d`, EVA `VisionRotaryEmbeddingFast`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """MAE's frozen 2-D sin-cos position table (h*w, dim): a quarter of the channels each for
    sin(row), cos(row), sin(col), cos(col); zero-padded when dim is not a multiple of 4."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return F.pad(torch.cat(parts, dim=1).float(), (0, dim - 4 * quarter))


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    """x / rms(x) (in fp32), times a learned gain unless `affine=False` (AdaLN supplies it).
    fp32 inputs take torch's fused kernel (one op instead of six: the decode step is dispatch-bound);
    lower precisions are normalised in fp32 and scaled in their own dtype, as LlamaGen does."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        y = x.float()
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y * self.weight if self.weight is not None else y


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), dropout on the output (LlamaGen `ffn_dropout`); biases only when
    asked (LlamaGen has none, RAE's DiT-DH has them)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_2d(h: int, w: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Rotation table for a raster-ordered h x w grid: (h*w, head_dim/2, 2) holding (cos, sin)."""
    assert head_dim % 4 == 0, "2-D RoPE needs head_dim divisible by 4"
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float64) * 2 / (head_dim // 2))  # (Dh/4,)
    rows = torch.outer(torch.arange(h, dtype=torch.float64), freqs)  # (h, Dh/4)
    cols = torch.outer(torch.arange(w, dtype=torch.float64), freqs)  # (w, Dh/4)
    angles = torch.cat([rows[:, None, :].expand(h, w, quarter),
                        cols[None, :, :].expand(h, w, quarter)], dim=-1).reshape(h * w, 2 * quarter)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (h*w, Dh/2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, H, T, Dh) by rope (T, Dh/2, 2); computed in fp32 as one complex
    product per pair, (x0 + i x1)(cos + i sin): the same products and sums as the real form."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, H, T, Dh/2)
    return torch.view_as_real(pairs * torch.view_as_complex(rope)).flatten(-2).type_as(x)
