"""Throughput of the generators: `python -m generators.bench [--sizes tiny,B] [--device cpu|cuda] [--batch 8]`.

GPT: sampled sequences/s with the static KV cache vs full recomputation (and the ratio), and
training tokens/s (forward + backward + AdamW).  DiT: sampled latents/s (Euler, `--dit-steps`)
and training latents/s.  Sizes: "tiny" = the tiny preset, "B" = GPT-B / DiT-DH-S widths on the
tiny 8x8 grid (B-ish: the real model on a small grid, so it fits a CPU run).

`python -m generators.bench --vs-llamagen [--pairs 5] [--threads 2] [--rows "64 tokens"] [--batches 8]`:
our sampler and GPT training step side by side with LlamaGen's algorithms (re-implemented below, run
on the same weights), in alternating pairs on the CPU; prints medians, the median per-pair ratio and
the load average before and after each row (the GPT-B rows take minutes each on two threads).
`--rows` (repeatable) keeps the rows whose name starts with it, e.g. "GPT-B, 256" or "GPT-B train".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from generators.dit import DiT, DiTDH_S, DiTDH_tiny
from generators.flow import flow_loss, sample_ode
from generators.gpt import GPT, GPT_B, GPT_tiny
from generators.layers import find_multiple
from generators.sampling import generate


# --------------------------------------------------------------------------- LlamaGen's algorithm
# A re-implementation of LlamaGen's c2i GPT forward and gpt-fast-style sampler, op for op, running on
# the weights of a generators.gpt.GPT (same parameter layout), so that both sides share weights.
def _ll_rmsnorm(x: torch.Tensor, norm) -> torch.Tensor:
    y = x.float()
    return (y * torch.rsqrt(torch.mean(y * y, dim=-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight


def _ll_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh), freqs (T, Dh/2, 2): rotation in the (B, T, H, Dh) layout."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs = freqs.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * freqs[..., 0] - xs[..., 1] * freqs[..., 1],
                       xs[..., 1] * freqs[..., 0] + xs[..., 0] * freqs[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def _ll_attention(attn, x, freqs, input_pos, mask, cache, training: bool):
    B, T, D = x.shape
    q, k, v = attn.wqkv(x).split([D, D, D], dim=-1)
    q, k, v = (t.view(B, T, attn.heads, attn.head_dim) for t in (q, k, v))
    q, k = _ll_rotary(q, freqs), _ll_rotary(k, freqs)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if cache is not None:  # index-put into the static cache, attend over all of it under the mask
        cache[0][:, :, input_pos], cache[1][:, :, input_pos] = k, v
        k, v = cache
    k, v = k.repeat_interleave(1, dim=1), v.repeat_interleave(1, dim=1)  # grouped-query expansion (1 group)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       dropout_p=attn.attn_dropout if training else 0.0)
    y = y.transpose(1, 2).contiguous().view(B, T, D)
    return F.dropout(attn.wo(y), attn.resid_drop.p, training)


def _ll_forward(model: GPT, idx, cond_idx, input_pos=None, caches=None, causal_mask=None) -> torch.Tensor:
    """LlamaGen Transformer.forward: training/full pass when both idx and cond_idx are given,
    else one cached step (prefill with cond_idx, decode with idx)."""
    training, cfg = model.training, model.cfg
    if idx is not None and cond_idx is not None:
        if training:
            drop = torch.rand(cond_idx.shape[0], device=cond_idx.device) < cfg.class_dropout
            cond_idx = torch.where(drop, cfg.num_classes, cond_idx)
        h = torch.cat([model.cls_emb(cond_idx).unsqueeze(1), model.tok_emb(idx)], dim=1)
        mask, freqs = None, model.rope[:h.shape[1]]
    else:
        h = model.cls_emb(cond_idx).unsqueeze(1) if cond_idx is not None else model.tok_emb(idx)
        mask, freqs = causal_mask[:h.shape[0], None, input_pos], model.rope[input_pos]
    h = F.dropout(h, cfg.token_dropout, training)
    for i, block in enumerate(model.blocks):
        h = h + _ll_attention(block.attn, _ll_rmsnorm(h, block.attn_norm), freqs, input_pos, mask,
                              None if caches is None else caches[i], training)
        ffn, x = block.ffn, _ll_rmsnorm(h, block.ffn_norm)
        h = h + F.dropout(ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x)), ffn.drop.p, training)
    return model.head(_ll_rmsnorm(h, model.norm)).float()


def _ll_filter(logits, top_k: int, top_p: float):
    """Top-k then nucleus filtering in place, as LlamaGen's top_k_top_p_filtering."""
    if top_k > 0:
        logits[logits < torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, order, remove)] = float("-inf")
    return logits


