"""Training the reference classifier (study.metrics.reference) with the shared loop, cached under
`<cache>/ref_classifier/<dataset identity>-<config hash>/classifier.pt`, so every cell of a sweep
that uses the same data and classifier config measures in the same space."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch.nn.functional as F
from torch import nn

from study import schema as S
from study.config import config_hash, nonsemantic, to_dict
from study.data import make_loader
from study.fsio import cache_root
from study.metrics.reference import RefCNN, ReferenceClassifier, accuracy
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



def classifier_dir(cfg: RefClassifierConfig, train_set) -> Path:
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
    key = config_hash(cfg, REF_FORMAT_VERSION, str(train_set.num_classes))
    return root / "ref_classifier" / f"{train_set.identity}-{key}"


def train_reference_classifier(train_set, val_set, cfg: RefClassifierConfig | None = None,
                               *, retrain: bool = False) -> ReferenceClassifier:
    """The reference classifier for `train_set` (cached by dataset identity + config hash);
    trains it with the shared `Trainer` when not cached, and records its val accuracy."""
    cfg = cfg or RefClassifierConfig()
    run_dir = classifier_dir(cfg, train_set)
    final = run_dir / S.CLASSIFIER_FILE
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
            "val_identity": getattr(val_set, "identity", None), S.VAL_ACC: val_acc, "steps": cfg.steps,
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
