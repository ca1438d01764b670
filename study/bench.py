"""The scale questions in one call:

    python -m study.bench gpu --out FILE.json [--cpu-small]
    python -m study.bench engine [--cells 1000] [--no-tracking] [--out FILE.json]   (study/bench_engine.py)

Writes one JSON object with, per item, what was measured and at which sizes:
  tokenizer_paper, tokenizer_base   training images/s through the shared Trainer (bf16 autocast on
                                    CUDA, GAN on) and MFU = achieved FLOP/s / the device's peak
  data_loader                       streamed ImageFolder (JPEG files) images/s per worker
  gpt_sampling                      GPT-B, 256 tokens, CFG (doubled batch): images/s
  dit_sampling                      DiT-DH-XL, Euler with CFG: images/s at the recipe's 99 steps
  inception_50k                     the FID feature pass (torch-fidelity InceptionV3) over 50k images, s
  vfm_forward                       frozen DINOv2-L/14-reg levels at 336 px: images/s
Models are real architectures at random init (speed does not depend on the weights).  FLOPs come
from torch.utils.flop_counter (ops without a FLOP formula, e.g. grid_sample, count zero).  On CUDA
the sizes are the paper's; `--cpu-small` (or no CUDA) shrinks every item so the whole command takes
about two minutes on a laptop-class CPU; the JSON says which.  An item that fails records its
error and the others still run.  Each item times a few seconds of work after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense bf16 tensor-core peak per device (FLOP/s), matched against torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
INCEPTION_PROTOCOL_IMAGES = 50_000
DIT_RECIPE_STEPS = 99  # Euler over 100 time points


@dataclass
class Sizes:
    """What each item runs; `full` on CUDA, `cpu_small` otherwise."""
    name: str
    tokenizer_batch: dict[str, int]
    tokenizer_steps: int  # the second half is timed
    paper_overrides: tuple[str, ...]
    loader_files: int
    loader_batch: int
    loader_steps: int
    loader_workers: int
    gpt_preset: str
    gpt_grid: tuple[int, int]
    gpt_batch: int
    dit_preset: str
    dit_batch: int
    dit_steps: int
    inception_images: int
    inception_batch: int
    vfm_input: int
    vfm_batch: int
    vfm_repeats: int


FULL = Sizes(name="full", tokenizer_batch={"paper": 32, "base": 256}, tokenizer_steps=12, paper_overrides=(),
             loader_files=2000, loader_batch=64, loader_steps=30, loader_workers=8, gpt_preset="B",
             gpt_grid=(16, 16), gpt_batch=256, dit_preset="DH-XL", dit_batch=64, dit_steps=8,
             inception_images=10_000, inception_batch=500, vfm_input=336, vfm_batch=128, vfm_repeats=5)
# the paper preset at 112 px (8x8 VFM grid, 64 queries) and small models elsewhere
CPU_SMALL = Sizes(name="cpu_small", tokenizer_batch={"paper": 1, "base": 8}, tokenizer_steps=4,
                  paper_overrides=("data.resolution=112", "model.image_size=112", "vfm.input_size=112",
                                   "model.num_queries=64"),
                  loader_files=200, loader_batch=16, loader_steps=6, loader_workers=2, gpt_preset="tiny",
                  gpt_grid=(8, 8), gpt_batch=4, dit_preset="DH-tiny", dit_batch=4, dit_steps=2,
                  inception_images=16, inception_batch=8, vfm_input=112, vfm_batch=2, vfm_repeats=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Mean wall time of fn after one untimed warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def peak_flops(device: torch.device) -> tuple[Optional[float], str]:
    if device.type != "cuda":
        return None, "cpu (no peak defined: MFU not computed)"
    name = torch.cuda.get_device_name(device)
    match = next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
    return match, name


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# --------------------------------------------------------------------------- items
def tokenizer_training(preset: str, sizes: Sizes, device: torch.device) -> dict:
    from study.config import load
    from study.training import Trainer
    from tokenizer.train import TokenizerRunConfig, TokenizerTask

    batch, steps = sizes.tokenizer_batch[preset], sizes.tokenizer_steps
    with tempfile.TemporaryDirectory() as tmp:
        # procedural images at the preset's resolution and random-init backbones stand in for
        # ImageNet and the published weights: same shapes, same FLOPs
        overrides = ["data.name=shapes", "data.num_classes=10", "data.augment=false", f"data.train_size={max(4 * batch, 10)}",
                     "data.val_size=10", "eval_images=10", f"train.batch_size={batch}", f"train.steps={steps}",
                     f"train.log_every={steps // 2}", f"train.ckpt_every={10 ** 9}", "train.eval_every=0",
                     "train.progress=false", f"train.device={device.type}", f"train.out_dir={tmp}/run",
                     "loss.gan_start=0", "vfm.pretrained=false"]
        if preset == "paper":
            overrides += ["disc_vfm.pretrained=false", f"loss.lpips_vgg={random_vgg16_file(tmp)}",
                          *sizes.paper_overrides]
        cfg = load(TokenizerRunConfig, Path(__file__).parents[1] / "tokenizer" / "configs" / f"{preset}.yaml", overrides)
        trainer = Trainer(cfg.train, TokenizerTask(cfg))
        flops = training_step_flops(trainer)
        trainer.fit()
    rate = trainer.last_metrics["throughput/samples_per_s"]
    peak, device_name = peak_flops(device)
    achieved = flops / batch * rate
    return {"batch": batch, "image_size": cfg.model.image_size, "vfm": cfg.vfm.name, "vfm_input": cfg.vfm.input_size,
            "timed_steps": steps - steps // 2, "images_per_s": round(rate, 2),
            "gflop_per_image": round(flops / batch / 1e9, 2), "achieved_tflop_s": round(achieved / 1e12, 3),
            "mfu": round(achieved / peak, 4) if peak else None, "peak_device": device_name,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}


def random_vgg16_file(folder: str) -> Path:
    """A random-init torchvision VGG16 state dict: LPIPS costs the same FLOPs with it as with the
    ImageNet weights, which are not on a benchmark machine."""
    import torchvision

    path = Path(folder) / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


def training_step_flops(trainer) -> float:
    """FLOPs of one training step (forward + every backward) of the trainer's task."""
    task = trainer.task
    batch = next(iter(task.batches(0, 0, 1)))
    with FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            out = task.step(trainer.wrapped, batch, step=0)
        for loss in out.losses.values():
            if loss is not None:
                loss.backward()
    for module in trainer.modules.values():
        module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def data_loader(sizes: Sizes, device: torch.device) -> dict:
    from study.data.bench import stream_rate, write_imagenet_like

    root = write_imagenet_like(Path(tempfile.gettempdir()) / f"vfmstudy-bench-jpegs-{sizes.loader_files}",
                               sizes.loader_files, distinct=min(sizes.loader_files, 200),
                               processes=sizes.loader_workers)
    result = stream_rate(root, steps=sizes.loader_steps, batch=sizes.loader_batch, workers=sizes.loader_workers,
                         resolution=336)
    return {**result, "transform": "ADM random resize-crop + flip of the full JPEG, 336 px"}


