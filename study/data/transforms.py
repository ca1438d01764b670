"""ADM-style crops (guided-diffusion's center/random crop, which the VFMTok recipe trains and
evaluates with) and the uint8 <-> [-1, 1] tensor conversions.  All randomness comes from an explicit
`np.random.Generator`, so an augmented sample is a pure function of its seed."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def _resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """Resize so the shorter side is `short`: box-halve first while the image is >= 2x too
    big (cheap and alias-free), then one bicubic resize for the remainder."""
    while min(image.size) >= 2 * short:
        image = image.reduce(2)
    scale = short / min(image.size)
    size = tuple(max(short, round(side * scale)) for side in image.size)
    return image.resize(size, resample=Image.BICUBIC)


def _crop(arr: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return arr[top:top + size, left:left + size]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Short side resized to `image_size`, then the central square: uint8 (S, S, 3)."""
    arr = np.asarray(_resize_short_side(pil_image.convert("RGB"), image_size))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return _crop(arr, top, left, image_size)


def random_crop_arr(pil_image: Image.Image, image_size: int, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0, *, rng: np.random.Generator) -> np.ndarray:
    """Short side resized to a random length in [size/max_frac, size/min_frac], then a random
    `image_size` square: the crop covers min_frac..max_frac of the short side."""
    shortest = math.ceil(image_size / max_crop_frac)
    longest = math.ceil(image_size / min_crop_frac)
    short = int(rng.integers(shortest, longest + 1))
    arr = np.asarray(_resize_short_side(pil_image.convert("RGB"), short))
    top = int(rng.integers(0, arr.shape[0] - image_size + 1))
    left = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return _crop(arr, top, left, image_size)


def random_flip(arr: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirror an (H, W, C) image left-right with probability p."""
    return arr[:, ::-1] if rng.random() < p else arr


def adm_augment(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training augmentation of a stored uint8 (S, S, 3) image: random resize-crop back to S,
    then a horizontal flip with p = 0.5."""
    cropped = random_crop_arr(Image.fromarray(arr), arr.shape[0], rng=rng)
    return np.ascontiguousarray(random_flip(cropped, rng))


def to_tensor_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) or (H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {tensor.dtype}")
    if tensor.ndim == 3:
        tensor = tensor[None]
    return tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3); values outside are clipped."""
    scaled = ((images.detach().float().cpu() + 1.0) * 127.5).round_().clamp_(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
