"""`DataConfig`: which images, at which resolution, how many, from which seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from study.config import ConfigError, nonsemantic
from study.fsio import cache_root
from study.data.shapes import SHAPE_NAMES

CIFAR10_CLASSES = 10


@dataclass
class DataConfig:
    """Sizes count images per split; for imagefolder/cifar10 they cap a seeded random subset
    of the first `num_classes` classes (0 = every image of those classes)."""
    name: Literal["shapes", "imagefolder", "cifar10"] = "shapes"
    resolution: int = 32
    num_classes: int = 10
    train_size: int = 10000
    val_size: int = 1000
    seed: int = 0
    root: Optional[str] = None  # imagefolder: root/{train,val}/CLASS/*.JPEG; cifar10: holds cifar-10-batches-py
    augment: bool = False  # ADM random resize-crop + horizontal flip on training batches
    # imagefolder: an unreadable file stops the run ("error") or is replaced by the next readable
    # image in the stream, counted and warned about ("skip")
    on_unreadable: Literal["error", "skip"] = "error"
    cache_dir: str = nonsemantic(default_factory=lambda: str(cache_root() / "data"))

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise ConfigError(f"must be at least 16, got {self.resolution}", key="resolution")
        if self.num_classes < 2:
            raise ConfigError(f"must be at least 2, got {self.num_classes}", key="num_classes")
        if self.seed < 0:
            raise ConfigError(f"must be >= 0, got {self.seed}", key="seed")
        for key in ("train_size", "val_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, key)}", key=key)
        if self.name == "shapes":
            self._check_shapes()
        else:
            self._check_real()

    def _check_shapes(self) -> None:
        if self.num_classes > len(SHAPE_NAMES):
            raise ConfigError(f"shapes has {len(SHAPE_NAMES)} classes, got {self.num_classes} "
                              f"(use at most {len(SHAPE_NAMES)})", key="num_classes")
        for key in ("train_size", "val_size"):
            if getattr(self, key) < self.num_classes:
                raise ConfigError(f"shapes needs at least one image per class, got {getattr(self, key)} "
                                  f"for {self.num_classes} classes", key=key)

    def _check_real(self) -> None:
        if not self.root:
            layout = "cifar-10-batches-py" if self.name == "cifar10" else "{train,val}/CLASS/*.JPEG"
            raise ConfigError(f"{self.name} needs local files (set root: to the folder holding {layout})", key="root")
        if self.name == "cifar10" and self.num_classes > CIFAR10_CLASSES:
            raise ConfigError(f"cifar10 has 10 classes, got {self.num_classes}", key="num_classes")
