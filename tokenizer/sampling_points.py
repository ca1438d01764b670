"""Where the queries look: each query's deformable sampling points for a batch of images.

The region-adaptive sampler's cross-attention layers are observed while the encoder runs on
the images, so the points are the ones the forward pass samples (same inputs, same
`MSDeformAttn.sampling`).  All VFM levels cover the whole image, so a location (x, y) in [0, 1]
of a level is the same fraction of the image: the points can be drawn over the image directly.

    points = sampling_points(model, images)                    # model: VFMTokenizer, sampler "region"
    np.savez_compressed("sampling_points.npz", images=uint8_images, **points)   # for the figure
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tokenizer.sampler import RegionSampler


@torch.no_grad()
def sampling_points(model: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """images (B, 3, H, W) in [-1, 1] -> float32 arrays
    locations (B, layers, Q, heads, levels, points, 2) as (x, y) in [0, 1] of the image,
    weights   (B, layers, Q, heads, levels, points), summing to 1 over (levels, points) per head,
    reference (Q, 2), each query's reference point (its anchor-grid cell centre)."""
    sampler = model.sampler
    if not isinstance(sampler, RegionSampler):
        raise ValueError(f"{type(sampler).__name__} has no sampling points: only the region-adaptive sampler "
                         f"samples (use a model with sampler: region)")
    captured = []

    def record(attn, args, _output):
        query, reference, _value, shapes = args
        captured.append(attn.sampling(query, reference, shapes))

    hooks = [layer.cross.register_forward_hook(record) for layer in sampler.layers]
    try:
        levels, _ = model.vfm_features(images)
        model.tokens(levels)
    finally:
        for hook in hooks:
            hook.remove()
    locations = torch.stack([loc for loc, _ in captured], 1)  # (B, layers, Q, H, L, P, 2)
    weights = torch.stack([w for _, w in captured], 1)  # (B, layers, Q, H, L, P)
    reference = sampler.reference_points[0, :, 0]  # (Q, 2), the same at every level
    return {"locations": locations.float().cpu().numpy(), "weights": weights.float().cpu().numpy(),
            "reference": reference.float().cpu().numpy()}
