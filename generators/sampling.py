"""Autoregressive sampling for generators.gpt.GPT, gpt-fast style: small pure functions and an
explicit static KV cache (prefill the class token, then `decode_one_token` per position).

Classifier-free guidance doubles the batch: rows [0, B) carry the labels, rows [B, 2B) the null
class, and logits = u + s_i * (c - u).  The scale s_i is constant (LlamaGen) or ramps linearly
over token positions, s_i = 1 + (s - 1) * (i + 1) / L (the "linear" schedule of later AR work;
not in VFMTok).  `cfg_interval = k >= 0` switches guidance off for tokens with index > k
(LlamaGen's flag; -1 = never).  Seeded through an explicit torch.Generator, batched.

Per decoded token the work is kept to what the draw needs: guidance is applied to the head's
input (the head is linear and bias-free, so the result equals guiding the logits, at half the
head's cost), eager decoding attends to the filled cache slots only, and the token is drawn by
inverse CDF, one uniform number per row, where `multinomial` draws one per vocabulary entry; over a
whole vocabulary in two levels (a block by block masses, then an entry inside it).  The draw's
distribution is `logits_to_probs` (tests/test_sampling.py checks it by chi-square).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from generators.gpt import GPT


# --------------------------------------------------------------------------- pure helpers
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    remove_sorted = mass_before >= p  # never removes the most likely token (mass_before = 0)
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample_token` draws from, written out in full (B, V)."""
    logits = logits / max(temperature, 1e-5)
    return top_p_filter(top_k_filter(logits, top_k), top_p).softmax(-1)


def _candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The logits a draw can pick from, and their vocabulary ids (None: all, in order). Nucleus
    sampling needs them sorted by decreasing probability; top-k keeps only k of them."""
    if 0 < top_k < logits.shape[-1]:
        return torch.topk(logits, top_k, dim=-1, sorted=top_p < 1.0)
    if top_p < 1.0:
        return torch.sort(logits, dim=-1, descending=True)
    return logits, None


BLOCK = 128  # entries per block of the two-level draw


def sample_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) tokens drawn from `logits_to_probs`; temperature 0 means greedy (argmax).

    One inverse-CDF draw per row: a single uniform number against float64 running sums of the
    probabilities, instead of `multinomial`'s random number per vocabulary entry.  Top-k draws among
    the k largest logits only (ties at the k-th value: topk keeps k of them)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    values, ids = _candidates(logits, top_k, top_p)
    if temperature != 1.0:
        values = values / max(temperature, 1e-5)
    probs = values.softmax(-1)  # (B, K); for the whole vocabulary exactly `logits_to_probs`
    if top_p < 1.0:
        return ids.gather(-1, _nucleus_draw(probs, top_p, generator))
    pick = _blocked_draw(probs, generator) if probs.shape[-1] % BLOCK == 0 else _inverse_cdf(probs, generator)
    return pick if ids is None else ids.gather(-1, pick)


def _uniform(total: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, 1) float64 numbers uniform on [0, total)."""
    return torch.rand(total.shape, dtype=torch.float64, device=total.device, generator=generator) * total


