"""The reference classifier: a small CNN trained in-project on the dataset, whose penultimate
features define the offline `fd_ref` space (Fréchet distance there is *not* FID) and whose
predictions give `class_consistency` (accuracy of generated samples w.r.t. their intended labels).

Trained with the shared loop (`study.training.Trainer` via `RefClassifierTask`), cached under
`<cache>/ref_classifier/<dataset identity>-<config hash>/classifier.pt`, so every cell of a sweep
that uses the same data and classifier config measures in the same space.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from study.config import config_hash, nonsemantic, to_dict
from study.fsio import atomic_write
from study.metrics.common import as_features, default_cache_dir, pick_device, to_float_nchw
from study.training import OptimConfig, StepOutput, TrainConfig, Trainer, TrainTask

REF_FORMAT_VERSION = "ref-cnn-v1"


@dataclass
class RefClassifierConfig:
    width: int = 32  # channels of the first stage; stages are width, 2*width, 4*width
    image_size: int = 32  # inputs are resized to this (the dataset resolution)
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    ema_decay: float = 0.0  # short runs: EMA would lag; 0 = use the trained weights
    seed: int = 0
    min_val_acc: float = 0.9  # below this a warning says the space is weak (the result is still cached)
    eval_batch_size: int = nonsemantic(256)
    device: str = nonsemantic("auto")
    cache_dir: Optional[str] = nonsemantic(None)  # None: $VFMSTUDY_CACHE or ~/.cache/vfmstudy


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


class RefClassifierTask(TrainTask):
    """Cross-entropy training of `RefCNN` on a dataset split, evaluated on another."""

    def __init__(self, cfg: RefClassifierConfig, train_set, val_set):
        self.cfg, self.train_set, self.val_set = cfg, train_set, val_set
        self.model = RefCNN(train_set.num_classes, cfg.width, cfg.image_size)

    def modules(self) -> dict[str, nn.Module]:
        return {"classifier": self.model}

    def optim_config(self, name: str) -> OptimConfig:
        return OptimConfig(name="adamw", lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay,
                           warmup_steps=self.cfg.warmup_steps, schedule="cosine", min_lr_ratio=0.05,
                           grad_clip=1.0)

    def batches(self, start_step: int, rank: int, world: int) -> Iterator:
        from study.data import make_loader

        return make_loader(self.train_set, self.cfg.batch_size, train=True, seed=self.cfg.seed,
                           start_step=start_step, rank=rank, world=world)

    def step(self, modules: dict[str, nn.Module], batch, step: int) -> StepOutput:
        images, labels = batch
        device = next(self.model.parameters()).device
        images, labels = images.to(device), labels.to(device)
        logits = modules["classifier"](images)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return StepOutput(losses={"classifier": loss}, metrics={"train/acc": acc})

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return {"val/acc": accuracy(model, self.val_set.images, self.val_set.labels, self.cfg.eval_batch_size)}


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


def classifier_dir(cfg: RefClassifierConfig, train_set) -> Path:
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    key = config_hash(cfg, REF_FORMAT_VERSION, str(train_set.num_classes))
    return root / "ref_classifier" / f"{train_set.identity}-{key}"


def train_reference_classifier(train_set, val_set, cfg: RefClassifierConfig | None = None,
                               *, retrain: bool = False) -> ReferenceClassifier:
    """The reference classifier for `train_set` (cached by dataset identity + config hash);
    trains it with the shared `Trainer` when not cached, and records its val accuracy."""
    cfg = cfg or RefClassifierConfig()
    run_dir = classifier_dir(cfg, train_set)
    final = run_dir / "classifier.pt"
    if final.is_file() and not retrain:
        return ReferenceClassifier.load(final, cfg.device)
    task = RefClassifierTask(cfg, train_set, val_set)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, precision="fp32",
                       ema_decay=cfg.ema_decay, eval_every=0, device=cfg.device, ckpt_every=max(cfg.steps, 1),
                       keep_checkpoints=1, log_every=max(1, cfg.steps // 10), progress=False, out_dir=str(run_dir))
    trainer = Trainer(tcfg, task)
    model = trainer.fit()
    val_acc = float(trainer.final_metrics.get("val/acc", accuracy(model, val_set.images, val_set.labels)))
    meta = {"config": to_dict(cfg), "config_hash": config_hash(cfg, REF_FORMAT_VERSION, str(train_set.num_classes)),
            "num_classes": int(train_set.num_classes), "dataset_identity": train_set.identity,
            "val_identity": getattr(val_set, "identity", None), "val_acc": val_acc, "steps": cfg.steps,
            "format": REF_FORMAT_VERSION}
    clf = ReferenceClassifier(RefCNN(train_set.num_classes, cfg.width, cfg.image_size), meta, cfg.device)
    clf.model.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    clf.save(final)
    (run_dir / "classifier.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # training state no longer needed
    if val_acc < cfg.min_val_acc:
        warnings.warn(f"reference classifier reaches only {val_acc:.3f} val accuracy (< {cfg.min_val_acc}): "
                      "fd_ref / class_consistency are measured in a weak space", stacklevel=2)
    return clf


def class_consistency(classifier: ReferenceClassifier, images, labels) -> float:
    """Fraction of generated images that the reference classifier assigns to their intended label
    (an offline stand-in for what IS measures; not IS)."""
    labels = np.asarray(labels)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((classifier.predict(images) == labels).mean())
