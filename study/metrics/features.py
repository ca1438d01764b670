"""Feature spaces with honest names, and distribution metrics that work in any of them.

A `FeatureSpace` has a `name` (used in metric keys), an `identity` (cache key: weights and
preprocessing) and `features(images) -> (N, D) float64 numpy`.

| space | name | metric keys |
|---|---|---|
| `RefSpace` (home-trained CNN, study.metrics.reference) | `ref` | `fd_ref`, `precision_ref`, `recall_ref` |
| `VFMSpace` (pooled final tokens of a registry backbone) | `vfm:NAME` | `fd_vfm:NAME`, ... |
| `InceptionSpace` (real TF-Inception pool3, local weights) | `inception` | `fd_inception` (= FID without the ADM resize) |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from study.fsio import atomic_write
from study.metrics.common import as_features, content_hash, default_cache_dir, pick_device, to_float_nchw
from study.metrics.fid import fid_from_features, precision_recall


class FeatureSpace(ABC):
    name: str
    identity: str

    @abstractmethod
    def features(self, images) -> np.ndarray:
        """(N, D) float64 features of uint8 or [-1, 1] images."""


class RefSpace(FeatureSpace):
    """Penultimate features of the reference classifier (`fd_ref`)."""

    def __init__(self, classifier):
        self.classifier = classifier
        self.name = "ref"
        self.identity = classifier.identity

    def features(self, images) -> np.ndarray:
        return self.classifier.features(images)


class VFMSpace(FeatureSpace):
    """Mean-pooled final patch tokens (after the final norm) of a frozen registry backbone
    (`fd_vfm:NAME`). `vfm` is a `tokenizer.vfm` spec / name, or an already built FrozenVFM."""

    def __init__(self, vfm, batch_size: int = 64, device: str = "auto", label: str | None = None):
        if isinstance(vfm, (str,)) or not hasattr(vfm, "final_tokens"):
            from tokenizer.vfm import build_vfm

            vfm = build_vfm(vfm)
        self.device = pick_device(device)
        self.vfm = vfm.to(self.device)
        self.batch_size = batch_size
        label = label or getattr(vfm, "name", "vfm")
        self.name = f"vfm:{label}"
        self.identity = (f"vfm:{label}:{getattr(vfm, 'weight_source', '')}:{getattr(vfm, 'input_size', '')}:"
                         f"{getattr(vfm, 'num_params', '')}")

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = to_float_nchw(images[i:i + self.batch_size]).to(self.device)
            out.append(self.vfm.final_tokens(x, with_cls=False).float().mean(1).double().cpu())
        return as_features(torch.cat(out))


class InceptionSpace(FeatureSpace):
    """TF-Inception pool3 (needs the real weights, see study.metrics.fid)."""

    def __init__(self, cfg=None):
        from study.metrics.fid import InceptionConfig, _extractor

        self.extractor = _extractor(cfg or InceptionConfig())
        self.name = "inception"
        self.identity = self.extractor.identity

    def features(self, images) -> np.ndarray:
        return self.extractor(images)[0]


def metric_key(metric: str, space: FeatureSpace) -> str:
    """`fd` + space `ref` -> `fd_ref`; `fd` + `vfm:dinov2_s` -> `fd_vfm:dinov2_s`."""
    return f"{metric}_{space.name}"


def cached_features(space: FeatureSpace, images, *, data_id: str | None = None,
                    cache_dir: str | Path | None = None) -> np.ndarray:
    """Features of a fixed (reference) image set, cached by (data content or id, space identity)."""
    content = data_id if data_id is not None else (images.detach().cpu().numpy() if torch.is_tensor(images)
                                                   else np.asarray(images))
    key = content_hash(content, space.identity)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "features"
    path = root / f"{space.name.replace(':', '_')}-{key}.npy"
    if path.is_file():
        return np.load(path)
    feats = space.features(images)
    atomic_write(path, lambda handle: np.save(handle, feats))
    return feats


def fd_in_space(space: FeatureSpace, images_a, images_b) -> float:
    """Fréchet distance between two image sets in `space` (key: metric_key('fd', space))."""
    return fid_from_features(space.features(images_a), space.features(images_b))


def distribution_metrics(space: FeatureSpace, gen, ref, *, k: int = 3, ref_is_features: bool = False,
                         gen_is_features: bool = False) -> dict[str, float]:
    """{fd_NAME, precision_NAME, recall_NAME} of generated vs reference images (or features)."""
    fg = as_features(gen) if gen_is_features else space.features(gen)
    fr = as_features(ref) if ref_is_features else space.features(ref)
    out = {metric_key("fd", space): fid_from_features(fg, fr)}
    if min(len(fg), len(fr)) > k:
        pr = precision_recall(fg, fr, k)
        out[metric_key("precision", space)] = pr["precision"]
        out[metric_key("recall", space)] = pr["recall"]
    return out
