"""Bottlenecks: cosine VQ (discrete VFMTok) and the continuous VFMAE bottleneck.

CosineVQ (method §1.2, LlamaGen-style): z and the codebook are l2-normalised and the nearest
code is the argmax of cosine similarity; straight-through gradient; loss = codebook term
||sg(z) - e||^2 + beta * ||z - sg(e)||^2 with beta 0.25; no EMA codebook, no entropy term.
Codebook init U(-1/n, 1/n), then normalised.  Usage is measured, as in the paper's code, over a
rolling buffer of recent indices (under DDP, every rank's indices of the global batch); perplexity (never computed by the official code) is
exp(entropy) of the code histogram in that buffer, so 1 <= perplexity <= min(n, filled slots).

ContinuousBottleneck (VFMAE §2.1): GroupNorm -> SiLU -> 1x1 conv to `latent_channels` on the
anchor grid; a plain deterministic AE (no KL, no noise).  `compute_latent_stats` gives the
per-(channel, position) mean and std (sqrt of the variance) used to normalise latents for diffusion.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from study.metrics.codebook import codebook_stats


class CosineVQ(nn.Module):
    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, usage_buffer: int = 65536):
        super().__init__()
        self.codebook_size, self.code_dim, self.beta = codebook_size, code_dim, beta
        self.codebook = nn.Embedding(codebook_size, code_dim)
        with torch.no_grad():
            self.codebook.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.codebook.weight.copy_(F.normalize(self.codebook.weight, dim=-1))
        # rolling buffer of the most recent indices seen in training (-1 = empty slot)
        self.register_buffer("recent", torch.full((usage_buffer,), -1, dtype=torch.long))
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)  # (n, c)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> normalised codes (..., c)."""
        return F.embedding(ids, self.codes())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z (B, N, c) -> (z_q straight-through (B, N, c), ids (B, N), losses).  The search runs in
        fp32 under any autocast: a bf16 `z @ codes.T` flips near-tied ids, so training would see
        other codes than `encode` exports."""
        with torch.autocast(z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            codes = self.codes().float()
            ids = (z @ codes.t()).argmax(-1)  # (B, N): max cosine = nearest neighbour on the sphere
        z_q = F.embedding(ids, codes)  # (B, N, c)
        losses = {"codebook": F.mse_loss(z_q, z.detach()),
                  "commit": self.beta * F.mse_loss(z, z_q.detach())}
        if self.training:
            self._record(ids)
        return z + (z_q - z).detach(), ids, losses

    @torch.no_grad()
    def _record(self, ids: torch.Tensor) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            # each rank holds an equal share of the global batch: record all of it, in rank order,
            # so that usage / perplexity describe the global batch and every rank's buffer is the same
            parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, ids.contiguous())
            ids = torch.cat(parts)
        flat = ids.flatten()[-self.recent.numel():]
        n, size = flat.numel(), self.recent.numel()
        pos = (self.cursor + torch.arange(n, device=flat.device)) % size
        self.recent[pos] = flat
        self.cursor.copy_((self.cursor + n) % size)

    @torch.no_grad()
    def usage_stats(self) -> dict[str, float]:
        """Fraction of codes used and perplexity over the rolling buffer."""
        seen = self.recent[self.recent >= 0]
        if seen.numel() == 0:
            return {"usage": 0.0, "perplexity": 0.0}
        stats = codebook_stats(seen, self.codebook_size)
        return {"usage": stats["usage"], "perplexity": stats["perplexity"]}


class ContinuousBottleneck(nn.Module):
    """tokens (B, N, d) on a sqrt(N) grid -> latent (B, C, sqrt(N), sqrt(N))."""

    def __init__(self, dim: int, latent_channels: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups, dim), nn.SiLU(), nn.Conv2d(dim, latent_channels, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, d = tokens.shape
        side = math.isqrt(N)
        grid = tokens.transpose(1, 2).reshape(B, d, side, side)  # (B, d, s, s), raster order of the anchors
        return self.net(grid)


@torch.no_grad()
def compute_latent_stats(model: nn.Module, loader: Iterable, max_batches: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(channel, position) mean and std (C, h, w) of `model.encode` latents over `loader`
    (finite or infinite; at most `max_batches`).  Accumulated in float64 (Welford-free sums)."""
    total, sq, count = None, None, 0
    device = next(model.parameters()).device
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        z = model.encode(images.to(device)).double()  # (B, C, h, w)
        total = z.sum(0) if total is None else total + z.sum(0)
        sq = (z * z).sum(0) if sq is None else sq + (z * z).sum(0)
        count += z.shape[0]
    if count == 0:
        raise ValueError("compute_latent_stats: the loader yielded no batches")
    mean = total / count
    var = (sq / count - mean * mean).clamp_min(0)
    return mean.float().cpu(), var.sqrt().float().cpu()
