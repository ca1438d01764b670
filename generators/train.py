"""Train a generator on precomputed tokenizer outputs: `python -m generators.train CONFIG.yaml [--set k=v ...]`.

kind "gpt": LlamaGen GPT on discrete token grids (cross-entropy on every token).
kind "dit": DiT-DH / DiT on continuous latents (flow matching, flow.py).

Data (`data.source`):
  "cache"  – `data.path` is a codes.pt written by the tokenizer side, a dict with
             "labels": LongTensor (N,), "grid": (h, w), and either
             "tokens": LongTensor (N, h*w) [+ optional "tokens_flip" (N, h*w)]          (gpt) or
             "latents": FloatTensor (N, C, h, w), "mean", "std" broadcastable to (C, h, w)
             [+ optional "latents_flip" (N, C, h, w)]                                   (dit).
             Flip variants (codes of the mirrored image) are used with probability 0.5 per sample;
             when the file has "tokens_views" (N, V, h*w) / "latents_views" (N, V, C, h, w), codes
             of V augmented views per image (tokenizer.export), each training draw takes one of
             them instead.
             Latents are normalised as (z - mean) / (std + 1e-5) (VFMAE convention); a missing
             mean/std is computed per (channel, position) from the file.
  "random" – a synthetic set of `data.num_samples` items (uniform tokens / Gaussian latents),
             labels i % num_classes: for tests and benchmarks.

The batch of step s is a pure function of (train.seed, s): a permutation of the N items per
epoch, drawn from (seed, epoch), plus flip choices drawn from (seed, step); so exact resume only
needs the shared Trainer's checkpoint.  Public API: `train(cfg, callbacks, sample_fn)`,
`load_generator(path)`, `GeneratorTask.sample(model, labels, ...)`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generators.dit import DiT, DiTConfig
from generators.flow import FlowConfig, flow_loss, sample_ode
from generators.gpt import GPT, GPTConfig
from generators.sampling import generate
from study.config import ConfigError, bounded, cli_errors, dump_yaml, from_dict, nonsemantic, parse_cli, to_dict
from study.training import (Callback, OptimConfig, StepOutput, TrainConfig, Trainer, TrainTask, ranks_leave_together,
                            sharded, unwrap)

# (samples, labels, step) -> metrics; called on every rank with every sample, so that it can share its
# work out (study.training.sharded); rank 0's metrics are kept
SampleFn = Callable[[torch.Tensor, torch.Tensor, int], dict]


# --------------------------------------------------------------------------- configs
@dataclass
class CodesConfig:
    source: Literal["cache", "random"] = "random"
    path: str = ""  # codes.pt for source "cache"
    num_samples: int = bounded(256, ge=1)  # size of the synthetic set for source "random"
    seed: int = bounded(0, ge=0)  # synthetic set seed
    flip: bool = True  # use tokens_flip / latents_flip when the file has them
    views: bool = True  # train on the augmented views (tokens_views / latents_views) when the file has them


@dataclass
class SampleConfig:
    """How `evaluate()` and `LoadedGenerator.sample()` draw samples."""
    num_samples: int = bounded(16, ge=1)  # drawn at each evaluation
    seed: int = bounded(0, ge=0)
    val_samples: int = bounded(64, ge=1)  # fixed subset of the training codes for eval/loss
    # GPT (sampling.generate)
    cfg_scale: float = bounded(1.0, ge=0)
    cfg_schedule: Literal["constant", "linear"] = "constant"
    cfg_interval: int = -1
    temperature: float = bounded(1.0, gt=0)
    top_k: int = bounded(0, ge=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    use_cache: bool = nonsemantic(True)
    compile: bool = nonsemantic(False)
    # DiT (flow.sample_ode); cfg_scale is the guidance weight w for both guidance kinds
    method: Literal["euler", "heun"] = "euler"
    steps: int = bounded(50, ge=1)
    t_min: float = bounded(0.001, ge=0, lt=1)
    cfg_t_interval: tuple[float, float] = bounded((0.0, 1.0), ge=0, le=1)
    guidance: Literal["cfg", "autoguidance"] = "cfg"
    # AutoGuidance guide = the EMA model at this fraction of train.steps (0: no guide)
    guide_fraction: float = bounded(0.1, ge=0, le=1)


@dataclass
class GeneratorRunConfig:
    kind: Literal["gpt", "dit"] = "gpt"
    gpt: Optional[GPTConfig] = None  # None: GPTConfig() (tiny)
    dit: Optional[DiTConfig] = None  # None: DiTConfig() (DiT-DH tiny)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: CodesConfig = field(default_factory=CodesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: Optional[OptimConfig] = None  # None: the method's defaults for `kind` (default_optim)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def model(self) -> GPTConfig | DiTConfig:
        if self.kind == "gpt":
            return self.gpt or GPTConfig()
        return self.dit or DiTConfig()


def default_optim(kind: str) -> OptimConfig:
    """GPT: AdamW 1e-4 constant, wd 0.05, (0.9, 0.95), clip 1 (LlamaGen). DiT: AdamW 2e-4, wd 0, clip 1 (RAE S)."""
    if kind == "gpt":
        return OptimConfig(name="adamw", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, grad_clip=1.0)
    return OptimConfig(name="adamw", lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0)


def build_model(cfg: GeneratorRunConfig) -> nn.Module:
    return GPT(cfg.model) if cfg.kind == "gpt" else DiT(cfg.model)


# --------------------------------------------------------------------------- data
@dataclass
class CodeSet:
    """Training items: x (N, L) tokens or (N, C, h, w) normalised latents, labels (N,)."""
    x: torch.Tensor
    labels: torch.Tensor
    x_flip: Optional[torch.Tensor] = None
    x_views: Optional[torch.Tensor] = None  # (N, V, ...) codes of V augmented views per item
    mean: Optional[torch.Tensor] = None  # latent statistics (C, h, w) for de-normalisation
    std: Optional[torch.Tensor] = None


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


SAMPLE_CHUNK = 64  # labels drawn with one seed: the unit the ranks share out


def label_chunks(labels: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, int]]:
    """`labels` cut into chunks of SAMPLE_CHUNK, chunk i with the seed (seed, i): the samples of a
    label do not depend on how many ranks draw the chunks."""
    return [(labels[i:i + SAMPLE_CHUNK], _seed(seed, 5, i // SAMPLE_CHUNK))
            for i in range(0, len(labels), SAMPLE_CHUNK)]


def load_codes(cfg: GeneratorRunConfig) -> CodeSet:
    m = cfg.model
    if cfg.data.source == "random":
        g = torch.Generator().manual_seed(_seed(cfg.data.seed, 1))
        n = cfg.data.num_samples
        labels = torch.arange(n) % m.num_classes
        if cfg.kind == "gpt":
            return CodeSet(torch.randint(0, m.vocab_size, (n, m.seq_len), generator=g), labels)
        x = torch.randn(n, m.in_channels, *m.grid, generator=g)
        return CodeSet(x, labels, mean=torch.zeros(m.in_channels, *m.grid), std=torch.ones(m.in_channels, *m.grid))

    if not cfg.data.path or not Path(cfg.data.path).is_file():
        raise ConfigError(f"codes file {cfg.data.path!r} not found (write it with the tokenizer, or use data.source=random)",
                          key="data.path")
    blob = torch.load(cfg.data.path, map_location="cpu", weights_only=True)
    labels = blob["labels"].long()
    grid = tuple(int(v) for v in blob["grid"])

    def check(ok: bool, key: str, problem: str):
        if not ok:
            raise ConfigError(f"{problem} in {cfg.data.path}", key=key)

    flip_key = "tokens_flip" if cfg.kind == "gpt" else "latents_flip"
    x_flip = blob.get(flip_key) if cfg.data.flip else None
    x_views = blob.get(flip_key.replace("flip", "views")) if cfg.data.views else None
    if cfg.kind == "gpt":
        check("tokens" in blob, "kind", "no 'tokens' (a continuous codes file? use kind: dit)")
        x = blob["tokens"].long()
        check(grid == tuple(m.grid), "gpt.grid", f"grid {grid} != model grid {tuple(m.grid)} (set gpt.grid: {list(grid)})")
        check(int(x.max()) < m.vocab_size, "gpt.vocab_size", f"token id {int(x.max())} >= vocab_size {m.vocab_size}")
        check(int(labels.max()) < m.num_classes, "gpt.num_classes", f"label {int(labels.max())} >= num_classes")
        return CodeSet(x, labels, x_flip.long() if x_flip is not None else None, x_views)
    check("latents" in blob, "kind", "no 'latents' (a discrete codes file? use kind: gpt)")
    z = blob["latents"].float()
    check(tuple(z.shape[1:]) == (m.in_channels, *m.grid), "dit",
          f"latent shape {tuple(z.shape[1:])} != (in_channels, *grid) {(m.in_channels, *m.grid)}")
    check(int(labels.max()) < m.num_classes, "dit.num_classes", f"label {int(labels.max())} >= num_classes")
    mean = blob.get("mean", z.mean(0)).float().expand(z.shape[1:]).clone()
    std = blob.get("std", z.std(0)).float().expand(z.shape[1:]).clone()
    norm = lambda v: (v.float() - mean) / (std + 1e-5)  # noqa: E731
    return CodeSet(norm(z), labels, norm(x_flip) if x_flip is not None else None,
                   norm(x_views) if x_views is not None else None, mean, std)


# --------------------------------------------------------------------------- task
class GeneratorTask(TrainTask):
    evaluates_on_every_rank = True  # the ranks share out the evaluation's samples (and sample_fn's work)

    def __init__(self, cfg: GeneratorRunConfig, sample_fn: Optional[SampleFn] = None):
        self.cfg = cfg
        self.sample_fn = sample_fn
        self.codes = load_codes(cfg)
        self.optim = cfg.optim or default_optim(cfg.kind)
        self.shift = cfg.flow.resolve_shift(cfg.model.latent_dim) if cfg.kind == "dit" else 1.0
        self._model: Optional[nn.Module] = None
        self._perms: dict[int, torch.Tensor] = {}
        self.guide: Optional[nn.Module] = None  # AutoGuidance guide (EMA snapshot), set by GuideSnapshot
        self.guide_step: Optional[int] = None

    # ---------------------------------------------------------------- TrainTask
    def modules(self) -> dict[str, nn.Module]:
        if self._model is None:  # built here, after the Trainer has seeded the RNGs
            self._model = build_model(self.cfg)
        return {self.cfg.kind: self._model}

    def optim_config(self, name: str) -> OptimConfig:
        return self.optim

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, 2, epoch))
            self._perms[epoch] = torch.randperm(len(self.codes.labels), generator=g)
        return self._perms[epoch]

    def batch_at(self, step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, labels) batch of `step` for `rank`: a pure function of (train.seed, step, rank, world)."""
        B = self.cfg.train.batch_size
        b = B // world
        n = len(self.codes.labels)
        pos = step * B + rank * b + torch.arange(b)  # global stream positions
        epochs = pos // n
        idx = torch.empty_like(pos)
        for e in epochs.unique().tolist():  # a batch spans at most a few epochs
            mask = epochs == e
            idx[mask] = self._perm(e)[pos[mask] % n]
        x = self.codes.x[idx]
        if self.codes.x_views is not None:  # each draw one of the item's augmented views, like online augmentation
            g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, 4, step, rank))
            view = torch.randint(self.codes.x_views.shape[1], (b,), generator=g)
            x = self.codes.x_views[idx, view].to(x.dtype)
        elif self.codes.x_flip is not None:
            g = torch.Generator().manual_seed(_seed(self.cfg.train.seed, 3, step, rank))
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), self.codes.x_flip[idx], x)
        return x, self.codes.labels[idx]

    def batches(self, start_step: int, rank: int, world: int) -> Iterator[Any]:
        step = start_step
        while True:
            yield self.batch_at(step, rank, world)
            step += 1

    def step(self, modules: dict[str, nn.Module], batch: Any, step: int) -> StepOutput:
        model = modules[self.cfg.kind]
        device = next(model.parameters()).device
        x, labels = (t.to(device, non_blocking=True) for t in batch)
        if self.cfg.kind == "gpt":
            logits = model(x[:, :-1], labels)  # (B, L, V)
            loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
        else:
            loss = flow_loss(model, x, labels, self.shift)
        return StepOutput({self.cfg.kind: loss})

    # ---------------------------------------------------------------- evaluation / sampling
    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, *, seed: Optional[int] = None,
               guide: Optional[nn.Module] = None, **overrides) -> torch.Tensor:
        """Draw samples for `labels`: GPT -> tokens (B, L); DiT -> latents (B, C, h, w) in the data
        scale (de-normalised). `overrides` replace fields of cfg.sample (e.g. cfg_scale=1.5)."""
        sc = dataclasses.replace(self.cfg.sample, **overrides)
        seed = sc.seed if seed is None else seed
        model = unwrap(model)
        device = next(model.parameters()).device
        labels = labels.to(device)
        if self.cfg.kind == "gpt":
            return generate(model, labels, cfg_scale=sc.cfg_scale, cfg_schedule=sc.cfg_schedule,
                            cfg_interval=sc.cfg_interval, temperature=sc.temperature, top_k=sc.top_k,
                            top_p=sc.top_p, seed=seed, use_cache=sc.use_cache, compile=sc.compile)
        m = self.cfg.model
        g = torch.Generator(device).manual_seed(seed)
        noise = torch.randn(labels.shape[0], m.in_channels, *m.grid, generator=g, device=device)
        if sc.guidance == "autoguidance":
            guide = guide if guide is not None else self.guide
            scale = sc.cfg_scale if guide is not None else 1.0  # no guide yet: unguided
        else:
            guide, scale = None, sc.cfg_scale
        was_training = model.training
        model.eval()
        try:
            z = sample_ode(model, noise, labels, null_class=m.num_classes, steps=sc.steps, method=sc.method,
                           shift=self.shift, t_min=sc.t_min, scale=scale, interval=tuple(sc.cfg_t_interval),
                           guide=guide)
        finally:
            model.train(was_training)
        return self.denormalize(z.float())

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * (self.codes.std.to(z.device) + 1e-5) + self.codes.mean.to(z.device)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        model = unwrap(model)
        device = next(model.parameters()).device
        sc = self.cfg.sample
        metrics: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:  # loss on a fixed subset of the training codes (codes.pt has no split); fixed noise for dit
            k = min(sc.val_samples, len(self.codes.labels))
            x, y = self.codes.x[:k].to(device), self.codes.labels[:k].to(device)
            if self.cfg.kind == "gpt":
                metrics["eval/loss"] = float(F.cross_entropy(model(x[:, :-1], y).flatten(0, 1), x.flatten()))
            else:
                g = torch.Generator(device).manual_seed(sc.seed)
                metrics["eval/loss"] = float(flow_loss(model, x, y, self.shift, generator=g))
        finally:
            model.train(was_training)
        if sc.num_samples <= 0:
            return metrics
        m = self.cfg.model
        labels = torch.arange(sc.num_samples) % m.num_classes
        chunks = label_chunks(labels, sc.seed)
        samples = sharded(lambda part: torch.cat([self.sample(model, y, seed=seed).cpu() for y, seed in chunks[part]]),
                          len(chunks), everywhere=True).to(device)
        labels = labels.to(device)
        ref = self.codes.x[:4096].to(device)
        if self.cfg.kind == "gpt":
            counts = torch.bincount(samples.flatten(), minlength=m.vocab_size).float()
            p = counts[counts > 0] / counts.sum()
            metrics["sample/token_entropy_bits"] = float(-(p * p.log2()).sum())
            metrics["sample/memorized"] = float((samples[:, None] == ref[None]).all(-1).any(-1).float().mean())
        else:
            zn = (samples - self.codes.mean.to(device)) / (self.codes.std.to(device) + 1e-5)
            d = torch.cdist(zn.flatten(1), ref.flatten(1)) / math.sqrt(zn[0].numel())  # RMS per dimension
            metrics["sample/nn_rms"] = float(d.min(1).values.mean())
            metrics["sample/mean"] = float(zn.mean())
            metrics["sample/std"] = float(zn.std())
        if self.sample_fn is not None:
            metrics.update(self.sample_fn(samples, labels, step))
        return metrics

    def extra_state(self) -> dict:
        return {"guide": self.guide.state_dict() if self.guide is not None else None, "guide_step": self.guide_step}

    def load_extra_state(self, state: dict) -> None:
        if state.get("guide") is not None:
            self.guide = build_model(self.cfg).eval().requires_grad_(False)
            self.guide.load_state_dict(state["guide"])
            self.guide.to(next(self.modules()[self.cfg.kind].parameters()).device)
            self.guide_step = state.get("guide_step")


