"""Image grids saved as PNG (PIL): reconstructions (originals row over reconstructions row)
and samples per class (one row per class). Each returns the written path.

Layout: cells of the images' size separated and framed by `pad` pixels of `pad_value`, so a
grid of R rows and C columns of H×W images is (R·H + (R+1)·pad) × (C·W + (C+1)·pad).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from study.metrics.common import to_uint8_nchw


def make_grid(rows: list, pad: int = 2, pad_value: int = 255, cols: int | None = None) -> np.ndarray:
    """rows: list of image batches (each any accepted layout, all H×W) -> uint8 (H', W', 3).
    `cols` columns (default: the longest row); shorter rows are left blank at the end."""
    batches = [to_uint8_nchw(r).permute(0, 2, 3, 1).numpy() for r in rows]
    if not batches:
        raise ValueError("no rows")
    h, w = batches[0].shape[1:3]
    cols = cols or max(len(b) for b in batches)
    grid = np.full((len(batches) * h + (len(batches) + 1) * pad, cols * w + (cols + 1) * pad, 3), pad_value,
                   np.uint8)
    for r, batch in enumerate(batches):
        if batch.shape[1:3] != (h, w):
            raise ValueError(f"row {r} has images of {batch.shape[1:3]}, expected {(h, w)}")
        for c, img in enumerate(batch[:cols]):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = img
    return grid


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)
    return path


def reconstruction_grid(originals, reconstructions, path: str | Path, *, n: int = 8, pad: int = 2,
                        scale: int = 1) -> Path:
    """Two rows: the first `n` originals above their reconstructions."""
    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals vs {len(reconstructions)} reconstructions")
    return save_png(make_grid([originals[:n], reconstructions[:n]], pad), path, scale)


def class_grid(images, labels, path: str | Path, *, num_classes: int | None = None, per_class: int = 8,
               pad: int = 2, scale: int = 1) -> Path:
    """One row per class (0..num_classes-1) with up to `per_class` of its images."""
    labels = np.asarray(labels)
    num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
    x = to_uint8_nchw(images)
    rows = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        rows.append(x[idx] if len(idx) else x[:0])
    if all(len(r) == 0 for r in rows):
        raise ValueError("no images for any class")
    return save_png(make_grid(rows, pad, cols=per_class), path, scale)
