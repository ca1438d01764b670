"""Decoder: a ViT over [token memory | CLS | mask grid | registers], a VQGAN-style CNN
upsampler, and the semantic branch that predicts the frozen VFM's final features (method §1.3, §2.1).

ViT: pre-LayerNorm blocks, SwiGLU FFN with biases (hidden = 8d/3 rounded up to a multiple of 8),
attention dropout (0.1 in the paper) through SDPA, a causal mask over the *whole* sequence for the
discrete tokenizer (bidirectional for VFMAE), and no final norm after the last block.  Memory = post-quant tokens + a learnable slot
position table, LayerNorm'ed (norm_post1); pixel queries = CLS + pos[0], one learnable mask
token repeated over the pixel grid + the VFM-grid position table bicubic-interpolated to the
pixel grid (scaled by (grid + 0.1) / VFM grid, as the official code does), and learnable registers (zero init), LayerNorm'ed with the same norm_post1.
Outputs at the mask positions form a (B, d, ph, pw) map that the CNN upsamples to pixels.

Semantic branch ("semantic reconstruction"):
- shared (discrete): the same transformer and memory, queries [CLS, mask_dino x VFM grid with
  the native position table, registers] normed by norm_post2; mask outputs -> Linear(d -> VFM width).
  Training runs the causal memory prefix once and continues it with both query sets (exact);
- separate (continuous): a 1-layer bidirectional transformer over [memory, CLS, mask_dino x VFM grid];
  all 1 + h*w outputs -> Linear(d -> VFM width) (target includes the VFM's CLS);
- none: the semantic objective is off (the paper's ablation); no parameters are created for it.

Known quirk kept on purpose: in the causal decoder the registers come last, so no other position
attends to them and they receive no gradient (as in the official code).  `unused_anchor()`
returns a zero-valued term touching them so DDP does not see unused parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from generators.layers import SwiGLU


KV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values, each (B, H, T, Dh)


def swiglu_hidden(dim: int) -> int:
    hidden = int(2 * 4 * dim / 3)
    return ((hidden + 7) // 8) * 8  # 512 -> 1368, 128 -> 344


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)

    def forward(self, x: torch.Tensor, causal: bool, prefix: KV | None = None) -> tuple[torch.Tensor, KV]:
        """Self-attention of x, after a `prefix` (keys, values) when given; also returns x's (k, v)."""
        B, N, C = x.shape
        q, k, v = self.heads(x)
        keys, values, mask = k, v, None
        if prefix is not None:
            keys, values = torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2)
            if causal:  # query i sees the whole prefix and x[:i+1]
                mask = torch.ones(N, keys.shape[2], dtype=torch.bool, device=x.device).tril(keys.shape[2] - N)
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=p,
                                             is_causal=causal and prefix is None)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads, attn_dropout)
        self.ffn = SwiGLU(dim, swiglu_hidden(dim), bias=True)

    def forward(self, x: torch.Tensor, causal: bool, prefix: KV | None = None) -> tuple[torch.Tensor, KV]:
        h, kv = self.attn(self.norm1(x), causal, prefix)
        x = x + h
        return x + self.ffn(self.norm2(x)), kv


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, n_heads: int, attn_dropout: float, causal: bool):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList([Block(dim, n_heads, attn_dropout) for _ in range(depth)])

    def forward(self, x: torch.Tensor, prefix: list[KV] | None = None) -> torch.Tensor:
        """(B, T, d) -> (B, T, d); with `prefix` (from `prefix_cache`), x is read as the continuation
        of the sequence the cache was made from."""
        for i, block in enumerate(self.blocks):
            x, _ = block(x, self.causal, None if prefix is None else prefix[i])
        return x

    def prefix_cache(self, x: torch.Tensor) -> list[KV]:
        """Each layer's (keys, values) of x as the start of a causal sequence.  Its outputs are not
        needed, so the last layer stops at its keys and values."""
        if not self.causal:
            raise RuntimeError("a prefix cache is exact only for a causal transformer")
        cache = []
        for block in self.blocks[:-1]:
            x, kv = block(x, causal=True)
            cache.append(kv)
        _, k, v = self.blocks[-1].attn.heads(self.blocks[-1].norm1(x))
        return cache + [(k, v)]


# --------------------------------------------------------------------------- CNN upsampler
class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (VQGAN mid block)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, -1)  # 3 x (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(1, 2).reshape(B, C, H, W))


