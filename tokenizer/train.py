"""Train a VFMTok / VFMAE tokenizer with the shared loop:

    python -m tokenizer.train tokenizer/configs/tiny.yaml [--set train.steps=100 ...]
    torchrun --nproc_per_node 8 -m tokenizer.train tokenizer/configs/paper.yaml

`TokenizerTask` is the tokenizer's `study.training.TrainTask`: two trainable modules when the
GAN is on, {"model": tokenizer, "disc": DINO-style discriminator}, one loss each.  Everything
else (device, bf16, DDP, EMA, clipping, warmup, checkpoints + exact resume, progress, callbacks)
is `study.training.Trainer`.

Public API for the engine and the generators:
    train(cfg, callbacks=()) -> (model, metrics)      EMA model in eval mode
    load_tokenizer(run_dir) -> model                  EMA weights; VFM rebuilt from the saved spec
    tokenizer.export.export_codes(model, dataset, path)  the generators' `codes.pt` (tokenizer.export)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from study.config import ConfigError, bounded, config_hash, dump_yaml, load, nonsemantic, parse_cli
from study.fidelity import VFMAE, VFMTOK, recipe_deviations
from study.data import DataConfig, build_dataset, make_loader, to_tensor_images
from study.training import (Callback, OptimConfig, StepOutput, Trainer, TrainConfig, TrainTask,
                            ranks_leave_together, seed_everything, unwrap)
from tokenizer.discriminator import DinoDiscriminator
from tokenizer.export import DEFAULT_VIEWS
from tokenizer.losses import (LossConfig, build_perceptual, d_hinge_loss, g_nonsat_loss, perceptual_description,
                              pixel_loss, semantic_loss)
from tokenizer.model import TokenizerConfig, VFMTokenizer
from study.metrics.codebook import codebook_stats
from study.metrics.image import psnr_per_image
from tokenizer.quantizer import compute_latent_stats
from tokenizer.vfm import VFMSpec, build_vfm


def _default_optim() -> OptimConfig:
    # paper: Adam (0.9, 0.95), no weight decay, warmup then constant, clip 1 (tiny-32: lr 2e-4, 200 warmup)
    return OptimConfig(name="adam", lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=200,
                       schedule="constant", grad_clip=1.0)


def _default_disc_optim() -> OptimConfig:
    # paper: the scheduler drives G only; D stays at its lr (no warmup)
    return OptimConfig(name="adam", lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0,
                       schedule="constant", grad_clip=1.0)


@dataclass
class TokenizerRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    vfm: VFMSpec = field(default_factory=lambda: VFMSpec(name="random:vit_tiny_p4"))
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # discriminator backbone: fixed per preset, never the VFM under study (paper: DINO ViT-S/16 at 224)
    disc_vfm: VFMSpec = field(default_factory=lambda: VFMSpec(name="random:vit_micro_p4"))
    optim: OptimConfig = field(default_factory=_default_optim)
    disc_optim: OptimConfig = field(default_factory=_default_disc_optim)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_images: int = bounded(500, ge=1)  # validation images for PSNR / codebook stats
    stats_batches: int = bounded(50, ge=1)  # VFMAE: batches for the per-(channel, position) latent statistics
    # random resize-crop + flip views per training image in the generators' codes (tokenizer.export)
    export_views: int = bounded(DEFAULT_VIEWS, ge=0)
    # filled in automatically: every departure from the paper's method in this run (logged with the config)
    deviations: list[str] = nonsemantic(default_factory=list)
    # filled in automatically: the network the perceptual term is computed with (logged with the config)
    perceptual_network: str = nonsemantic("")

    def __post_init__(self):
        if self.model.image_size != self.data.resolution:
            raise ConfigError(f"model.image_size {self.model.image_size} != data.resolution {self.data.resolution} "
                              "(set both to the same value)", key="model.image_size")
        self.deviations = run_deviations(self)
        self.perceptual_network = perceptual_description(self.loss)

    @property
    def semantic_on(self) -> bool:
        return self.model.semantic and self.loss.semantic_weight > 0


def run_deviations(cfg: TokenizerRunConfig) -> list[str]:
    """Departures from the paper's method that this config implies."""
    out = ["sampling core: pure-PyTorch grid_sample MSDeformAttn (the paper's CUDA op computes the same function)",
           "VFM: built by tokenizer.vfm (weights may be random or in-house; see vfm spec)"]
    m, loss = cfg.model, cfg.loss
    if m.enc_heads != 8:
        out.append(f"deformable offset init: {m.enc_heads} directions (paper: 8 heads -> 8 compass directions)")
    if m.sampler == "grid":
        out.append("ablation: grid sampler (adaptive-avg-pooled VFM grid, no deformable cross-attention)")
    if not cfg.semantic_on:
        out.append("ablation: semantic reconstruction objective off")
    if m.use_kv_cls:
        out.append("KV features + CLS: the final-layer CLS is added to every level (paper: each level's own CLS)")
    if loss.gan_weight > 0:
        out.append("discriminator is not run before gan_start (paper runs it with zero loss; same parameters)")
    else:
        out.append("GAN off (paper: weight 0.5 from step 20k)")
    if m.kind == "vfmtok":
        out.append("causal decoder registers get no gradient (as in the paper's code); a 0-weighted term keeps DDP happy")
    return out + recipe_deviations(VFMTOK if m.kind == "vfmtok" else VFMAE, cfg)