class GuideSnapshot(Callback):
    """Keeps a frozen copy of the EMA model as the AutoGuidance guide at the first logged step
    >= `at_step` (so at a multiple of train.log_every)."""
    on_every_rank = True  # every rank samples with the guide in the evaluations

    def __init__(self, task: GeneratorTask, at_step: int):
        self.task, self.at_step, self.trainer = task, at_step, None

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.task.guide is None and step >= self.at_step:
            self.task.guide = copy.deepcopy(unwrap(self.trainer.eval_model)).eval().requires_grad_(False)
            self.task.guide_step = step


# --------------------------------------------------------------------------- public API
def train(cfg: GeneratorRunConfig, callbacks=(), sample_fn: Optional[SampleFn] = None) -> tuple[nn.Module, dict]:
    """Train (resuming from cfg.train.out_dir/checkpoints if present); write out_dir/generator.pt;
    return (EMA model, final metrics)."""
    task = GeneratorTask(cfg, sample_fn)
    cbs = list(callbacks)
    if cfg.kind == "dit" and cfg.sample.guide_fraction > 0:
        cbs.append(GuideSnapshot(task, max(1, round(cfg.sample.guide_fraction * cfg.train.steps))))
    trainer = Trainer(cfg.train, task, cbs)
    model = trainer.fit()
    if trainer.is_main:
        out = Path(cfg.train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
        torch.save({"config": to_dict(cfg), "model": unwrap(model).state_dict(), "step": trainer.step,
                    "guide": task.guide.state_dict() if task.guide is not None else None,
                    "guide_step": task.guide_step, "latent_mean": task.codes.mean, "latent_std": task.codes.std},
                   out / "generator.pt")
    return model, trainer.final_metrics


@dataclass
class LoadedGenerator:
    cfg: GeneratorRunConfig
    model: nn.Module
    guide: Optional[nn.Module]
    latent_mean: Optional[torch.Tensor]
    latent_std: Optional[torch.Tensor]
    step: int

    def sample(self, labels: torch.Tensor, *, seed: int = 0, **overrides) -> torch.Tensor:
        """Tokens (B, L) or de-normalised latents (B, C, h, w); overrides as GeneratorTask.sample."""
        task = GeneratorTask.__new__(GeneratorTask)  # no data needed for sampling
        task.cfg, task.guide = self.cfg, self.guide
        task.codes = CodeSet(torch.empty(0), torch.empty(0), mean=self.latent_mean, std=self.latent_std)
        task.shift = self.cfg.flow.resolve_shift(self.cfg.model.latent_dim) if self.cfg.kind == "dit" else 1.0
        return task.sample(self.model, labels, seed=seed, **overrides)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Load out_dir/generator.pt (or the file itself) written by `train`."""
    path = Path(path)
    if path.is_dir():
        path = path / "generator.pt"
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = from_dict(GeneratorRunConfig, blob["config"], source=str(path))
    model = build_model(cfg)
    model.load_state_dict(blob["model"])
    guide = None
    if blob.get("guide") is not None:
        guide = build_model(cfg)
        guide.load_state_dict(blob["guide"])
        guide = guide.to(device).eval().requires_grad_(False)
    return LoadedGenerator(cfg, model.to(device).eval(), guide, blob.get("latent_mean"), blob.get("latent_std"),
                           blob.get("step", 0))


@cli_errors(ConfigError)  # e.g. codes file / model shape mismatch
def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_cli(GeneratorRunConfig, argv, prog="python -m generators.train")
    with ranks_leave_together():  # under torchrun
        _, metrics = train(cfg)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
