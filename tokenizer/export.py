"""The generators' training data: tokenizer codes of every training image over its augmented
views, written as `codes.pt` (format in generators/train.py).

Which views (`VIEW_RECIPE`).  The VFMTok AR recipe does not pre-extract codes: it encodes each
image online, on a fresh ADM random resize-crop (80-100 % of the short side) + horizontal flip
every time the image is drawn.  Pre-extracting, we keep the deterministic transforms and a fixed
sample of the random one:
    tokens | latents                     the centre crop (the eval transform)
    tokens_flip | latents_flip           its mirror image
    tokens_views | latents_views (N, V)  V draws of ADM random resize-crop + flip per image,
                                         view v of image i seeded by (seed, i, v)
so a generator that picks one of the V views per sample trains on the recipe's augmentation
distribution, limited to V draws per image (LlamaGen's ten-crop export also stores 10 per image).

Streaming and preemption.  Images are cut into shards of `shard_size` consecutive rows; rank r
encodes shards r, r + world, ..., decoding images in DataLoader workers, and writes each shard
to its own file atomically, so a requeued job skips the shards it has finished.  Once every
shard exists, one process merges them into codes.pt.  The shard folder's name hashes everything
that determines the codes, so shards of another tokenizer, seed or view count never mix in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from study.config import config_hash
from study.data import ImageDataset, to_tensor_images
from study.fsio import atomic_write

VIEW_RECIPE = "centre crop + mirror + ADM random resize-crop/flip views"
DEFAULT_VIEWS = 10
DEFAULT_SHARD_SIZE = 10_000


@dataclass(frozen=True)
class ExportPlan:
    """Everything that determines the exported codes, besides the tokenizer's weights (named
    by tokenizer_id) and the image files (named by dataset_identity)."""
    tokenizer_id: str
    dataset_identity: str
    num_images: int
    views: int
    seed: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))

    def shard_dir(self, path: Path) -> Path:
        return path.with_name(f"{path.name}.shards-{config_hash(asdict(self))}")


class ImageViews(Dataset):
    """Item i: (uint8 (1 + views, S, S, 3) = centre crop then the random views of image i, label)."""

    def __init__(self, dataset: ImageDataset, views: int, seed: int):
        self.dataset, self.views, self.seed = dataset, views, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int]:
        crops = [self.dataset.load(row)]
        crops += [self.dataset.load(row, np.random.default_rng([self.seed, row, view])) for view in range(self.views)]
        return torch.from_numpy(np.stack(crops)), int(self.dataset.labels[row])


def _compact(codes: torch.Tensor) -> torch.Tensor:
    """Token ids fit int16 (codebooks up to 32768 entries), a quarter of int64's storage."""
    fits = codes.dtype == torch.long and (codes.numel() == 0 or int(codes.max()) < 2 ** 15)
    return codes.to(torch.int16) if fits else codes.cpu()


@torch.no_grad()
def encode_rows(model, dataset: ImageDataset, rows: range, views: int, seed: int, batch_size: int,
                num_workers: int) -> dict[str, torch.Tensor]:
    """{"main", "flip", "views", "labels"} for the given rows; `batch_size` counts encoded images."""
    device = next(model.parameters()).device
    items = torch.utils.data.Subset(ImageViews(dataset, views, seed), list(rows))
    loader = DataLoader(items, batch_size=max(1, batch_size // (2 + views)), num_workers=num_workers)
    parts: dict[str, list[torch.Tensor]] = {"main": [], "flip": [], "views": [], "labels": []}
    for crops, labels in loader:
        b = len(labels)
        x = to_tensor_images(crops.to(device).flatten(0, 1)).unflatten(0, (b, 1 + views))
        batch = torch.cat([x[:, 0], torch.flip(x[:, 0], dims=[3]), x[:, 1:].flatten(0, 1)])
        codes = torch.cat([model.encode(chunk) for chunk in batch.split(batch_size)]).cpu()
        parts["main"].append(codes[:b])
        parts["flip"].append(codes[b:2 * b])
        parts["views"].append(codes[2 * b:].unflatten(0, (b, views)))
        parts["labels"].append(labels.long())
    labels = torch.cat(parts.pop("labels"))
    return {"labels": labels, **{key: _compact(torch.cat(value)) for key, value in parts.items()}}


def write_code_shards(model, dataset: ImageDataset, path: str | Path, *, rank: int = 0, world: int = 1,
                      views: int = DEFAULT_VIEWS, seed: int = 0, shard_size: int = DEFAULT_SHARD_SIZE,
                      batch_size: int = 256, num_workers: int = 0, tokenizer_id: str | None = None) -> ExportPlan:
    """Encode this rank's shards that are not on disk yet; returns the plan for `merge_code_shards`."""
    model.eval()
    plan = ExportPlan(tokenizer_id=tokenizer_id or getattr(model, "tokenizer_id", f"{model.cfg.kind}-untracked"),
                      dataset_identity=dataset.identity, num_images=len(dataset), views=views, seed=seed,
                      shard_size=shard_size)
    folder = plan.shard_dir(Path(path))
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(rank, plan.num_shards, world):
        target = folder / f"shard-{shard:05d}.pt"
        if not target.is_file():
            codes = encode_rows(model, dataset, plan.rows(shard), views, seed, batch_size, num_workers)
            atomic_write(target, lambda handle: torch.save(codes, handle))
    return plan


def merge_code_shards(model, plan: ExportPlan, path: str | Path) -> dict:
    """Concatenate every shard into `path` (the codes.pt payload, also returned)."""
    path = Path(path)
    folder = plan.shard_dir(path)
    files = [folder / f"shard-{shard:05d}.pt" for shard in range(plan.num_shards)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} of {len(files)} code shards missing (first: {missing[0]}); "
                                "run write_code_shards on every rank first")
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    merged = {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}
    key = "tokens" if model.cfg.kind == "vfmtok" else "latents"
    payload = {"labels": merged["labels"], "grid": tuple(model.grid), "tokenizer_id": plan.tokenizer_id,
               "views": json.dumps({"recipe": VIEW_RECIPE, "count": plan.views, "seed": plan.seed}),
               key: merged["main"], f"{key}_flip": merged["flip"]}
    if plan.views:
        payload[f"{key}_views"] = merged["views"]
    if key == "latents":
        if getattr(model, "latent_stats", None) is not None:
            mean, std = model.latent_stats
        else:  # statistics of the exported centre crops (per channel and position)
            mean, std = merged["main"].mean(0), merged["main"].std(0, unbiased=False)
        payload["mean"], payload["std"] = mean.float(), std.float()
    atomic_write(path, lambda handle: torch.save(payload, handle))
    return payload


def export_codes(model, dataset: ImageDataset, path: str | Path, *, views: int = DEFAULT_VIEWS, seed: int = 0,
                 shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 256, num_workers: int = 0,
                 tokenizer_id: str | None = None) -> dict:
    """One process: write (or finish) every shard, then merge them into `path`."""
    plan = write_code_shards(model, dataset, path, views=views, seed=seed, shard_size=shard_size,
                             batch_size=batch_size, num_workers=num_workers, tokenizer_id=tokenizer_id)
    return merge_code_shards(model, plan, path)
