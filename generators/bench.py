"""Throughput of the generators: `python -m generators.bench [--sizes tiny,B] [--device cpu|cuda] [--batch 8]`.

GPT: sampled sequences/s with the static KV cache vs full recomputation (and the ratio), and
training tokens/s (forward + backward + AdamW).  DiT: sampled latents/s (Euler, `--dit-steps`)
and training latents/s.  Sizes: "tiny" = method §7 tiny, "B" = GPT-B / DiT-DH-S widths on the
tiny 8x8 grid (B-ish: the real model on a small grid, so it fits a CPU run).
"""

from __future__ import annotations

import argparse
import time

import torch

from generators.dit import DiT, DiTDH_S, DiTDH_tiny
from generators.flow import flow_loss, sample_ode
from generators.gpt import GPT, GPT_B, GPT_tiny
from generators.sampling import generate

GPT_SIZES = {"tiny": GPT_tiny, "B": GPT_B}
DIT_SIZES = {"tiny": DiTDH_tiny, "B": DiTDH_S}


def _time(fn, device, repeats: int = 1) -> float:
    fn()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench_gpt(size: str, device, batch: int, grid: int, dtype, compile: bool) -> dict:
    cfg = GPT_SIZES[size](vocab_size=512, grid=(grid, grid), num_classes=10)
    model = GPT(cfg).to(device)
    labels = torch.arange(batch, device=device) % 10
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with amp:
        cached = _time(lambda: generate(model, labels, cfg_scale=1.5, seed=0, compile=compile), device)
        full = _time(lambda: generate(model, labels, cfg_scale=1.5, seed=0, use_cache=False), device)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    tokens = torch.randint(0, 512, (batch, cfg.seq_len), device=device)
    model.train()

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1], labels).flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = _time(step, device, repeats=3)
    return {"model": f"GPT-{size}", "params_M": model.num_params() / 1e6,
            "sample_per_s_cache": batch / cached, "sample_per_s_nocache": batch / full,
            "cache_speedup": full / cached, "train_tokens_per_s": batch * cfg.seq_len / train_s}


def bench_dit(size: str, device, batch: int, grid: int, dtype, steps: int) -> dict:
    cfg = DIT_SIZES[size](in_channels=8, grid=(grid, grid), num_classes=10)
    model = DiT(cfg).to(device).eval()
    labels = torch.arange(batch, device=device) % 10
    noise = torch.randn(batch, 8, grid, grid, device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with amp:
        sample_s = _time(lambda: sample_ode(model, noise, labels, null_class=10, steps=steps, scale=1.5), device)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    model.train()

    def step():
        with amp:
            loss = flow_loss(model, noise, labels, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = _time(step, device, repeats=3)
    return {"model": f"DiT-DH-{size}", "params_M": model.num_params() / 1e6, "sample_per_s": batch / sample_s,
            "train_latents_per_s": batch / train_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m generators.bench")
    parser.add_argument("--sizes", default="tiny,B")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--dit-steps", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="torch.compile the GPT decode step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    print(f"device={device} batch={args.batch} grid={args.grid}x{args.grid} (CFG 1.5: batch doubled) "
          f"dtype={'bf16' if dtype else 'fp32'} threads={torch.get_num_threads()}")
    print(f"{'model':<12}{'params M':>10}{'seq/s cache':>13}{'seq/s full':>12}{'ratio':>8}{'train tok/s':>13}")
    for size in args.sizes.split(","):
        r = bench_gpt(size, device, args.batch, args.grid, dtype, args.compile)
        print(f"{r['model']:<12}{r['params_M']:>10.1f}{r['sample_per_s_cache']:>13.2f}{r['sample_per_s_nocache']:>12.2f}"
              f"{r['cache_speedup']:>7.1f}x{r['train_tokens_per_s']:>13.0f}")
    print(f"{'model':<12}{'params M':>10}{'latents/s':>13}{'train lat/s':>13}   (Euler {args.dit_steps} steps)")
    for size in args.sizes.split(","):
        r = bench_dit(size, device, args.batch, args.grid, dtype, args.dit_steps)
        print(f"{r['model']:<12}{r['params_M']:>10.1f}{r['sample_per_s']:>13.2f}{r['train_latents_per_s']:>13.1f}")


if __name__ == "__main__":
    main()
