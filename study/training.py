"""The one training loop, shared by the tokenizer, the generators and the VFM pretraining.

A model plugs in by implementing `TrainTask`: which modules are trainable, how each is
optimised, the (deterministic, resumable) batch stream and the loss of one step.  The loop
owns everything else: device and precision (bf16 autocast on CUDA), DDP under `torchrun`
(gloo on CPU, NCCL on CUDA; `sharded` shares an evaluation's work out over the ranks), EMA of
the main module, gradient clipping, LR warmup/schedule, atomic checkpoints with exact resume
(model, optimisers, EMA, step, every rank's RNG), a progress bar, and metric callbacks through
which the study engine (MLflow, Optuna pruning) observes training without the models knowing
about it.

Exact resume rests on two rules: the batch at step s depends only on (seed, s)
(`study.data.make_loader(start_step=...)` does that), and every other random draw uses the
global torch/numpy/python RNGs, whose state is saved in each checkpoint.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from study.config import bounded, nonsemantic
from study.fsio import atomic_write


# --------------------------------------------------------------------------- configs
@dataclass
class OptimConfig:
    """One optimiser. `weight_decay` applies to >=2-D weights only (LlamaGen/nanoGPT rule)."""
    name: Literal["adam", "adamw"] = "adamw"
    lr: float = bounded(1e-4, gt=0)
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    weight_decay: float = bounded(0.0, ge=0)
    warmup_steps: int = bounded(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # final lr / lr for cosine and linear decay
    grad_clip: float = bounded(1.0, ge=0)  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = bounded(1000, ge=1)
    batch_size: int = bounded(64, ge=1)  # global batch; each of W ranks gets batch_size // W
    seed: int = bounded(0, ge=0)
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast is used on CUDA only
    ema_decay: float = bounded(0.999, ge=0, lt=1)  # 0 disables EMA
    eval_every: int = bounded(0, ge=0)  # 0: evaluate only at the end
    device: str = nonsemantic("auto")  # auto | cpu | cuda | cuda:N
    compile: bool = nonsemantic(False)
    ckpt_every: int = nonsemantic(500, ge=1)
    keep_checkpoints: int = nonsemantic(2, ge=1)
    log_every: int = nonsemantic(10, ge=1)
    progress: bool = nonsemantic(True)
    out_dir: str = nonsemantic("outputs/run")


@dataclass
class StepOutput:
    """What one training step returns: a loss per trainable module name (None = skip that
    module's update this step) and scalar metrics to log."""
    losses: dict[str, torch.Tensor | None]
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class TrainTask(ABC):
    """A model's contribution to the loop."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by name; the first is the main one (EMA'd, returned by fit)."""

    @abstractmethod
    def optim_config(self, name: str) -> OptimConfig:
        """Optimiser settings for module `name`."""

    @abstractmethod
    def batches(self, start_step: int, rank: int, world: int) -> Iterator[Any]:
        """Infinite batch stream; batch k of the stream is the batch of step start_step + k."""

    @abstractmethod
    def step(self, modules: dict[str, nn.Module], batch: Any, step: int) -> StepOutput:
        """Losses for one step. `modules` may be DDP-wrapped; call them, don't inspect them."""

    # True: evaluate() runs on every rank, so that it can share its work out with `sharded`; the
    # metrics kept are rank 0's
    evaluates_on_every_rank: bool = False

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Periodic evaluation of the (EMA) main model on rank 0 (see evaluates_on_every_rank); default: nothing."""
        return {}

    def extra_state(self) -> dict:
        """Task state to checkpoint besides modules (e.g. quantizer usage buffers)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class Callback:
    """Observer of training, called on rank 0 only (see on_every_rank). Raise to stop training (e.g. pruning)."""

    # True: part of training rather than an observer (state every rank needs), called on every rank
    on_every_rank: bool = False

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_train_end(self, step: int, metrics: dict[str, float]) -> None: ...


# --------------------------------------------------------------------------- distributed
def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank), initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return rank, world, local


@contextmanager
def ranks_leave_together() -> Iterator[None]:
    """Around a multi-rank run (a torchrun entry point, a stage job): on leaving, the ranks leave their
    process group only once every rank is done, so that no rank tears its connections down while a peer
    still exchanges data with it (gloo aborts a rank whose process exits with the group alive). After an
    error each rank leaves at once: its peers may never arrive. A no-op without a group."""
    finished = False
    try:
        yield
        finished = True
    finally:
        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