# --------------------------------------------------------------------------- the task
class TokenizerTask(TrainTask):
    def __init__(self, cfg: TokenizerRunConfig):
        self.cfg = cfg
        self.perceptual = build_perceptual(cfg.loss)  # first: a missing weight file fails before any data work
        self.train_set = build_dataset(cfg.data, "train")
        self.val_set = build_dataset(cfg.data, "val")
        self.vfm = build_vfm(cfg.vfm)
        seed_everything(cfg.train.seed)  # the init must not depend on what ran before in this process
        self.model = VFMTokenizer(cfg.model, self.vfm)
        self.disc = DinoDiscriminator(build_vfm(cfg.disc_vfm)) if cfg.loss.gan_weight > 0 else None
        self.gan_start = cfg.loss.gan_start_step(cfg.train.steps)

    def modules(self) -> dict[str, nn.Module]:
        mods = {"model": self.model}
        if self.disc is not None:
            mods["disc"] = self.disc
        return mods

    def optim_config(self, name: str) -> OptimConfig:
        return self.cfg.optim if name == "model" else self.cfg.disc_optim

    def batches(self, start_step: int, rank: int, world: int) -> Iterator:
        return make_loader(self.train_set, self.cfg.train.batch_size, train=True, seed=self.cfg.train.seed,
                           start_step=start_step, rank=rank, world=world)

    def losses(self, model: nn.Module, images: torch.Tensor, disc: nn.Module | None, step: int) -> tuple:
        """Generator loss, its parts, and the reconstruction (shared by `step` and tests)."""
        lc = self.cfg.loss
        out = model(images)
        recon = out["recon"]
        parts = {"pixel": pixel_loss(images, recon, lc)}
        core = unwrap(model)
        gan_on = disc is not None and step >= self.gan_start
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual.to(images.device)(images, recon)
        if self.cfg.semantic_on:
            parts["semantic"] = semantic_loss(out["sem_pred"], out["sem_target"])
        if out["vq"]:
            parts["vq"] = out["vq"]["codebook"] + out["vq"]["commit"]
        weights = {"pixel": lc.pixel_weight, "perceptual": lc.perceptual_weight, "semantic": lc.semantic_weight,
                   "vq": lc.vq_weight}
        total = sum(weights[k] * v for k, v in parts.items())
        if gan_on:
            # G's adversarial term goes through the *unwrapped* disc: only D's own loss is DDP-synchronised;
            # the disc grads this leaves behind are cleared by D's zero_grad before its backward.
            logits = unwrap(disc)(recon)
            parts["gan_g"] = g_nonsat_loss(logits)
            total = total + lc.gan_weight * parts["gan_g"]
        if self.cfg.model.kind == "vfmtok":
            total = total + core.decoder.unused_anchor()
        return total, parts, out

    def step(self, modules: dict[str, nn.Module], batch, step: int) -> StepOutput:
        images = batch[0].to(next(self.model.parameters()).device, non_blocking=True)
        disc = modules.get("disc")
        total, parts, out = self.losses(modules["model"], images, disc, step)
        losses = {"model": total}
        metrics = {f"loss_parts/{k}": v.detach() for k, v in parts.items()}
        if disc is not None:
            losses["disc"] = None
            if step >= self.gan_start:
                # one forward (one DDP reduction); real and fake are normalised separately
                real_logits, fake_logits = disc(torch.cat([images, out["recon"].detach()]), sets=2).chunk(2)
                losses["disc"] = self.cfg.loss.gan_weight * d_hinge_loss(real_logits, fake_logits)
                metrics["disc/logits_real"] = real_logits.detach().float().mean()
                metrics["disc/logits_fake"] = fake_logits.detach().float().mean()
        with torch.no_grad():
            metrics["train/psnr"] = psnr_per_image(images, out["recon"]).mean()
            if "ids" in out:
                batch = codebook_stats(out["ids"], self.cfg.model.codebook_size)
                metrics.update({"codebook/batch_usage": batch["usage"], "codebook/batch_perplexity": batch["perplexity"]})
                metrics.update({f"codebook/{k}": v for k, v in unwrap(modules["model"]).quantizer.usage_stats().items()})
        return StepOutput(losses=losses, metrics=metrics)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return evaluate_tokenizer(model, self.val_set, self.cfg.eval_images)


