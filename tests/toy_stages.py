"""A tiny, real, trainable stage chain for the engine's tests (sweeps load it with `plugins: [tests.toy_stages]`):

    toy_data  -> a regression dataset (y = x·w + noise) written to data.pt
    toy_train -> an MLP trained on it with study.training.Trainer (real checkpoints, resume, callbacks)
    toy_eval  -> MSE of the trained model on fresh test points
    toy_report -> `report.metrics` metrics and `report.tags` tags and an artifact (no inputs; tracking tests)

It runs in a second or two on one CPU core, so sweeps of it exercise launching, caching,
preemption and tracking for real. `toy.fail_at` makes a stage raise (failure-path tests).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from study.config import ConfigError, nonsemantic
from study.stages import StageContext, StageResult, register_stage
from study.training import OptimConfig, StepOutput, TrainConfig, Trainer, TrainTask


@dataclass
class ToyData:
    n: int = 256
    dim: int = 4
    noise: float = 0.1
    seed: int = 0  # the dataset draw; training seeds are the sweep's `seed`


def _toy_train_default() -> TrainConfig:
    return TrainConfig(steps=40, batch_size=32, precision="fp32", ema_decay=0.0, ckpt_every=10,
                       log_every=5, progress=False, device="cpu")


@dataclass
class ToyModel:
    hidden: int = 16
    lr: float = 1e-2
    train: TrainConfig = field(default_factory=_toy_train_default)
    fail_at: int = -1  # raise at this step (-1: never)
    step_sleep_s: float = nonsemantic(0.0)  # slows training down so tests can interrupt it


@dataclass
class ToyEval:
    n: int = 512
    seed: int = 1234


@dataclass
class DataStage:
    data: ToyData = field(default_factory=ToyData)


@dataclass
class TrainStage:
    toy: ToyModel = field(default_factory=ToyModel)
    seed: int = 0


@dataclass
class EvalStage:
    eval: ToyEval = field(default_factory=ToyEval)


def _check_train(cfg: TrainStage) -> None:
    if cfg.toy.hidden < 1:
        raise ConfigError(f"must be >= 1, got {cfg.toy.hidden}", key="toy.hidden")


def _draw(n: int, w: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, w.shape[0], generator=g)
    return x, x @ w + noise * torch.randn(n, 1, generator=g)


@register_stage("toy_data", DataStage)
def run_data(ctx: StageContext) -> StageResult:
    d = ctx.config.data
    w = torch.randn(d.dim, 1, generator=torch.Generator().manual_seed(d.seed))
    x, y = _draw(d.n, w, d.noise, d.seed + 1)
    torch.save({"w": w, "x": x, "y": y, "noise": d.noise}, ctx.dir / "data.pt")
    return StageResult(metrics={"n": d.n, "y_var": float(y.var())})


class _Regression(TrainTask):
    def __init__(self, cfg: ToyModel, data: dict, seed: int):
        self.cfg, self.data, self.seed = cfg, data, seed
        self.val = _draw(128, data["w"], data["noise"], 999)

    def modules(self):
        dim = self.data["x"].shape[1]
        return {"model": nn.Sequential(nn.Linear(dim, self.cfg.hidden), nn.Tanh(), nn.Linear(self.cfg.hidden, 1))}

    def optim_config(self, name):
        return OptimConfig(name="adam", lr=self.cfg.lr)

    def batches(self, start_step: int, rank: int, world: int) -> Iterator:
        # the batch of step s depends only on (seed, s): exact resume after preemption
        x, y, bs = self.data["x"], self.data["y"], self.cfg.train.batch_size
        step = start_step
        while True:
            idx = torch.randint(0, len(x), (bs,), generator=torch.Generator().manual_seed(self.seed * 100_003 + step))
            yield x[idx], y[idx]
            step += 1

    def step(self, modules, batch, step):
        if step == self.cfg.fail_at:
            raise RuntimeError(f"toy failure requested at step {step}")
        if self.cfg.step_sleep_s:
            time.sleep(self.cfg.step_sleep_s)
        x, y = batch
        return StepOutput(losses={"model": nn.functional.mse_loss(modules["model"](x), y)})

    def evaluate(self, model, step):
        x, y = self.val
        return {"val_mse": float(nn.functional.mse_loss(model(x), y))}


@register_stage("toy_train", TrainStage, needs=("toy_data",), validate=_check_train)
def run_train(ctx: StageContext) -> StageResult:
    torch.set_num_threads(1)  # many toy jobs share a couple of cores
    data = torch.load(ctx.inputs["toy_data"].dir / "data.pt", weights_only=True)
    tcfg = dataclasses.replace(ctx.config.toy.train, seed=ctx.config.seed, out_dir=str(ctx.dir))
    trainer = Trainer(tcfg, _Regression(ctx.config.toy, data, ctx.config.seed), ctx.callbacks)
    model = trainer.fit()
    torch.save(model.state_dict(), ctx.dir / "model.pt")
    final = trainer.final_metrics
    return StageResult(metrics={"train_loss": final["loss/model"], "val_mse": final["val_mse"], "steps": trainer.step})


@register_stage("toy_eval", EvalStage, needs=("toy_data", "toy_train"))
def run_eval(ctx: StageContext) -> StageResult:
    data = torch.load(ctx.inputs["toy_data"].dir / "data.pt", weights_only=True)
    state = torch.load(ctx.inputs["toy_train"].dir / "model.pt", weights_only=True)
    hidden, dim = state["0.weight"].shape
    model = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    model.load_state_dict(state)
    x, y = _draw(ctx.config.eval.n, data["w"], data["noise"], ctx.config.eval.seed)
    with torch.no_grad():
        err = model(x) - y
    return StageResult(metrics={"mse": float((err ** 2).mean()), "mae": float(err.abs().mean())})


@dataclass
class ToyReport:
    metrics: int = 3
    tags: int = 2


@dataclass
class ReportStage:
    report: ToyReport = field(default_factory=ToyReport)
    seed: int = 0


@register_stage("toy_report", ReportStage)
def run_report(ctx: StageContext) -> StageResult:
    """A result as wide as asked (metrics, tags) with an artifact: more than MLflow takes in one call."""
    r = ctx.config.report
    (ctx.dir / "note.txt").write_text(f"seed {ctx.config.seed}\n")
    return StageResult(metrics={f"m{i}": ctx.config.seed + i / 8 for i in range(r.metrics)},
                       tags={f"t{i}": f"{ctx.config.seed}-{i}" for i in range(r.tags)},
                       artifacts={"notes": ["note.txt"]})


PLUGINS = [__name__]  # a sweep spec's `plugins:` entry that registers these kinds