def _ll_sample(logits, temperature, top_k, top_p):
    logits = logits[:, -1, :] / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = _ll_filter(logits, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    idx = torch.multinomial(probs, 1) if temperature > 0 else torch.topk(probs, k=1, dim=-1)[1]
    return idx, probs


def _ll_guided_sample(logits, cfg_scale, guide: bool, **sampling):
    if cfg_scale > 1.0:
        cond, uncond = torch.split(logits, len(logits) // 2, dim=0)
        logits = uncond + (cond - uncond) * cfg_scale if guide else cond
    return _ll_sample(logits, **sampling)


@torch.no_grad()
def llamagen_generate(model: GPT, labels: torch.Tensor, *, cfg_scale: float = 1.0, cfg_interval: int = -1,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """LlamaGen's c2i `generate` (prefill, then `decode_n_tokens`); temperature 0 = its greedy
    `sample_logits=False`.  Seed with torch.manual_seed: it draws from the global generator."""
    model.eval()
    with torch.device(labels.device):  # LlamaGen allocates its caches and positions there
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        B, L, cfg = labels.shape[0], model.cfg.seq_len, model.cfg
        cond = torch.cat([labels, torch.ones_like(labels) * model.null_class]) if cfg_scale > 1.0 else labels
        rows, S = cond.shape[0], find_multiple(1 + L, 8)
        dtype = model.tok_emb.weight.dtype
        caches = [(torch.zeros(rows, cfg.heads, S, cfg.head_dim, dtype=dtype),
                   torch.zeros(rows, cfg.heads, S, cfg.head_dim, dtype=dtype)) for _ in model.blocks]
        causal_mask = torch.tril(torch.ones(S, S, dtype=torch.bool)).unsqueeze(0).repeat(rows, 1, 1)
        seq = torch.empty(B, 1 + L, dtype=torch.int)
        logits = _ll_forward(model, None, cond, torch.arange(0, 1), caches, causal_mask)
        token = _ll_guided_sample(logits, cfg_scale, True, **sampling)[0]
        seq[:, 1:2] = token
        input_pos, new_tokens, new_probs = torch.tensor([1], dtype=torch.int), [], []
        for i in range(L - 1):
            x = torch.cat([token, token]) if cfg_scale > 1.0 else token
            logits = _ll_forward(model, x, None, input_pos, caches, causal_mask)
            guide = not (cfg_interval > -1 and i > cfg_interval)
            token, probs = _ll_guided_sample(logits, cfg_scale, guide, **sampling)
            input_pos += 1
            new_tokens.append(token.clone())
            new_probs.append(probs.clone())
            token = token.view(-1, 1)
        seq[:, 2:] = torch.cat(new_tokens, dim=1)
        return seq[:, 1:]


def llamagen_loss(model: GPT, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LlamaGen's training loss: model(cond_idx, idx=tokens[:, :-1], targets=tokens)."""
    logits = _ll_forward(model, tokens[:, :-1], labels)
    return F.cross_entropy(logits.contiguous().view(-1, logits.size(-1)), tokens.view(-1))

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


# --------------------------------------------------------------------------- side by side with LlamaGen
SIDE_BY_SIDE = [  # (row, preset, grid side, vocabulary, batches): what the sampler is compared on
    ("64 tokens", "tiny", 8, 512, (8, 32)),
    ("256 tokens, vocab 16k", "tiny", 16, 16384, (8, 32)),
    ("GPT-B, 64 tokens, vocab 16k", "B", 8, 16384, (8, 32)),
    ("GPT-B, 256 tokens, vocab 16k", "B", 16, 16384, (8, 32)),
]


def random_gpt(size: str, grid: int, vocab: int, num_classes: int = 10) -> GPT:
    """A seeded GPT whose zero-initialised head is replaced by a random one (else every logit is 0)."""
    torch.manual_seed(0)
    model = GPT(GPT_SIZES[size](vocab_size=vocab, grid=(grid, grid), num_classes=num_classes))
    nn.init.normal_(model.head.weight, std=0.02)
    return model.eval()


def alternating_pairs(ours, theirs, pairs: int) -> dict:
    """Median wall times of `pairs` back-to-back (ours, theirs) runs after one warm-up each; the order
    flips every pair so that drifting machine load falls on both sides. ratio: median of theirs/ours."""
    ours(), theirs()
    times: dict = {ours: [], theirs: []}
    for i in range(pairs):
        for fn in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return {"ours_ms": 1e3 * statistics.median(times[ours]), "theirs_ms": 1e3 * statistics.median(times[theirs]),
            "ratio": statistics.median(t / o for o, t in zip(times[ours], times[theirs]))}


def compare_sampling(size: str, grid: int, vocab: int, batch: int, pairs: int, **sampling) -> dict:
    model = random_gpt(size, grid, vocab)
    labels = torch.arange(batch) % 10
    return alternating_pairs(lambda: generate(model, labels, seed=0, **sampling),
                             lambda: llamagen_generate(model, labels, **sampling), pairs)


def compare_train_step(batch: int, grid: int, pairs: int) -> dict:
    """One GPT-B step (loss, backward, fused AdamW) on a vocab-16k grid: ours against LlamaGen's forward."""
    model = random_gpt("B", grid, 16384, num_classes=1000).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=True)
    tokens, labels = torch.randint(0, 16384, (batch, grid * grid)), torch.arange(batch)

    def step(loss_fn) -> None:
        loss = loss_fn(model, tokens, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return alternating_pairs(lambda: step(gpt_loss), lambda: step(llamagen_loss), pairs)


def gpt_loss(model: GPT, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Our training loss, as generators.train computes it."""
    return F.cross_entropy(model(tokens[:, :-1], labels).flatten(0, 1), tokens.flatten())


def _load() -> str:
    """The 1-minute load average: timings from a shared machine are read against it."""
    return f"load {os.getloadavg()[0]:.1f}"


def _table_row(name: str, batch: int, measure) -> None:
    before = _load()
    r = measure()
    print(f"{name:<30}{batch:>6}{r['ours_ms']:>10.0f}{r['theirs_ms']:>13.0f}{r['ratio']:>7.2f}x"
          f"   {before} / {_load()}", flush=True)


def side_by_side(pairs: int, train_grid: int, sampling: dict, rows: list[str], batches: list[int]) -> None:
    """The table of our sampler and train step against LlamaGen's; `rows` keeps the configurations whose
    name starts with one of its entries ("GPT-B train" for the training step), `batches` the batch sizes."""
    selected = lambda name: not rows or any(name.lower().startswith(r.lower()) for r in rows)  # noqa: E731
    print(f"CPU threads={torch.get_num_threads()}  {pairs} alternating pairs  sampling {sampling}  {_load()}")
    print(f"{'configuration':<30}{'batch':>6}{'ours ms':>10}{'LlamaGen ms':>13}{'ratio':>8}   load before/after")
    for name, size, grid, vocab, row_batches in SIDE_BY_SIDE:
        for batch in (b for b in row_batches if selected(name) and (not batches or b in batches)):
            _table_row(name, batch, lambda: compare_sampling(size, grid, vocab, batch, pairs, **sampling))
    name = f"GPT-B train step, {train_grid * train_grid} tok"
    if selected(name):
        _table_row(name, 8, lambda: compare_train_step(8, train_grid, pairs))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m generators.bench")
    parser.add_argument("--sizes", default="tiny,B")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--dit-steps", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="torch.compile the GPT decode step")
    parser.add_argument("--vs-llamagen", action="store_true", help="side by side with LlamaGen's algorithms (CPU)")
    parser.add_argument("--pairs", type=int, default=5, help="--vs-llamagen: alternating pairs per row")
    parser.add_argument("--threads", type=int, default=2, help="--vs-llamagen: CPU threads")
    parser.add_argument("--train-grid", type=int, default=16, help="--vs-llamagen: grid side of the training step")
    parser.add_argument("--rows", action="append", default=[],
                        help="--vs-llamagen: keep rows whose name starts with this (repeatable; default all)")
    parser.add_argument("--batches", default="", help="--vs-llamagen: comma-separated batch sizes (default all)")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.vs_llamagen:
        torch.set_num_threads(args.threads)
        sampling = {"cfg_scale": args.cfg_scale, "top_k": args.top_k, "top_p": args.top_p}
        batches = [int(b) for b in args.batches.split(",") if b]
        return side_by_side(args.pairs, args.train_grid, sampling, args.rows, batches)
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
