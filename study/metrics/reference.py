"""The reference classifier: a small CNN trained in-project on the dataset, whose penultimate
features define the offline `fd_ref` space (Fréchet distance there is *not* FID) and whose
predictions give `class_consistency` (accuracy of generated samples w.r.t. their intended labels).

Here: the network, loading a trained one, features, predictions and `class_consistency`.
Training it is a stage of the study's chain (study.pipeline.reference), so that this package
stays free of the training loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from study.fsio import atomic_write
from study.metrics.common import as_features, pick_device, to_float_nchw


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class RefCNN(nn.Module):
    """A stride-2 stem and 3 stages (1/2, 1/4, 1/8 resolution) of conv-BN-ReLU blocks, global
    average pool, linear head; the pooled 4*width vector is the feature."""

    def __init__(self, num_classes: int, width: int = 32, image_size: int = 32):
        super().__init__()
        w = width
        self.image_size = image_size
        self.body = nn.Sequential(_block(3, w, 2), _block(w, w, 1), _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),
                                  _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1))
        self.feature_dim = 4 * w
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 4*width) of [-1, 1] images of any size."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def predict_logits(model: nn.Module, images, batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(to_float_nchw(images[i:i + batch_size]).to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, images, labels, batch_size: int = 256) -> float:
    preds = predict_logits(model, images, batch_size).argmax(1).numpy()
    return float((preds == np.asarray(labels)).mean())


class ReferenceClassifier:
    """A trained `RefCNN` with its provenance: `.features(images)` (N, D) float64 numpy,
    `.predict(images)` labels, `.identity` (cache key of the space), `.val_acc`."""

    def __init__(self, model: RefCNN, meta: dict, device: str = "auto"):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.meta = meta
        self.val_acc = float(meta.get("val_acc", float("nan")))
        self.identity = f"ref:{meta.get('dataset_identity', '?')}-{meta.get('config_hash', '?')}"
        self.batch_size = int(meta.get("config", {}).get("eval_batch_size", 256))

    @torch.no_grad()
    @property
    def val_acc(self) -> float:
        """Accuracy on the held-out split it was trained against (recorded when trained)."""
        return float(self.meta["val_acc"])

    def features(self, images) -> np.ndarray:
        out = [self.model.features(to_float_nchw(images[i:i + self.batch_size]).to(self.device)).double().cpu()
               for i in range(0, len(images), self.batch_size)]
        return as_features(torch.cat(out)) if out else np.zeros((0, self.model.feature_dim))

    def predict(self, images) -> np.ndarray:
        return predict_logits(self.model, images, self.batch_size).argmax(1).numpy()

    def save(self, path: str | Path) -> Path:
        state = {"state_dict": self.model.state_dict(), "meta": self.meta}
        return atomic_write(path, lambda handle: torch.save(state, handle))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "ReferenceClassifier":
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = state["meta"]
        cfg = meta["config"]
        model = RefCNN(meta["num_classes"], cfg["width"], cfg["image_size"])
        model.load_state_dict(state["state_dict"])
        return cls(model, meta, device)


def class_consistency(classifier: ReferenceClassifier, images, labels) -> float:
    """Fraction of generated images that the reference classifier assigns to their intended label
    (an offline stand-in for what IS measures; not IS)."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((classifier.predict(images) == labels).mean())
