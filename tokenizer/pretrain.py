"""Pretrain one in-house VFM with the shared loop; only the objective changes between runs:

    python -m tokenizer.pretrain tokenizer/configs/pretrain_tiny.yaml --set objective=dino

The same ViT preset (`arch`, tokenizer.vfm.INHOUSE_ARCHS), the same seeded initial weights,
data, batch stream, steps and optimiser for every objective; each objective's own
hyperparameters live in its sub-block (dino, ibot, mae, ...), scaled down from the published
recipes with every change named (the objective classes' `deviations`, STUDY_DEVIATIONS here,
both written to the checkpoint provenance).

`PretrainTask` is the `study.training.TrainTask`: one trainable module, the objective (backbone
+ heads, with the EMA teacher as a frozen submodule, so checkpoints and exact resume carry the
teacher and DINO's centres for free). The momentum update of the teacher after the optimiser
step of step s is applied at the start of step s + 1 (the Trainer steps the optimiser after
`step()` returns); the export applies the last step's pending update to a copy.

Public API for the engine:
    pretrain(cfg, callbacks=()) -> (path, metrics)   writes <train.out_dir>/<objective>.pt
    evaluate_backbone(path_or_vfm_or_vit, data_cfg, eval_cfg=None) -> dict   kNN / linear probe /
                                                     effective rank / uniformity on val features
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from study.config import ConfigError, bounded, config_hash, dump_yaml, nonsemantic, parse_cli, to_dict
from study.data import DataConfig, build_dataset, iterate_eval, make_loader
from study.training import (Callback, OptimConfig, StepOutput, Trainer, TrainConfig, TrainTask, ranks_leave_together,
                            seed_everything)
from tokenizer.objectives import OBJECTIVES, REGISTRY, Objective, build_objective, get_objective
from tokenizer.objectives.common import ema_update_
from tokenizer.vfm.inhouse import INHOUSE_ARCHS, build_inhouse_arch, save_inhouse

Objectives = Literal[OBJECTIVES]

# Changes shared by every objective (each objective adds its own `deviations`).
STUDY_DEVIATIONS = (
    "one optimiser for every objective (optim.*: AdamW, warmup + cosine) instead of each recipe's "
    "lr / weight-decay schedule (e.g. DINO/iBOT wd 0.04->0.4 is a constant optim.weight_decay)",
    "train.steps x train.batch_size (a few hundred steps of 64) instead of 100-1600 epochs at batch 1024-4096",
    "32 px procedural images instead of ImageNet at 224 px; crops sized relative to the image",
    "one small timm ViT preset (patch 4, CLS + 4 registers) for every objective",
)


# --------------------------------------------------------------------------- config
def _default_train() -> TrainConfig:
    # ema_decay 0: the Trainer's EMA copy would not follow the frozen teacher (it only averages
    # trainable parameters); teacher objectives export their own EMA teacher instead.
    return TrainConfig(steps=300, batch_size=64, ema_decay=0.0, out_dir="outputs/pretrain")


def _default_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, warmup_steps=30,
                       schedule="cosine", min_lr_ratio=0.01, grad_clip=3.0)


@dataclass
class ProbeConfig:
    """Probe protocol: features of the first `train_samples` training images fit the probes,
    the first `val_samples` validation images score them."""
    train_samples: int = bounded(2000, ge=1)
    val_samples: int = bounded(1000, ge=1)
    knn_k: int = bounded(20, ge=1)
    Cs: tuple[float, ...] = bounded((0.01, 0.1, 1.0, 10.0), gt=0)  # linear-probe inverse regularisation, chosen by CV
    folds: int = bounded(3, ge=2)
    batch_size: int = nonsemantic(256, ge=1)


@dataclass
class _PretrainBase:
    """The fields every run has; `PretrainConfig` adds one section per registered objective."""
    objective: Objectives = "dino"
    arch: str = "vit_micro_p4"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_default_train)
    optim: OptimConfig = field(default_factory=_default_optim)
    eval: ProbeConfig = field(default_factory=ProbeConfig)
    evaluate: bool = True  # probe the exported backbone at the end

    def __post_init__(self) -> None:
        if self.arch not in INHOUSE_ARCHS:
            raise ConfigError(f"unknown arch '{self.arch}' (one of {', '.join(INHOUSE_ARCHS)})", key="arch")
        size = INHOUSE_ARCHS[self.arch]["img_size"]
        if self.data.resolution != size:
            raise ConfigError(f"data.resolution {self.data.resolution} differs from {self.arch}'s img_size "
                              f"{size} (set data.resolution: {size})", key="data.resolution")
        if self.train.ema_decay != 0:
            raise ConfigError("must be 0 for pretraining: the objective's own EMA teacher is exported "
                              "(set train.ema_decay: 0)", key="train.ema_decay")
        if self.train.steps < 0:
            raise ConfigError(f"must be >= 0, got {self.train.steps}", key="train.steps")

    @property
    def family(self) -> str:
        return get_objective(self.objective).family

    @property
    def patch_size(self) -> int:
        return INHOUSE_ARCHS[self.arch]["patch_size"]


# one `pretrain.<objective>` section per registered objective that has a config
PretrainConfig = dataclasses.make_dataclass(
    "PretrainConfig", [(name, cls.config, field(default_factory=cls.config))
                       for name, cls in REGISTRY.items() if cls.config is not None], bases=(_PretrainBase,))
PretrainConfig.__module__ = __name__  # picklable (stage configs travel to jobs)


def run_dir(cfg: PretrainConfig) -> Path:
    """The Trainer's folder (checkpoints, config); one per objective so runs never share a resume."""
    return Path(cfg.train.out_dir) / cfg.objective


