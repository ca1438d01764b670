"""Codebook and latent statistics (arrays in, numbers out).

- usage: fraction of the K codes that occur at least once;
- perplexity: exp(entropy) of the code histogram, in [1, K] (K for uniform use, 1 for one code);
- entropy_bits: entropy of the histogram in bits (log2 perplexity), at most log2 K;
- latent statistics: per-channel and global mean/std of continuous latents (N, C, ...).
"""

from __future__ import annotations

import numpy as np
import torch


def code_histogram(indices, num_codes: int) -> np.ndarray:
    idx = indices.detach().cpu().numpy() if torch.is_tensor(indices) else np.asarray(indices)
    idx = idx.reshape(-1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_codes):
        raise ValueError(f"code indices must lie in [0, {num_codes}), got [{idx.min()}, {idx.max()}]")
    return np.bincount(idx, minlength=num_codes).astype(np.float64)


def codebook_stats(indices, num_codes: int) -> dict[str, float]:
    """{"usage", "perplexity", "entropy_bits", "codes_used"} of token indices (any shape)."""
    counts = code_histogram(indices, num_codes)
    total = counts.sum()
    if total == 0:
        raise ValueError("no indices given")
    p = counts[counts > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    return {"usage": float((counts > 0).mean()), "codes_used": float((counts > 0).sum()),
            "perplexity": float(np.exp(entropy)), "entropy_bits": entropy / np.log(2)}


def latent_stats(latents) -> dict[str, object]:
    """Continuous latents (N, C, ...) -> {"mean", "std" (global floats), "channel_mean",
    "channel_std" (lists of C floats), "abs_max"}."""
    z = latents.detach().cpu().double() if torch.is_tensor(latents) else torch.as_tensor(np.asarray(latents)).double()
    if z.ndim < 2:
        raise ValueError(f"latents must be (N, C, ...), got shape {tuple(z.shape)}")
    per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
    return {"mean": float(z.mean()), "std": float(z.std()), "abs_max": float(z.abs().max()),
            "channel_mean": per_channel.mean(1).tolist(), "channel_std": per_channel.std(1).tolist()}
