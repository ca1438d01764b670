"""Resumable batch streams.

The batch of global step s is a pure function of (seed, s, rank, world): step s lies in epoch
s // steps_per_epoch, whose order is a permutation seeded by (seed, epoch); the global batch
is a contiguous slice of it and rank r takes the r-th per-rank slice of that, so ranks are
disjoint within an epoch (like DistributedSampler) and the global batch does not depend on
the world size.  Each sample's augmentation draws from a generator seeded by
(seed, epoch, position in epoch), so neither worker count nor resume point changes a pixel.
Images are loaded (and, for an ImageFolder, decoded) in the DataLoader workers, one batch per
worker task.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import random
import warnings
from collections import Counter
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from study.data.imagefolder import ImageFolderDataset, UnreadableImageError
from study.data.sources import ImageDataset
from study.data.transforms import to_tensor_images

# (dataset rows (b,), per-sample seeds (b, 3) = (seed, epoch, position))
BatchKey = tuple[np.ndarray, np.ndarray]


class StepBatchKeys:
    """Infinite iterable of the BatchKey of steps start_step, start_step + 1, ..."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int, start_step: int, rank: int,
                 world: int, shuffle: bool):
        self.per_rank = batch_size // world
        self.global_batch = self.per_rank * world
        if self.per_rank < 1 or not 0 <= rank < world:
            raise ValueError(f"batch_size={batch_size} must be >= world={world} and 0 <= rank={rank} < world")
        if num_items < self.global_batch:
            raise ValueError(f"dataset of {num_items} images is smaller than one global batch ({self.global_batch})")
        self.num_items, self.seed, self.start_step = num_items, seed, start_step
        self.rank, self.shuffle = rank, shuffle
        self.steps_per_epoch = num_items // self.global_batch  # the epoch's incomplete tail is dropped
        self._epoch, self._order = -1, np.arange(num_items)

    def order(self, epoch: int) -> np.ndarray:
        if self.shuffle and epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._order

    def key(self, step: int) -> BatchKey:
        epoch, within = divmod(step, self.steps_per_epoch)
        first = within * self.global_batch + self.rank * self.per_rank
        positions = np.arange(first, first + self.per_rank)
        seeds = np.stack([np.full_like(positions, self.seed), np.full_like(positions, epoch), positions], axis=1)
        return self.order(epoch)[positions], seeds

    def __iter__(self) -> Iterator[BatchKey]:
        return (self.key(step) for step in itertools.count(self.start_step))


# how many consecutive unreadable files a skip may pass over before the data is deemed broken
MAX_CONSECUTIVE_UNREADABLE = 64


class BatchFetcher(Dataset):
    """Map-style dataset whose items are whole batches, addressed by BatchKey: uint8 images
    (b, H, W, 3), int64 labels (b,) and the paths of unreadable files skipped on the way.

    A skipped file is replaced by the next readable row (row + 1, row + 2, ...) with the same
    augmentation seed: a fixed file set still gives a pure function of the key."""

    def __init__(self, dataset: ImageDataset, augment: bool):
        self.dataset, self.augment = dataset, augment
        self.skip_unreadable = dataset.on_unreadable == "skip"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: BatchKey) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        rows, seeds = key
        images, labels, skipped = [], [], []
        for row, sample_seed in zip(rows.tolist(), seeds):
            image, used = self._load(row, sample_seed, skipped)
            images.append(image)
            labels.append(self.dataset.labels[used])
        return torch.from_numpy(np.stack(images)), torch.as_tensor(np.array(labels, dtype=np.int64)), tuple(skipped)

    def _load(self, row: int, sample_seed: np.ndarray, skipped: list[str]) -> tuple[np.ndarray, int]:
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):
            used = (row + offset) % len(self.dataset)
            rng = np.random.default_rng(sample_seed) if self.augment else None
            try:
                return self.dataset.load(used, rng), used
            except UnreadableImageError as err:
                if not self.skip_unreadable:
                    raise
                skipped.append(err.path)
        raise RuntimeError(f"{MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images from {skipped[0]} on; "
                           "check the dataset copy")


class BatchStream:
    """Iterator of (images float32 (b, 3, H, W) in [-1, 1], labels int64 (b,)).  `skipped`
    counts the unreadable files replaced so far (path -> times); each is also warned about once."""

    def __init__(self, loader: DataLoader):
        self._batches = iter(loader)
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, skipped = next(self._batches)
        for path in skipped:
            if path not in self.skipped:
                warnings.warn(f"skipped unreadable image {path} (data.on_unreadable: skip)", stacklevel=2)
            self.skipped[path] += 1
        return to_tensor_images(images), labels


def _seed_worker(worker_id: int) -> None:
    """Seed a worker's global RNGs from its torch seed (set by the loader's generator), so any
    library that draws from them stays reproducible; our augmentation does not use them."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 256 << 20  # fixing the mmap threshold would also pin this at 128 KiB


@functools.cache
def keep_large_buffers_out_of_the_heap() -> None:
    """Serve every allocation over 1 MiB by its own mmap, returned to the system when freed.
    glibc otherwise raises its mmap threshold after the first large free, so every later batch
    (tens of MB once converted to float) is carved from the heap, small long-lived allocations
    settle in the holes the batches leave, and the heap only grows: the loading process grew by
    gigabytes over a few hundred steps of 256-px batches. Once per process; a no-op where libc is
    not glibc. The heap's top is still kept up to TRIM_THRESHOLD_BYTES: returning it after every
    step made CPU training page-fault far more."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc (e.g. macOS): no such threshold to fix
        pass


def make_loader(dataset: ImageDataset, batch_size: int, *, train: bool, seed: int, start_step: int = 0,
                rank: int = 0, world: int = 1, num_workers: int = 0, augment: bool | None = None) -> BatchStream:
    """Infinite stream of (images float32 (b, 3, H, W) in [-1, 1], labels int64 (b,)) with
    b = batch_size // world; item k is the batch of step start_step + k.  `train=False`
    walks the data in order without augmentation; `augment=None` means train and
    dataset.augment."""
    if isinstance(dataset, ImageFolderDataset):
        # image files streamed at full resolution: large batches; small in-memory sets (32-px shapes,
        # CIFAR) keep glibc's default, under which CPU training allocates faster
        keep_large_buffers_out_of_the_heap()
    use_augment = (train and dataset.augment) if augment is None else augment
    keys = StepBatchKeys(len(dataset), batch_size, seed=seed, start_step=start_step, rank=rank,
                         world=world, shuffle=train)
    loader = DataLoader(BatchFetcher(dataset, use_augment), sampler=keys,
                        batch_size=None, num_workers=num_workers, worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=num_workers > 0)
    return BatchStream(loader)


def iterate_eval(dataset: ImageDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image once, in order, without augmentation (the last batch may be smaller)."""
    for start in range(0, len(dataset), batch_size):
        end = start + batch_size
        yield to_tensor_images(dataset.images[start:end]), torch.from_numpy(dataset.labels[start:end])