class CNNUpsampler(nn.Module):
    """(B, z, h, w) -> (B, 3, h * 2^(len(ch_mult)-1), ...): stages read ch_mult in reverse,
    `num_res_blocks + 1` ResBlocks each, nearest x2 + 3x3 conv after all but the last stage."""

    def __init__(self, z_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, groups: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(block_in, block_in, groups), AttnBlock(block_in, groups),
                                 ResBlock(block_in, block_in, groups))
        stages = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            layers = []
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(block_in, block_out, groups))
                block_in = block_out
            if i != 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(block_in, block_in, 3, padding=1)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm_out = nn.GroupNorm(groups, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- ViT decoder
class ViTDecoder(nn.Module):
    def __init__(self, *, dim: int, depth: int, n_heads: int, attn_dropout: float, causal: bool,
                 num_tokens: int, n_registers: int, vfm_grid: tuple[int, int], pixel_grid: tuple[int, int],
                 semantic: str, vfm_width: int, cnn: CNNUpsampler):
        super().__init__()
        self.vfm_grid, self.pixel_grid, self.semantic = tuple(vfm_grid), tuple(pixel_grid), semantic
        self.transformer = Transformer(dim, depth, n_heads, attn_dropout, causal)
        self.slot_pos = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1 + vfm_grid[0] * vfm_grid[1], dim) * 0.02)  # [CLS | VFM grid]
        self.cls = nn.Parameter(torch.randn(dim) * 0.02)
        self.mask = nn.Parameter(torch.randn(dim) * 0.02)
        self.registers = nn.Parameter(torch.zeros(n_registers, dim))
        self.norm_post1 = nn.LayerNorm(dim)
        self.cnn = cnn
        if semantic == "shared" and not causal:
            raise ValueError("the shared semantic branch continues the causal decoder's memory prefix; "
                             "a bidirectional decoder takes semantic='separate'")
        if semantic == "shared":
            self.mask_dino = nn.Parameter(torch.randn(dim) * 0.02)
            self.norm_post2 = nn.LayerNorm(dim)
        elif semantic == "separate":
            self.mask_dino = nn.Parameter(torch.randn(dim) * 0.02)
            self.norm_post2 = nn.LayerNorm(dim)
            self.semantic_transformer = Transformer(dim, 1, n_heads, attn_dropout, causal=False)
        if semantic != "none":
            self.semantic_head = nn.Linear(dim, vfm_width)

    def grid_pos(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table at the VFM grid, bicubic-interpolated to `grid` when it differs: (h*w, d).
        Interpolated by the scale factor (grid + 0.1) / VFM grid, not by the output size: the two
        place the source samples differently, and the official code uses the factor (the 0.1
        keeps the floored output size at `grid`)."""
        gh, gw = self.vfm_grid
        table = self.pos[1:]
        if tuple(grid) == (gh, gw):
            return table
        table = table.t().reshape(1, -1, gh, gw)
        scale = ((grid[0] + 0.1) / gh, (grid[1] + 0.1) / gw)
        out = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(out.shape[-2:]) != tuple(grid):
            raise ValueError(f"position table {gh}x{gw} scaled by {scale} gives {tuple(out.shape[-2:])}, not {grid}")
        return out.flatten(2)[0].t()

    def memory(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm_post1(tokens + self.slot_pos)  # (B, N, d)

    def pixel_queries(self) -> torch.Tensor:
        """[CLS | mask x pixel grid | registers], normed: (1 + P + R, d)."""
        return self.norm_post1(torch.cat([(self.cls + self.pos[0])[None], self.mask + self.grid_pos(self.pixel_grid),
                                          self.registers], 0))

    def semantic_queries(self) -> torch.Tensor:
        """[CLS | mask_dino x VFM grid (| registers when shared)], normed: (1 + G (+ R), d)."""
        parts = [(self.cls + self.pos[0])[None], self.mask_dino + self.pos[1:]]
        if self.semantic == "shared":
            parts.append(self.registers)
        return self.norm_post2(torch.cat(parts, 0))

    def sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """[memory (N) | CLS | mask x pixel grid | registers] -> transformer outputs (B, T, d)."""
        queries = self.pixel_queries().expand(tokens.shape[0], -1, -1)
        return self.transformer(torch.cat([self.memory(tokens), queries], 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, d) -> images (B, 3, H, W)."""
        N = tokens.shape[1]
        return self.pixels(self.sequence(tokens)[:, N + 1:])

    def pixels(self, outputs: torch.Tensor) -> torch.Tensor:
        """Transformer outputs from the first mask position on -> images (the CNN upsampler)."""
        (ph, pw), (B, _, d) = self.pixel_grid, outputs.shape
        return self.cnn(outputs[:, :ph * pw].transpose(1, 2).reshape(B, d, ph, pw))

    def forward_train(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images and the semantic prediction ((B, h*w, C_vfm) shared, (B, 1 + h*w, C_vfm) separate,
        None when off).

        Shared: the pixel and the semantic query sets continue the same causal memory prefix, so
        the memory's keys/values are computed once and both continue from them; the result equals
        two full passes over [memory | queries] (tested), at 2/3 (1 layer) to 3/4 (2 layers) of their cost in tiny."""
        B, N, _ = tokens.shape
        if self.semantic != "shared":
            semantic = None
            if self.semantic == "separate":
                seq = torch.cat([self.memory(tokens), self.semantic_queries().expand(B, -1, -1)], 1)
                semantic = self.semantic_head(self.semantic_transformer(seq)[:, N:])  # (B, 1 + G, C)
            return self(tokens), semantic
        cache = self.transformer.prefix_cache(self.memory(tokens))
        pixel_out = self.transformer(self.pixel_queries().expand(B, -1, -1), prefix=cache)
        semantic_out = self.transformer(self.semantic_queries().expand(B, -1, -1), prefix=cache)
        G = self.vfm_grid[0] * self.vfm_grid[1]
        return self.pixels(pixel_out[:, 1:]), self.semantic_head(semantic_out[:, 1:1 + G])

    def unused_anchor(self) -> torch.Tensor:
        """0 * (parameters that get no gradient in the causal decoder), for DDP."""
        return self.registers.sum() * 0.0
