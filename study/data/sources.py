"""Datasets: small ones as uint8 arrays, generated (shapes) or read from local files
(CIFAR-10), cached on disk under a hash of everything that determines their content; an
ImageFolder as a file list streamed from disk.

Nothing is ever downloaded: a missing file is a ConfigError that names the path expected."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional, Union

import numpy as np
from PIL import Image

from study.config import ConfigError, config_hash
from study.data.config import DataConfig
from study.data.shapes import SHAPE_NAMES, generate_shapes
from study.data.imagefolder import ImageFolderDataset, scan_split
from study.data.transforms import adm_augment, center_crop_arr
from study.fsio import atomic_write

Split = Literal["train", "val"]
SPLIT_INDEX = {"train": 0, "val": 1}
# bump when a generator or loader changes what it produces, so old caches are not reused
DATA_FORMAT_VERSION = "data-v1"
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageArrayDataset:
    """A whole split in memory: images uint8 (N, H, W, 3), labels int64 (N,)."""
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    identity: str  # hash of the content recipe: a cache key for anything derived from it
    augment: bool = False  # whether training loaders augment by default
    on_unreadable: ClassVar[str] = "error"  # arrays in memory are always readable

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return self.images.shape[1]

    def load(self, row: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Image `row` as stored (rng None) or ADM-augmented with draws from rng."""
        return self.images[row] if rng is None else adm_augment(self.images[row], rng)


# What loaders accept: images (N, S, S, 3) indexable, labels, `load(row, rng)`, `on_unreadable`.
ImageDataset = Union[ImageArrayDataset, ImageFolderDataset]


def split_size(cfg: DataConfig, split: Split) -> int:
    return cfg.train_size if split == "train" else cfg.val_size


def split_seed(cfg: DataConfig, split: Split) -> np.random.SeedSequence:
    return np.random.SeedSequence([cfg.seed, SPLIT_INDEX[split]])


def content_identity(cfg: DataConfig, split: Split) -> str:
    """Hash of what determines the arrays (not `augment` or `cache_dir`, which do not)."""
    recipe = {"name": cfg.name, "split": split, "resolution": cfg.resolution, "num_classes": cfg.num_classes,
              "size": split_size(cfg, split), "seed": cfg.seed,
              "root": str(Path(cfg.root).expanduser().resolve()) if cfg.root else None}
    return config_hash(recipe, DATA_FORMAT_VERSION)


def cache_path(cfg: DataConfig, split: Split) -> Path:
    name = f"{cfg.name}-{cfg.resolution}px-{split}-{content_identity(cfg, split)}.npz"
    return Path(cfg.cache_dir).expanduser() / name


def build_dataset(cfg: DataConfig, split: Split) -> ImageDataset:
    """The split described by `cfg`: an ImageFolder streams from its files; the small sets
    (shapes, CIFAR-10) come from the array cache when it is there, else are built and cached."""
    if split not in SPLIT_INDEX:
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}", key="split")
    if cfg.name == "imagefolder":
        return build_imagefolder(cfg, split)
    path = cache_path(cfg, split)
    if path.is_file():
        with np.load(path) as cached:
            images, labels, names = cached["images"], cached["labels"], tuple(cached["class_names"].tolist())
    else:
        images, labels, names = _BUILDERS[cfg.name](cfg, split)
        atomic_write(path, lambda handle: np.savez(handle, images=images, labels=labels, class_names=np.array(names)))
    return ImageArrayDataset(images=images, labels=labels.astype(np.int64), num_classes=cfg.num_classes,
                             class_names=names, identity=content_identity(cfg, split), augment=cfg.augment)


# --------------------------------------------------------------------------- builders
Built = tuple[np.ndarray, np.ndarray, tuple[str, ...]]


def _build_shapes(cfg: DataConfig, split: Split) -> Built:
    images, labels = generate_shapes(split_size(cfg, split), cfg.resolution, cfg.num_classes, split_seed(cfg, split))
    return images, labels, SHAPE_NAMES[:cfg.num_classes]


def _seeded_subset(count: int, cfg: DataConfig, split: Split) -> np.ndarray:
    """Sorted indices of a seeded random subset of `split_size` items (all when 0 or more)."""
    size = split_size(cfg, split)
    if size == 0 or size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(split_seed(cfg, split)).choice(count, size, replace=False))


def _imagefolder_classes(root: Path, split_dir: Path, num_classes: int) -> list[str]:
    """The first `num_classes` class folders (sorted) of root/train when it exists, so that
    train and val label the same folder name with the same integer."""
    source = root / "train" if (root / "train").is_dir() else split_dir
    classes = sorted(d.name for d in source.iterdir() if d.is_dir())
    if len(classes) < num_classes:
        raise ConfigError(f"{source} has {len(classes)} class folders, fewer than num_classes={num_classes} "
                          "(lower num_classes or add folders)", key="num_classes")
    return classes[:num_classes]


def build_imagefolder(cfg: DataConfig, split: Split) -> ImageFolderDataset:
    """The split's file list (the images stay on disk; see study.data.imagefolder)."""
    root = Path(cfg.root).expanduser()
    split_dir = root / split
    if not split_dir.is_dir():
        raise ConfigError(f"image folder {split_dir} not found (expected the ImageNet layout "
                          f"{split_dir}/CLASS_NAME/*.JPEG; copy the images there or set root: elsewhere, "
                          "nothing is downloaded)", key="root")
    classes = _imagefolder_classes(root, split_dir, cfg.num_classes)
    paths, labels = scan_split(split_dir, classes)
    if not len(paths):
        raise ConfigError(f"no images (*.JPEG, *.png, ...) under {split_dir}/CLASS_NAME/", key="root")
    keep = _seeded_subset(len(paths), cfg, split)
    return ImageFolderDataset(split_dir=str(split_dir), relative_paths=paths[keep], labels=labels[keep],
                              num_classes=cfg.num_classes, class_names=tuple(classes),
                              identity=content_identity(cfg, split), resolution=cfg.resolution,
                              augment=cfg.augment, on_unreadable=cfg.on_unreadable)


def _cifar_dir(root: str) -> Path:
    """Accept root pointing at cifar-10-batches-py itself or at its parent."""
    path = Path(root).expanduser()
    is_batch_folder = (path / "batches.meta").is_file() or (path / "test_batch").is_file()
    return path if is_batch_folder else path / "cifar-10-batches-py"


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"CIFAR-10 file {path} not found (unpack cifar-10-python.tar.gz so that "
                          f"{path.parent}/data_batch_1..5 and test_batch exist, and set root: to "
                          f"{path.parent.parent}; nothing is downloaded)", key="root")
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def _build_cifar10(cfg: DataConfig, split: Split) -> Built:
    folder = _cifar_dir(cfg.root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    wanted = np.flatnonzero(labels < cfg.num_classes)
    keep = wanted[_seeded_subset(len(wanted), cfg, split)]
    images, labels = images[keep], labels[keep]
    if cfg.resolution != images.shape[1]:
        images = np.stack([center_crop_arr(Image.fromarray(img), cfg.resolution) for img in images])
    return np.ascontiguousarray(images), labels, CIFAR10_NAMES[:cfg.num_classes]


_BUILDERS = {"shapes": _build_shapes, "cifar10": _build_cifar10}