T = TypeVar("T")


def rank_part(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of n items; the shares differ in size by at most one."""
    return slice(n * rank // world, n * (rank + 1) // world)


def sharded(fn: Callable[[slice], T], n: int, everywhere: bool = False) -> Optional[T]:
    """fn over n items, shared out over the ranks of the stage: each rank computes fn(its slice of
    range(n)) and the parts (CPU arrays or tensors, or tuples of them) are joined in item order, on
    rank 0 or, with `everywhere`, on every rank; the other ranks get None. One rank: fn(slice(0, n))."""
    rank, world, _ = init_distributed()
    if world == 1:
        return fn(slice(0, n))
    part = rank_part(n, rank, world)
    mine = fn(part) if part.stop > part.start else None  # fn never sees an empty share
    parts = [None] * world if everywhere or rank == 0 else None
    if everywhere:
        dist.all_gather_object(parts, mine)
    else:
        dist.gather_object(mine, parts, dst=0)
    return None if parts is None else _join([p for p in parts if p is not None])


def _join(parts: list) -> Any:
    if isinstance(parts[0], tuple):
        return tuple(_join(list(column)) for column in zip(*parts))
    return torch.cat(parts) if torch.is_tensor(parts[0]) else np.concatenate(parts)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state, made of tensors and plain Python values only, so that a
    checkpoint loads with `torch.load(weights_only=True)`."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- EMA and LR
class EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        ema_params = dict(self.module.named_parameters())
        pairs = [(ema_params[name], p.detach()) for name, p in module.named_parameters() if p.requires_grad]
        if pairs:  # one fused lerp over all tensors (hundreds of small ones in the tiny presets)
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - self.decay)
        ema_buffers = dict(self.module.named_buffers())
        for name, buf in module.named_buffers():
            ema_buffers[name].copy_(buf)


def lr_factor(cfg: OptimConfig, step: int, total: int) -> float:
    """Linear warmup, then constant / cosine / linear decay to `min_lr_ratio`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    # fused: one kernel over all parameters (CPU and CUDA); ~6x faster than the per-tensor loop
    # for the hundreds of small tensors of the tiny presets
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                for p in params)
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "module", module)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