def _search(cumulative: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The entry whose running-sum interval holds u (the last one where rounding leaves u past the end)."""
    return torch.searchsorted(cumulative, u, right=True).clamp_(max=cumulative.shape[-1] - 1)


def _inverse_cdf(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    cumulative = probs.cumsum(-1, dtype=torch.float64)
    return _search(cumulative, _uniform(cumulative[:, -1:], generator))


def _nucleus_draw(probs: torch.Tensor, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """probs sorted by decreasing size: draw within the prefix whose preceding mass is below top_p."""
    cumulative = probs.cumsum(-1, dtype=torch.float64)
    kept = ((cumulative - probs) < top_p * cumulative[:, -1:]).sum(-1, keepdim=True)
    return _search(cumulative, _uniform(cumulative.gather(-1, kept - 1), generator))


def _blocked_draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Inverse CDF in two levels: the uniform number picks a block of BLOCK entries by the running
    sums of block masses, then an entry by the running sums inside that block. The same draw as one
    running sum over the vocabulary, without its sequential float64 pass over every entry."""
    B, V = probs.shape
    blocks = probs.view(B, V // BLOCK, BLOCK)
    starts = F.pad(blocks.sum(-1, dtype=torch.float64).cumsum(-1), (1, 0))  # (B, V/BLOCK + 1): mass before
    u = _uniform(starts[:, -1:], generator)
    block = (torch.searchsorted(starts, u, right=True) - 1).clamp_(0, V // BLOCK - 1)  # (B, 1)
    inside = blocks.gather(1, block[:, :, None].expand(B, 1, BLOCK))[:, 0]  # (B, BLOCK)
    return block * BLOCK + _search(inside.cumsum(-1, dtype=torch.float64), u - starts.gather(-1, block))


def cfg_scale_at(index: int, length: int, scale: float, schedule: Literal["constant", "linear"] = "constant") -> float:
    if schedule == "constant":
        return scale
    return 1.0 + (scale - 1.0) * (index + 1) / length


def guide(x: torch.Tensor, index: int, length: int, *, scale: float, schedule: str, interval: int) -> torch.Tensor:
    """(2B, ...) [cond; uncond] -> (B, ...) guided, u + s (c - u), for token `index`. Applied to the
    head's input: the head is linear without bias, so this equals guiding the logits."""
    cond, uncond = x.chunk(2)
    if interval > -1 and index > interval:
        return cond
    return uncond + cfg_scale_at(index, length, scale, schedule) * (cond - uncond)


# --------------------------------------------------------------------------- model steps
def prefill(model: GPT, labels: torch.Tensor, input_pos: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
    """Run the class token at position 0, filling the caches; -> (B, D) head input of token 0."""
    return model.hidden_states(model.embed_class(labels), input_pos, kv_len)[:, -1]


def decode_one_token(model: GPT, token: torch.Tensor, input_pos: torch.Tensor,
                     kv_len: Optional[int] = None) -> torch.Tensor:
    """token (B, 1) at position input_pos (1,) -> (B, D) head input for the next token."""
    return model.hidden_states(model.tok_emb(token), input_pos, kv_len)[:, -1]


_compiled: dict[str, Callable] = {}


def _decode_fn(compile: bool) -> Callable:
    if not compile:
        return decode_one_token
    if "decode" not in _compiled:  # compiled once per process; shapes are static per (batch, model)
        _compiled["decode"] = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    return _compiled["decode"]


def _cache_dtype(model: GPT, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


# --------------------------------------------------------------------------- generation
def generate(model: GPT, labels: torch.Tensor, *, cfg_scale: float = 1.0,
             cfg_schedule: Literal["constant", "linear"] = "constant", cfg_interval: int = -1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
             use_cache: bool = True, compile: bool = False, cfg_batch: Optional[bool] = None) -> torch.Tensor:
    """Sample (B, L) token grids (raster order) for class labels (B,).

    cfg_batch: run the doubled [cond; null] batch; None = only when cfg_scale != 1 (at scale 1
    the guided logits equal the conditional ones, so the doubling is skipped to save compute).
    use_cache=False recomputes the full prefix at every step (reference path for tests).
    """
    with torch.inference_mode():  # lighter than no_grad per op; the clone below is a normal tensor
        device = labels.device
        if generator is None:
            generator = torch.Generator(device)
            generator.manual_seed(0 if seed is None else seed)
        B, L = labels.shape[0], model.cfg.seq_len
        guided = (cfg_scale != 1.0) if cfg_batch is None else cfg_batch
        run_labels = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels

        def next_token(hidden: torch.Tensor, index: int) -> torch.Tensor:  # (B', D) head input -> (B, 1)
            if guided:
                hidden = guide(hidden.float(), index, L, scale=cfg_scale, schedule=cfg_schedule, interval=cfg_interval)
            logits = model.logits(hidden)
            return sample_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

        def doubled(token: torch.Tensor) -> torch.Tensor:
            return torch.cat([token, token]) if guided else token

        was_training = model.training
        model.eval()
        tokens = torch.empty(B, L, dtype=torch.long, device=device)
        try:
            if use_cache:
                model.setup_caches(run_labels.shape[0], _cache_dtype(model, device), device)
                decode = _decode_fn(compile)
                positions = torch.arange(L + 1, device=device)
                # eager decoding attends to the filled slots only; compiled decoding keeps static shapes
                kv_len = (lambda i: None) if compile else (lambda i: i + 1)  # after writing position i
                hidden = prefill(model, run_labels, positions[:1], kv_len(0))
                for i in range(L):
                    tokens[:, i:i + 1] = next_token(hidden, i)
                    if i + 1 < L:
                        hidden = decode(model, doubled(tokens[:, i:i + 1]), positions[i + 1:i + 2], kv_len(i + 1))
            else:
                for i in range(L):
                    embeddings = model.embed(doubled(tokens[:, :i]), run_labels)
                    hidden = model.hidden_states(embeddings)[:, -1]
                    tokens[:, i:i + 1] = next_token(hidden, i)
        finally:
            model.clear_caches()
            model.train(was_training)
    return tokens.clone()