@torch.no_grad()
def evaluate_tokenizer(model: nn.Module, dataset, n_images: int, batch_size: int = 100) -> dict[str, float]:
    """Validation PSNR (dB) and, for VFMTok, codebook usage / perplexity of the val ids."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = to_tensor_images(dataset.images[:n_images])
    psnrs, ids = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        codes = model.encode(x)
        psnrs.append(psnr_per_image(x, model.decode(codes)).cpu())
        if codes.dtype == torch.long:
            ids.append(codes.cpu())
    metrics = {"val/psnr": float(torch.cat(psnrs).mean())}
    if ids:
        stats = codebook_stats(torch.cat(ids), model.cfg.codebook_size)
        metrics.update({"val/codebook_usage": stats["usage"], "val/perplexity": stats["perplexity"]})
    model.train(was_training)
    return metrics


# --------------------------------------------------------------------------- public API
def train(cfg: TokenizerRunConfig, callbacks: Sequence[Callback] = ()) -> tuple[VFMTokenizer, dict]:
    """Train (or resume) in cfg.train.out_dir; returns the EMA model (eval mode) and final metrics."""
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out_dir / "config.yaml")
    task = TokenizerTask(cfg)
    trainer = Trainer(cfg.train, task, list(callbacks))
    model = trainer.fit().eval()
    metrics = dict(trainer.final_metrics)
    model.tokenizer_id = tokenizer_id(cfg)
    if cfg.model.kind == "vfmae" and trainer.is_main:
        loader = make_loader(task.train_set, cfg.train.batch_size, train=False, seed=cfg.train.seed, start_step=0,
                             rank=0, world=1)
        mean, std = compute_latent_stats(model, loader, cfg.stats_batches)
        torch.save({"mean": mean, "std": std}, out_dir / "latent_stats.pt")
        model.latent_stats = (mean, std)
    return model, metrics


def tokenizer_id(cfg: TokenizerRunConfig) -> str:
    return f"{cfg.model.kind}-{cfg.vfm.name.replace(':', '_')}-{config_hash(cfg)}"


def load_tokenizer(run_dir: str | Path, map_location: str | torch.device = "cpu") -> VFMTokenizer:
    """The EMA tokenizer of a run directory (config.yaml + checkpoints/last.pt); the frozen VFM is
    rebuilt from the saved spec, never read from the checkpoint."""
    run_dir = Path(run_dir)
    cfg = load(TokenizerRunConfig, run_dir / "config.yaml")
    model = VFMTokenizer(cfg.model, build_vfm(cfg.vfm))
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state["ema"] if state.get("ema") is not None else state["modules"]["model"])
    model.tokenizer_id = tokenizer_id(cfg)
    stats = run_dir / "latent_stats.pt"
    if stats.exists():
        s = torch.load(stats, map_location="cpu", weights_only=True)
        model.latent_stats = (s["mean"], s["std"])
    return model.eval().to(map_location)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(TokenizerRunConfig, argv, prog="python -m tokenizer.train")
    with ranks_leave_together():  # under torchrun
        _, metrics = train(cfg)
    print({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})


if __name__ == "__main__":
    main(sys.argv[1:])
