"""Tokenizer measurements (not tests: they take minutes).

    python -m tokenizer.bench --psnr [--config tokenizer/configs/tiny.yaml] [--set train.steps=300 ...]
        train a preset on the procedural shapes and compare its validation PSNR with the
        per-class mean-image baseline (each val image predicted by its class's mean train image)
    python -m tokenizer.bench --speed [--config ...] [--steps 10]
        training images/s through the shared Trainer (tiny on CPU; base on GPU when present)
    python -m tokenizer.bench --paper-step
        the `paper` preset (336 px, random-init DINOv2-L/14-reg at 336) builds and runs one
        forward/backward (batch 1, all losses incl. GAN) on CPU: parameters and peak memory
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from study.config import load
from study.data import DataConfig, build_dataset
from study.metrics import image as image_metrics
from tokenizer.train import TokenizerRunConfig, TokenizerTask, train

CONFIGS = Path(__file__).parent / "configs"


def class_mean_psnr(data: DataConfig) -> float:
    """PSNR of predicting every validation image by the mean training image of its class."""
    tr, va = build_dataset(data, "train"), build_dataset(data, "val")
    return image_metrics.class_mean_psnr(tr.images, tr.labels, va.images, va.labels)


def psnr_bench(config: str | Path, overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(TokenizerRunConfig, config, [f"train.out_dir={tmp}/run", "train.progress=false", *overrides])
        t0 = time.perf_counter()
        _, metrics = train(cfg)
        wall = time.perf_counter() - t0
    baseline = class_mean_psnr(cfg.data)
    return {"config": str(config), "overrides": list(overrides), "steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size, "val_psnr": metrics["val/psnr"], "class_mean_psnr": baseline,
            "gain_db": metrics["val/psnr"] - baseline, "wall_s": wall, "threads": torch.get_num_threads(),
            **{k: v for k, v in metrics.items() if k.startswith("val/")}}


def speed_bench(config: str | Path, steps: int, overrides: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(TokenizerRunConfig, config, [f"train.out_dir={tmp}/run", "train.progress=false",
                                                f"train.steps={steps}", f"train.log_every={max(1, steps // 2)}",
                                                f"train.ckpt_every={10 ** 9}", "loss.gan_start=0",
                                                "eval_images=10", *overrides])
        _, metrics = train(cfg)
    device = "cuda" if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda") else "cpu"
    return {"config": str(config), "device": device, "batch_size": cfg.train.batch_size,
            "images_per_s": metrics["throughput/samples_per_s"], "note": "second half of the steps, GAN on"}


def paper_step(config: str | Path = CONFIGS / "paper.yaml") -> dict:
    """One forward/backward of the paper preset at batch 1 on CPU (GAN and all losses on)."""
    # offline stand-ins for what the preset needs at real scale: procedural data at 336 px and
    # random-init backbones (same architectures) instead of the DINOv2-L / DINO-S weights
    cfg = load(TokenizerRunConfig, config, ["data.name=shapes", "data.num_classes=10", "data.augment=false",
                                            "data.train_size=10", "data.val_size=10", "train.batch_size=1",
                                            "train.device=cpu", "vfm.pretrained=false", "disc_vfm.pretrained=false",
                                            "loss.perceptual=random_vgg"])
    t0 = time.perf_counter()
    task = TokenizerTask(cfg)
    build_s = time.perf_counter() - t0
    model = task.model
    x = torch.rand(1, 3, cfg.model.image_size, cfg.model.image_size) * 2 - 1
    t0 = time.perf_counter()
    total, parts, out = task.losses(model, x, task.disc, step=10 ** 9)
    total.backward()
    fb_s = time.perf_counter() - t0
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"image_size": cfg.model.image_size, "vfm": cfg.vfm.name, "vfm_input": model.vfm.input_size,
            "vfm_grid": list(model.vfm.grid), "tokens": cfg.model.num_queries,
            "recon_shape": list(out["recon"].shape), "semantic_pred_shape": list(out["sem_pred"].shape),
            "tokenizer_params_M": count(model) / 1e6, "vfm_params_M": count(model.vfm) / 1e6,
            "disc_trainable_params_M": count(task.disc) / 1e6 if task.disc else 0.0,
            "disc_backbone_params_M": count(task.disc.backbone) / 1e6 if task.disc else 0.0,
            "losses": {k: float(v.detach()) for k, v in parts.items()},
            "build_s": build_s, "fwd_bwd_s": fb_s,
            "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.bench")
    parser.add_argument("--psnr", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--paper-step", action="store_true")
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    if args.psnr:
        print(json.dumps(psnr_bench(args.config or CONFIGS / "tiny.yaml", args.overrides), indent=1))
    if args.speed:
        default = "base.yaml" if torch.cuda.is_available() else "tiny.yaml"
        print(json.dumps(speed_bench(args.config or CONFIGS / default, args.steps, args.overrides), indent=1))
    if args.paper_step:
        print(json.dumps(paper_step(args.config or CONFIGS / "paper.yaml"), indent=1))


if __name__ == "__main__":
    main()