def output_path(cfg: PretrainConfig) -> Path:
    return Path(cfg.train.out_dir) / f"{cfg.objective}.pt"


def init_backbone(cfg: PretrainConfig) -> nn.Module:
    """The seeded initial backbone, identical for every objective (built before any head)."""
    seed_everything(cfg.train.seed)
    return build_inhouse_arch(cfg.arch)


# --------------------------------------------------------------------------- task
class PretrainTask(TrainTask):
    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.train_set = build_dataset(cfg.data, "train")
        self.objective: Objective = build_objective(
            cfg.objective, init_backbone(cfg), cfg, image_size=cfg.data.resolution,
            patch_size=cfg.patch_size, class_names=list(self.train_set.class_names))
        self.recent_losses: deque[float] = deque(maxlen=max(1, cfg.train.steps // 10))
        self.eval_started: float | None = None  # perf_counter at the final evaluation

    def modules(self) -> dict[str, nn.Module]:
        return {"objective": self.objective}

    def optim_config(self, name: str) -> OptimConfig:
        return self.cfg.optim

    def batches(self, start_step: int, rank: int, world: int) -> Iterator:
        return make_loader(self.train_set, self.cfg.train.batch_size, train=True, seed=self.cfg.train.seed,
                           start_step=start_step, rank=rank, world=world, augment=False)

    def progress(self, step: int) -> float:
        return step / max(1, self.cfg.train.steps)

    def step(self, modules, batch, step: int) -> StepOutput:
        images, labels = batch
        device = next(self.objective.parameters()).device
        metrics = {}
        if step > 0 and self.objective.ema_pairs():  # complete step - 1: its optimiser step has run
            metrics["momentum"] = self.objective.update_teacher(self.progress(step - 1))
        loss, extra = modules["objective"](images.to(device, non_blocking=True),
                                           labels.to(device, non_blocking=True), self.progress(step))
        self.recent_losses.append(float(loss.detach()))
        return StepOutput({"objective": loss}, {**metrics, **extra})

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        if step >= self.cfg.train.steps:
            self.eval_started = time.perf_counter()
        if not self.cfg.evaluate:
            return {}
        backbone = exported_backbone(model, step, self.cfg.train.steps)
        return evaluate_backbone(backbone, self.cfg.data, self.cfg.eval)

    def final_loss(self) -> float:
        """Mean loss over the last 10 % of steps (less noisy than the last step's)."""
        return sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else float("nan")


def exported_backbone(objective: Objective, step: int, total: int) -> nn.Module:
    """The backbone that becomes the VFM after `step` steps: for teacher objectives, a copy of
    the teacher with the pending momentum update of step - 1 applied (the live module is not
    touched, so checkpoints and resume stay exact)."""
    backbone = objective.export_backbone()
    if objective.exports != "teacher" or step == 0:
        return backbone
    backbone = copy.deepcopy(backbone)
    ema_update_(backbone, objective.backbone, objective.momentum((step - 1) / max(1, total)))
    return backbone


# --------------------------------------------------------------------------- evaluation
def _vit_features(vit: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of final patch tokens, CLS) of a ViT fed [-1, 1] images, as in pretraining."""
    tokens = vit.forward_features(images).float()
    return tokens[:, vit.num_prefix_tokens:].mean(1), tokens[:, 0]


def _vfm_features(vfm, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = vfm.final_tokens(images, with_cls=True)
    return tokens[:, 1:].mean(1), tokens[:, 0]


@torch.no_grad()
def extract_features(source, dataset, limit: int, batch_size: int):
    """(avg features, cls features, labels) as numpy for the first `limit` images."""
    from tokenizer.vfm import FrozenVFM
    if isinstance(source, FrozenVFM):
        fn, device = _vfm_features, next(source.parameters()).device
    else:
        fn, device = _vit_features, next(source.parameters()).device
    was_training = source.training
    source.eval()
    avg, cls, ys = [], [], []
    seen = 0
    for images, labels in iterate_eval(dataset, batch_size):
        if seen >= limit:
            break
        images, labels = images[: limit - seen], labels[: limit - seen]
        a, c = fn(source, images.to(device))
        avg.append(a.cpu())
        cls.append(c.cpu())
        ys.append(labels)
        seen += len(labels)
    source.train(was_training)
    return torch.cat(avg).numpy(), torch.cat(cls).numpy(), torch.cat(ys).numpy()


def load_backbone_for_eval(path: str | Path):
    """A checkpoint file -> the registry's FrozenVFM (the way the tokenizer will see it)."""
    from tokenizer.vfm import VFMSpec, build_vfm
    return build_vfm(VFMSpec(name=f"inhouse:{Path(path).stem}", weights=str(path)))


def evaluate_backbone(source, data_cfg: DataConfig, eval_cfg: ProbeConfig | None = None) -> dict[str, float]:
    """kNN and linear-probe accuracy (train-split features fit, val-split features score) and
    feature statistics (effective rank, uniformity) of val features. `source`: a checkpoint
    path, a FrozenVFM or a timm VisionTransformer fed [-1, 1] images. Primary features: the
    mean of the final patch tokens (what a tokenizer consumes); `cls/` keys: the CLS token.
    Keys: study.metrics.probes.feature_report's (linear_acc, linear_C, linear_cv_acc, knn_acc,
    effective_rank, uniformity)."""
    from study.metrics import probes
    eval_cfg = eval_cfg or ProbeConfig()
    if isinstance(source, (str, Path)):
        source = load_backbone_for_eval(source)
    train = extract_features(source, build_dataset(data_cfg, "train"), eval_cfg.train_samples, eval_cfg.batch_size)
    val = extract_features(source, build_dataset(data_cfg, "val"), eval_cfg.val_samples, eval_cfg.batch_size)
    out: dict[str, float] = {}
    for i, prefix in ((0, ""), (1, "cls/")):
        out.update(probes.feature_report(train[i], train[2], val[i], val[2], prefix=prefix, knn_k=eval_cfg.knn_k,
                                         Cs=tuple(eval_cfg.Cs), folds=eval_cfg.folds))
    return out


# --------------------------------------------------------------------------- entry points
def provenance(cfg: PretrainConfig, objective_cls: type | None, dataset, wall: float, final_loss: float) -> dict:
    deviations = list(STUDY_DEVIATIONS) + list(getattr(objective_cls, "deviations", ()))
    return {
        "objective": cfg.objective, "family": cfg.family, "arch": cfg.arch, "exported": get_objective(cfg.objective).exports,
        "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
        "data_identity": dataset.identity, "data": to_dict(cfg.data, semantic_only=True),
        "config": to_dict(cfg, semantic_only=True), "config_hash": config_hash(cfg),
        "deviations": deviations, "wall_time_s": round(wall, 3), "final_loss": final_loss,
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],  # the ViT saw [-1, 1] images unchanged
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": str(torch.__version__),
    }


def _check_run_dir(cfg: PretrainConfig) -> None:
    """Refuse to resume checkpoints written under a different semantic config."""
    stamp = run_dir(cfg) / "config_hash"
    if stamp.exists() and stamp.read_text().strip() != config_hash(cfg):
        raise ConfigError(f"{run_dir(cfg)} holds checkpoints of another config (delete it or choose "
                          f"another train.out_dir)", key="train.out_dir")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(config_hash(cfg))
    dump_yaml(cfg, run_dir(cfg) / "config.yaml")


def pretrain(cfg: PretrainConfig, callbacks: Sequence[Callback] = ()) -> tuple[Path, dict]:
    """Train (or, for `random`, just initialise) the backbone, write <out_dir>/<objective>.pt
    with save_inhouse and return (path, metrics): the last logged training metrics, the probe
    metrics of the exported backbone, final_loss (mean of the last 10 % of steps),
    wall_time_s (training, evaluation excluded) and eval_time_s."""
    start = time.perf_counter()
    if cfg.objective == "random":
        return _save_random(cfg, start)
    _check_run_dir(cfg)
    task = PretrainTask(cfg)
    trainer = Trainer(dataclasses.replace(cfg.train, out_dir=str(run_dir(cfg))), task, list(callbacks))
    trainer.fit()
    if not trainer.is_main:
        return output_path(cfg), {}
    train_end = task.eval_started or time.perf_counter()
    metrics = dict(trainer.final_metrics)
    backbone = copy.deepcopy(exported_backbone(task.objective, trainer.step, cfg.train.steps)).cpu()
    loss, wall = task.final_loss(), train_end - start
    save_inhouse(output_path(cfg), backbone, dict(INHOUSE_ARCHS[cfg.arch]), cfg.family,
                 provenance(cfg, type(task.objective), task.train_set, wall, loss))
    metrics.update({"final_loss": loss, "wall_time_s": wall, "eval_time_s": time.perf_counter() - train_end})
    return output_path(cfg), metrics


def _save_random(cfg: PretrainConfig, start: float) -> tuple[Path, dict]:
    """The control: the seeded initial backbone every other objective starts from, untrained."""
    backbone = init_backbone(cfg)
    dataset = build_dataset(cfg.data, "train")
    wall = time.perf_counter() - start
    save_inhouse(output_path(cfg), backbone, dict(INHOUSE_ARCHS[cfg.arch]), cfg.family,
                 provenance(cfg, None, dataset, wall, float("nan")))
    metrics = evaluate_backbone(backbone, cfg.data, cfg.eval) if cfg.evaluate else {}
    metrics.update({"final_loss": float("nan"), "wall_time_s": wall,
                    "eval_time_s": time.perf_counter() - start - wall})
    return output_path(cfg), metrics


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(PretrainConfig, argv, prog="python -m tokenizer.pretrain")
    with ranks_leave_together():  # under torchrun
        path, metrics = pretrain(cfg)
    print(json.dumps({"path": str(path), **{k: v for k, v in metrics.items() if not isinstance(v, str)}},
                     indent=1, default=float))


if __name__ == "__main__":
    main(sys.argv[1:])
