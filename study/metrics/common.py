"""Shared helpers of the metrics package: image layout/range conversion, content hashing,
the cache directory, and `MissingWeightsError`.

Image conventions accepted by every metric entry point:
- uint8 arrays/tensors, (N, H, W, 3) (dataset layout) or (N, 3, H, W);
- float tensors/arrays in [-1, 1], (N, 3, H, W) (model layout) or (N, H, W, 3).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a metric or a VFM needs are not on this machine (nothing is ever
    downloaded).  The message names the file, where to put it and where an online machine can
    get it.  The one class for the whole project (tokenizer.vfm re-exports it)."""


def _is_channels_last(shape) -> bool:
    return len(shape) == 4 and shape[-1] == 3 and shape[1] != 3


def _nchw(images) -> torch.Tensor:
    """Any accepted image batch -> a CPU tensor (N, 3, H, W) of its own dtype."""
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images.detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    if _is_channels_last(x.shape):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 channels, got shape {tuple(x.shape)}")
    return x


def to_uint8_nchw(images) -> torch.Tensor:
    """Any accepted image batch -> uint8 tensor (N, 3, H, W) on CPU.
    Floats are read as [-1, 1] and rounded to the nearest level, as a PNG writer would."""
    x = _nchw(images)
    if x.dtype == torch.uint8:
        return x.contiguous()
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()


def to_float_nchw(images) -> torch.Tensor:
    """Any accepted image batch -> float32 tensor (N, 3, H, W) in [-1, 1] on CPU."""
    x = _nchw(images)
    if x.dtype == torch.uint8:
        return (x.float() / 127.5 - 1.0).contiguous()
    return x.float().contiguous()


def to_unit_range(images) -> torch.Tensor:
    """Any accepted image batch -> float64 tensor (N, 3, H, W) in [0, 1] (uint8 / 255 exactly).
    Float tensors stay on their device (a training step measures PSNR without a host copy)."""
    x = images if torch.is_tensor(images) else np.asarray(images)
    if x.dtype in (np.uint8, torch.uint8):
        return to_uint8_nchw(x).double() / 255.0
    x = torch.as_tensor(x).detach().double()
    if _is_channels_last(x.shape):
        x = x.permute(0, 3, 1, 2)
    return _unit_from_signed(x)


def _unit_from_signed(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a batch of images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def content_hash(*parts, length: int = 16) -> str:
    """sha256 over arrays (dtype, shape and bytes) and strings: a cache key for data + extractor."""
    h = hashlib.sha256()
    for part in parts:
        if torch.is_tensor(part):
            part = part.detach().cpu().numpy()
        if isinstance(part, np.ndarray):
            arr = np.ascontiguousarray(part)
            h.update(f"{arr.dtype}{arr.shape}".encode())
            h.update(arr.data if arr.size else b"")
        else:
            h.update(str(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def as_features(x) -> np.ndarray:
    """(N, D) float64 numpy from a tensor or array (higher-rank inputs are flattened per row)."""
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(len(x), -1)
