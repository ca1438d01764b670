"""ImageFolder (ImageNet layout, root/{train,val}/CLASS/*.JPEG) streamed from disk.

Only the file list lives in memory, as one fixed-width byte array of paths relative to the
split folder: it is shared by DataLoader workers without copy-on-read growth (a Python list of
strings is not, because reading an object touches its reference count).  Each file is decoded
when a batch needs it, and the ADM transform is applied to the full decoded image: the centre
crop for evaluation, random resize-crop + flip for augmented training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from PIL import Image

from study.data.transforms import center_crop_arr, random_crop_arr, random_flip

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
# what PIL raises on a truncated, corrupt or non-image file
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImageError(RuntimeError):
    def __init__(self, path: str, reason: object):
        super().__init__(f"{path}: unreadable image ({reason}); replace or delete the file, or set "
                         "data.on_unreadable: skip to replace it by the next image and count it")
        self.path = path


def read_rgb(path: str) -> Image.Image:
    """The fully decoded RGB image (grey and CMYK JPEGs converted), or UnreadableImageError."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the decode, so truncation shows here
    except DECODE_ERRORS as err:
        raise UnreadableImageError(path, err) from err


def list_images(folder: Path) -> list[str]:
    """Image file names directly in `folder`, sorted."""
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES)


class CenterCrops:
    """Reads like a uint8 (N, S, S, 3) array of centre crops; indexing decodes only the files
    it returns, so `dataset.images[:n]` costs n decodes whatever N is."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, dataset: "ImageFolderDataset"):
        self.dataset = dataset

    @property
    def shape(self) -> tuple[int, int, int, int]:
        size = self.dataset.resolution
        return len(self.dataset), size, size, 3

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.dataset.load(int(index))
        rows = np.arange(len(self))[index]
        if len(rows) == 0:
            return np.empty((0, *self.shape[1:]), dtype=np.uint8)
        return np.stack([self.dataset.load(int(row)) for row in rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


@dataclass
class ImageFolderDataset:
    """One split of an ImageFolder tree, decoded lazily.  `load(row, rng)` is the transform:
    rng None -> centre crop; a generator -> random resize-crop + flip drawn from it."""
    split_dir: str
    relative_paths: np.ndarray  # bytes (N,): CLASS/FILE under split_dir
    labels: np.ndarray  # int64 (N,)
    num_classes: int
    class_names: tuple[str, ...]
    identity: str
    resolution: int
    augment: bool = False
    on_unreadable: Literal["error", "skip"] = "error"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> CenterCrops:
        return CenterCrops(self)

    def path(self, row: int) -> str:
        return os.path.join(self.split_dir, os.fsdecode(self.relative_paths[row]))

    def load(self, row: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        image = read_rgb(self.path(row))
        if rng is None:
            return center_crop_arr(image, self.resolution)
        return np.ascontiguousarray(random_flip(random_crop_arr(image, self.resolution, rng=rng), rng))


def scan_split(split_dir: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(relative paths as bytes (N,), labels int64 (N,)), classes in the given order."""
    paths: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        names = list_images(split_dir / name) if (split_dir / name).is_dir() else []
        paths += [os.fsencode(os.path.join(name, file)) for file in names]
        labels += [label] * len(names)
    return np.array(paths, dtype=bytes), np.array(labels, dtype=np.int64)