# --------------------------------------------------------------------------- the loop
class Trainer:
    def __init__(self, cfg: TrainConfig, task: TrainTask, callbacks: list[Callback] | None = None):
        self.cfg, self.task = cfg, task
        self.callbacks = list(callbacks or [])
        self.rank, self.world, local = init_distributed()
        if cfg.batch_size % self.world:
            # each rank draws batch_size // world rows: the global batch, and with it the run, would change
            raise ValueError(f"train.batch_size={cfg.batch_size} does not split over {self.world} ranks "
                             f"(use a multiple of {self.world})")
        self.device = resolve_device(cfg.device, local)
        self.autocast_dtype = torch.bfloat16 if (cfg.precision == "bf16" and self.device.type == "cuda") else None
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.step = 0
        self.last_metrics: dict[str, float] = {}

        seed_everything(cfg.seed)  # same init on every rank; per-rank streams after setup
        self.modules = {name: m.to(self.device) for name, m in task.modules().items()}
        self.main_name = next(iter(self.modules))
        self.optimizers = {n: build_optimizer(m, task.optim_config(n)) for n, m in self.modules.items()}
        self.ema = EMA(self.modules[self.main_name], cfg.ema_decay) if cfg.ema_decay > 0 else None
        self._resume()
        if self.step == 0:
            seed_everything(cfg.seed + 1000 * self.rank)
        self.wrapped = {n: self._wrap(m) for n, m in self.modules.items()}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.modules[self.main_name]

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.cfg.compile:
            module = torch.compile(module)
        if self.world > 1 and any(p.requires_grad for p in module.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return module

    # ---------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        path = self.ckpt_dir / "last.pt"
        return path if path.exists() else None

    def _resume(self) -> None:
        path = self.latest_checkpoint()
        if path is None:
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if self.ema and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.task.load_extra_state(state.get("task", {}))
        self.step = state["step"]
        self.last_metrics = state.get("metrics", {})
        # a run may resume at another world size: the rows of a step's global batch do not depend
        # on it; ranks that did not exist before reuse rank 0's generators
        rngs = state["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])

    def save_checkpoint(self) -> Path | None:
        rng = [rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state())
        if not self.is_main:
            return None
        state = {
            "modules": {n: unwrap(m).state_dict() for n, m in self.modules.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "ema": self.ema.module.state_dict() if self.ema else None,
            "task": self.task.extra_state(),
            "step": self.step,
            "rng": rng,
            "metrics": self.last_metrics,
        }
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        for target in (path, self.ckpt_dir / "last.pt"):  # a kill never leaves half a file
            atomic_write(target, lambda handle: torch.save(state, handle))
        kept = sorted(self.ckpt_dir.glob("step_*.pt"))
        for old in kept[: max(0, len(kept) - self.cfg.keep_checkpoints)]:
            old.unlink()
        for cb in self.callbacks:
            cb.on_checkpoint(self.step, path)
        return path

    # ---------------------------------------------------------------- training
    def _set_lr(self) -> None:
        for name, opt in self.optimizers.items():
            ocfg = self.task.optim_config(name)
            factor = lr_factor(ocfg, self.step, self.cfg.steps)
            for group in opt.param_groups:
                group["lr"] = ocfg.lr * factor

    def _apply(self, out: StepOutput) -> dict[str, float]:
        logs: dict[str, float] = {}
        for name, loss in out.losses.items():
            if loss is None:
                continue
            opt = self.optimizers[name]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip = self.task.optim_config(name).grad_clip
            if clip > 0:
                norm = nn.utils.clip_grad_norm_(self.modules[name].parameters(), clip)
                logs[f"grad_norm/{name}"] = float(norm)
            opt.step()
            logs[f"loss/{name}"] = float(loss.detach())
        for key, value in out.metrics.items():
            logs[key] = float(value.detach()) if torch.is_tensor(value) else float(value)
        return logs

    def _log(self, logs: dict[str, float]) -> dict[str, float]:
        if self.world > 1:  # average logged scalars over ranks
            keys = sorted(logs)
            vec = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(vec)
            logs = dict(zip(keys, (vec / self.world).tolist()))
        return logs

    def _here(self) -> list[Callback]:
        """The callbacks this rank calls: all on rank 0, those marked on_every_rank on the others."""
        return [cb for cb in self.callbacks if self.is_main or cb.on_every_rank]

    def _evaluate(self) -> dict[str, float]:
        if not (self.is_main or self.task.evaluates_on_every_rank):
            return {}
        with torch.no_grad(), self.autocast():
            metrics = self.task.evaluate(self.eval_model, self.step)
        if not self.is_main:
            return {}
        if metrics:
            for cb in self.callbacks:
                cb.on_eval(self.step, metrics)
        return metrics

    def fit(self) -> nn.Module:
        """Train to `cfg.steps` (resuming if a checkpoint exists); return the EMA main module."""
        cfg = self.cfg
        for cb in self._here():
            cb.on_train_start(self)
        batches = self.task.batches(self.step, self.rank, self.world)
        bar = None
        if self.is_main and cfg.progress and self.step < cfg.steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.out_dir.name, dynamic_ncols=True)
        window_start, window_steps = time.perf_counter(), 0
        for module in self.modules.values():
            module.train()
        while self.step < cfg.steps:
            batch = next(batches)
            self._set_lr()
            with self.autocast():
                out = self.task.step(self.wrapped, batch, self.step)
            logs = self._apply(out)
            if self.ema:
                self.ema.update(self.modules[self.main_name])
            self.step += 1
            window_steps += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                logs = self._log(logs)
                elapsed = time.perf_counter() - window_start
                logs["throughput/samples_per_s"] = window_steps * cfg.batch_size / max(elapsed, 1e-9)
                logs["lr"] = self.optimizers[self.main_name].param_groups[0]["lr"]
                self.last_metrics = logs
                window_start, window_steps = time.perf_counter(), 0
                for cb in self._here():
                    cb.on_step(self.step, logs)
                if bar is not None:
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._evaluate()
                for module in self.modules.values():
                    module.train()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        final = {**self.last_metrics, **self._evaluate()}
        for cb in self._here():
            cb.on_train_end(self.step, final)
        self.final_metrics = final
        return self.eval_model