def gpt_sampling(sizes: Sizes, device: torch.device) -> dict:
    from generators.gpt import GPT, GPT_B, GPT_tiny
    from generators.sampling import generate

    preset = {"B": GPT_B, "tiny": GPT_tiny}[sizes.gpt_preset]
    with torch.device(device):
        model = GPT(preset(vocab_size=16384, grid=sizes.gpt_grid, num_classes=1000)).eval()
        labels = torch.randint(0, 1000, (sizes.gpt_batch,))

    def sample():
        with torch.no_grad(), autocast(device):
            return generate(model, labels, cfg_scale=1.5, seed=0)

    seconds = seconds_per_call(sample, device)
    return {"model": f"GPT-{sizes.gpt_preset}", "tokens": sizes.gpt_grid[0] * sizes.gpt_grid[1],
            "batch": sizes.gpt_batch, "cfg": "scale 1.5, doubled batch", "seconds_per_batch": round(seconds, 3),
            "images_per_s": round(sizes.gpt_batch / seconds, 2)}


def dit_sampling(sizes: Sizes, device: torch.device) -> dict:
    from generators.dit import DIT_PRESETS, DiT
    from generators.flow import sample_ode

    with torch.device(device):
        model = DiT(DIT_PRESETS[sizes.dit_preset](in_channels=32, grid=(16, 16), num_classes=1000)).eval()
        noise = torch.randn(sizes.dit_batch, 32, 16, 16)
        labels = torch.randint(0, 1000, (sizes.dit_batch,))

    def sample():
        with torch.no_grad(), autocast(device):
            return sample_ode(model, noise, labels, null_class=model.null_class, steps=sizes.dit_steps, scale=1.5)

    seconds = seconds_per_call(sample, device)
    per_step = seconds / sizes.dit_steps
    return {"model": f"DiT-{sizes.dit_preset}", "latent": [32, 16, 16], "batch": sizes.dit_batch,
            "guidance": "CFG scale 1.5, doubled batch", "timed_steps": sizes.dit_steps,
            "seconds_per_step": round(per_step, 4),
            "images_per_s_at_99_steps": round(sizes.dit_batch / (per_step * DIT_RECIPE_STEPS), 4),
            "note": "images/s at the recipe's 99 Euler steps, from the measured time per step"}


