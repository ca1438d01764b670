"""LlamaGen-style class-conditional GPT over a grid of discrete image tokens.

Sequence: [class token] + h*w image tokens in raster order; position p >= 1 holds token p-1 and
predicts token p.  Pre-norm RMSNorm (eps 1e-5), SwiGLU, no biases, 2-D RoPE (head_dim/4
frequencies per axis), std-0.02 init with a zero-initialised output head, label dropout 0.1
into a null class (= num_classes) for classifier-free guidance, and LlamaGen's dropouts.

LlamaGen quirk kept behind `zero_cls_rope`: the class token's rotary entry is (cos, sin) = 0,
which zeroes its query and key; class information reaches the image tokens only through its
value vector and the residual stream.  With the flag off the class token is left unrotated.

Inference uses an explicit, preallocated per-layer KV cache (gpt-fast style); see sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from study.config import bounded

from generators.layers import RMSNorm, SwiGLU, apply_rope, find_multiple, rope_2d


@dataclass
class GPTConfig:
    vocab_size: int = bounded(512, ge=2)
    grid: tuple[int, int] = bounded((8, 8), ge=1)  # token grid (h, w); a 1-D sequence of length L is (1, L)
    num_classes: int = bounded(10, ge=1)
    dim: int = bounded(128, ge=1)
    depth: int = bounded(4, ge=1)
    heads: int = bounded(4, ge=1)
    ffn_hidden: Optional[int] = bounded(None, ge=1)  # None: find_multiple(int(8 * dim / 3), ffn_multiple_of)
    ffn_multiple_of: int = bounded(8, ge=1)  # LlamaGen uses 256; 8 keeps tiny models tiny
    norm_eps: float = bounded(1e-5, gt=0)
    rope_base: float = bounded(10000.0, gt=0)
    token_dropout: float = bounded(0.1, ge=0, lt=1)
    resid_dropout: float = bounded(0.1, ge=0, lt=1)
    ffn_dropout: float = bounded(0.1, ge=0, lt=1)
    attn_dropout: float = bounded(0.0, ge=0, lt=1)
    class_dropout: float = bounded(0.1, ge=0, lt=1)
    zero_cls_rope: bool = True
    init_std: float = bounded(0.02, gt=0)

    def __post_init__(self):
        if self.dim % self.heads or (self.dim // self.heads) % 4:
            raise ValueError(f"dim {self.dim} / heads {self.heads} must give a head_dim divisible by 4 (2-D RoPE)")

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or find_multiple(int(8 * self.dim / 3), self.ffn_multiple_of)


# Presets (method §3 table; SwiGLU hidden rounded to 256 as in LlamaGen, tiny rounds to 8).
def GPT_tiny(**kw) -> GPTConfig: return GPTConfig(**{"dim": 128, "depth": 4, "heads": 4, **kw})
def GPT_B(**kw) -> GPTConfig: return GPTConfig(**{"dim": 768, "depth": 12, "heads": 12, "ffn_multiple_of": 256, **kw})
def GPT_L(**kw) -> GPTConfig: return GPTConfig(**{"dim": 1024, "depth": 24, "heads": 16, "ffn_multiple_of": 256, **kw})
def GPT_XL(**kw) -> GPTConfig: return GPTConfig(**{"dim": 1280, "depth": 36, "heads": 20, "ffn_multiple_of": 256, **kw})
def GPT_XXL(**kw) -> GPTConfig: return GPTConfig(**{"dim": 1536, "depth": 48, "heads": 24, "ffn_multiple_of": 256, **kw})


GPT_PRESETS = {"tiny": GPT_tiny, "B": GPT_B, "L": GPT_L, "XL": GPT_XL, "XXL": GPT_XXL}


# --------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Static per-layer cache (B, H, S, Dh); `update` writes positions and returns the whole cache.
    Unwritten positions are hidden by the causal mask, so they never need clearing."""

    def __init__(self, batch: int, heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


# --------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads, self.head_dim, self.attn_dropout = cfg.heads, cfg.head_dim, cfg.attn_dropout
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_drop = nn.Dropout(cfg.resid_dropout)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, rope, mask=None, input_pos=None, kv_len=None):
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        (q, k), v = apply_rope(qkv[:2], rope), qkv[2]  # q and k rotated in one pass
        if input_pos is None:  # full sequence, causal
            drop = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, H, S, Dh)
            if kv_len is not None:  # one new query: it sees exactly the kv_len filled slots, no mask
                k, v, mask = k[:, :, :kv_len], v[:, :, :kv_len], None
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.resid_drop(self.wo(y))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.hidden, cfg.ffn_dropout)

    def forward(self, x, rope, mask=None, input_pos=None, kv_len=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, input_pos, kv_len)
        return x + self.ffn(self.ffn_norm(x))


# --------------------------------------------------------------------------- model
class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # row num_classes = null class
        self.tok_drop = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

        grid_rope = rope_2d(*cfg.grid, cfg.head_dim, cfg.rope_base)  # (L, Dh/2, 2)
        cls_rope = torch.zeros(1, cfg.head_dim // 2, 2)
        if not cfg.zero_cls_rope:
            cls_rope[..., 0] = 1.0  # identity rotation
        self.register_buffer("rope", torch.cat([cls_rope, grid_rope]), persistent=False)  # (1+L, Dh/2, 2)
        S = cfg.seq_len + 1
        self.register_buffer("causal_mask", torch.ones(S, S, dtype=torch.bool).tril(), persistent=False)
        self.apply(self._init_weights)
        nn.init.zeros_(self.head.weight)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def embed_class(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels -> (B, 1, D); in training a `class_dropout` fraction becomes the null class."""
        if self.training and self.cfg.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.cls_emb(labels)[:, None]

    def forward(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Full (cache-free) pass. prefix (B, T) tokens, 0 <= T < L -> logits (B, T+1, V); output i
        predicts token i. Training passes tokens[:, :-1] and takes cross-entropy against tokens."""
        return self.forward_embeddings(self.embed(prefix, labels))

    def embed(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """prefix (B, T) tokens, labels (B,) -> embedded sequence (B, T+1, D), class token first."""
        return torch.cat([self.embed_class(labels), self.tok_emb(prefix)], dim=1)

    def forward_embeddings(self, h: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h (B, T, D) at sequence positions input_pos (T,) (None: 0..T-1, no cache) -> logits (B, T, V) fp32."""
        return self.logits(self.hidden_states(h, input_pos))

    def hidden_states(self, h: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                      kv_len: Optional[int] = None) -> torch.Tensor:
        """h (B, T, D) -> final normed hidden states (B, T, D), the input of the linear head.
        kv_len: cached decoding of one token at position kv_len - 1, attending to the filled
        cache prefix only (input_pos alone masks the whole static cache, for fixed shapes)."""
        T = h.shape[1]
        h = self.tok_drop(h)
        if input_pos is None:
            rope, mask = self.rope[:T], None
        elif kv_len is None:
            rope, mask = self.rope[input_pos], self.causal_mask[None, None, input_pos]  # (T, Dh/2, 2), (1, 1, T, S)
        else:
            rope, mask = self.rope[kv_len - 1:kv_len], None
        for block in self.blocks:
            h = block(h, rope, mask, input_pos, kv_len)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Bias-free linear head, fp32 logits; being linear, guidance may be applied before it."""
        return self.head(hidden).float()

    # ---------------------------------------------------------------- KV cache management
    def setup_caches(self, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, self.cfg.heads, self.cfg.seq_len + 1, self.cfg.head_dim, dtype, device)

    def clear_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