def inception_pass(sizes: Sizes, device: torch.device) -> dict:
    from study.metrics.fid import InceptionConfig, InceptionExtractor, random_inception_weights

    images = torch.randint(0, 256, (sizes.inception_images, 3, 256, 256), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_inception_weights(Path(tmp) / "inception_random.pth", calib_images=2)
        cfg = InceptionConfig(batch_size=sizes.inception_batch, device=device.type)
        extractor = InceptionExtractor(cfg, weights)
    extractor(images[:sizes.inception_batch])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    extractor(images)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"measured_images": sizes.inception_images, "batch": sizes.inception_batch, "input": "uint8 256 px",
            "measured_s": round(seconds, 3), "images_per_s": round(sizes.inception_images / seconds, 1),
            "seconds_for_50k": round(seconds * INCEPTION_PROTOCOL_IMAGES / sizes.inception_images, 2),
            "note": "study.metrics.fid.InceptionExtractor (fp32, batches copied to the device); 50k by scaling"}


def vfm_forward(sizes: Sizes, device: torch.device) -> dict:
    from tokenizer.vfm import VFMSpec, build_vfm

    vfm = build_vfm(VFMSpec("dinov2_vitl14_reg", pretrained=False, input_size=sizes.vfm_input)).to(device)
    images = torch.rand(sizes.vfm_batch, 3, sizes.vfm_input, sizes.vfm_input, device=device) * 2 - 1

    def forward():
        with torch.no_grad(), autocast(device):
            return vfm.levels(images)

    seconds = seconds_per_call(forward, device, sizes.vfm_repeats)
    return {"model": "dinov2_vitl14_reg (random init)", "input": sizes.vfm_input, "grid": list(vfm.grid),
            "batch": sizes.vfm_batch, "images_per_s": round(sizes.vfm_batch / seconds, 2),
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}


ITEMS: dict[str, Callable[[Sizes, torch.device], dict]] = {
    "tokenizer_paper": lambda sizes, device: tokenizer_training("paper", sizes, device),
    "tokenizer_base": lambda sizes, device: tokenizer_training("base", sizes, device),
    "data_loader": data_loader,
    "gpt_sampling": gpt_sampling,
    "dit_sampling": dit_sampling,
    "inception_50k": inception_pass,
    "vfm_forward": vfm_forward,
}


def run_all(sizes: Sizes, device: torch.device, only: Optional[list[str]] = None) -> dict:
    report = {"sizes": asdict(sizes), "device": peak_flops(device)[1], "torch": torch.__version__,
              "host": platform.node(), "cpu_threads": torch.get_num_threads(), "items": {}}
    start = time.perf_counter()
    for name, item in ITEMS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            report["items"][name] = item(sizes, device)
        except Exception as err:  # one broken item must not hide the others' figures
            report["items"][name] = {"error": f"{type(err).__name__}: {err}",
                                     "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
        report["items"][name]["wall_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(name, json.dumps(report["items"][name]), flush=True)
    report["total_wall_s"] = round(time.perf_counter() - start, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m study.bench")
    parser.add_argument("suite", choices=["gpu", "engine"])
    parser.add_argument("--out", help="JSON file to write (required for gpu)")
    parser.add_argument("--cells", type=int, default=1000, help="engine: trivial cells in the sweep")
    parser.add_argument("--no-tracking", action="store_true", help="engine: without MLflow")
    parser.add_argument("--cpu-small", action="store_true", help="reduced sizes on the CPU, even with CUDA present")
    parser.add_argument("--only", action="append", choices=sorted(ITEMS), help="run only these items")
    args = parser.parse_args(argv)
    if args.suite == "engine":
        from study.bench_engine import engine_overhead
        report = engine_overhead(args.cells, tracking=not args.no_tracking)
        print(json.dumps(report))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return
    if not args.out:
        parser.error("gpu: --out FILE.json is required")
    use_cuda = torch.cuda.is_available() and not args.cpu_small
    device = torch.device("cuda" if use_cuda else "cpu")
    report = run_all(FULL if use_cuda else CPU_SMALL, device, args.only)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
