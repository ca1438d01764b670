"""AR sampler: the inverse-CDF draw against the exact categorical, greedy tokens and training loss
against LlamaGen's algorithms (generators.bench), and the filled-slot decoding path."""

import pytest
import torch
from scipy.stats import chisquare

from generators import bench, sampling
from generators.bench import gpt_loss, llamagen_generate, llamagen_loss, random_gpt
from generators.sampling import generate, logits_to_probs, sample_token
from tests.test_generators import small_gpt

SETTINGS = [  # sampling options the draw must honour
    {"temperature": 1.0},
    {"temperature": 0.6},
    {"temperature": 1.3, "top_k": 7},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 0.8, "top_k": 12, "top_p": 0.9},
]


def draw_counts(logits: torch.Tensor, n: int, seed: int = 0, **sampling) -> torch.Tensor:
    """Counts of n draws from one row of logits, in batched calls of 1000 rows."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.cat([sample_token(logits.expand(1000, -1), generator=g, **sampling) for _ in range(n // 1000)])
    return torch.bincount(tokens.flatten(), minlength=logits.shape[-1]).double()


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the filtered support was drawn"
    expected = probs[support].double() * counts.sum()
    return chisquare(counts[support], expected * counts[support].sum() / expected.sum()).pvalue


@pytest.mark.parametrize("sampling", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_draw_matches_exact_categorical(sampling):
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1)) * 2.0
    probs = logits_to_probs(logits, **sampling)[0]
    counts = draw_counts(logits, 60_000, **sampling)
    assert chi_square_p(counts, probs) > 1e-3
    # the test has power: the same counts reject the distribution at another temperature
    other = logits_to_probs(logits, **{**sampling, "temperature": sampling["temperature"] * 1.15})[0]
    assert chi_square_p(counts, other) < 1e-6


def test_draw_over_a_16k_vocabulary_matches_in_probability_bins():
    """16384 entries: tokens grouped into 20 bins of about equal probability mass."""
    logits = torch.randn(1, 16384, generator=torch.Generator().manual_seed(2)) * 3.0
    for sampling in ({"temperature": 1.0}, {"temperature": 1.0, "top_k": 2000}):  # top-p: the 40-token test
        probs = logits_to_probs(logits, **sampling)[0].double()
        order = probs.argsort(descending=True)
        bins = torch.empty_like(order)
        bins[order] = (probs[order].cumsum(0) * 20).clamp(max=19.999).long()
        counts = draw_counts(logits, 10_000, seed=3, **sampling)
        assert counts[probs == 0].sum() == 0
        binned = torch.zeros(20, dtype=torch.float64).index_add_(0, bins, counts)
        expected = torch.zeros(20, dtype=torch.float64).index_add_(0, bins, probs)
        keep = expected > 0
        expected = expected[keep] * counts.sum() / expected[keep].sum()
        assert chisquare(binned[keep], expected).pvalue > 1e-3, sampling


def test_blocked_draw_is_the_one_level_inverse_cdf_and_matches_per_entry():
    """1024 entries = 8 blocks: with the same uniform numbers the two-level draw picks the token of a
    single running sum over the vocabulary, and its per-entry counts fit the exact categorical."""
    logits = torch.randn(1, 8 * sampling.BLOCK, generator=torch.Generator().manual_seed(4)) * 1.5
    probs = logits_to_probs(logits).expand(4000, -1)
    blocked = sampling._blocked_draw(probs, torch.Generator().manual_seed(9))
    assert torch.equal(blocked, sampling._inverse_cdf(probs, torch.Generator().manual_seed(9)))
    assert len(set((blocked // sampling.BLOCK).flatten().tolist())) == 8  # every block was drawn from
    counts = draw_counts(logits, 100_000, seed=5)
    assert chi_square_p(counts, probs[0]) > 1e-3
    assert chi_square_p(counts, logits_to_probs(logits, temperature=1.15)[0]) < 1e-6  # the test has power


def test_draw_is_seeded_and_greedy_is_argmax():
    logits = torch.randn(64, 500)
    draw = lambda seed: sample_token(logits, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))
    assert torch.equal(sample_token(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_token(logits, top_k=1, generator=torch.Generator()), logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_greedy_tokens_equal_llamagen(cfg_scale):
    model = small_gpt()
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    ours = generate(model, labels, cfg_scale=cfg_scale, temperature=0)
    theirs = llamagen_generate(model, labels, cfg_scale=cfg_scale, temperature=0)
    assert len(set(ours.flatten().tolist())) > 10  # not a trivially constant sequence
    assert torch.equal(ours, theirs.long())
    assert torch.equal(ours, generate(model, labels, cfg_scale=cfg_scale, temperature=0, use_cache=False))


def test_filled_slot_decoding_equals_masked_static_cache():
    model = small_gpt()
    tokens, labels = torch.randint(0, 64, (3, 16)), torch.tensor([0, 3, 5])
    outputs = {}
    with torch.no_grad():
        for filled_only in (False, True):
            model.setup_caches(3, torch.float32, torch.device("cpu"))
            steps = []
            for i in range(16):
                h = model.embed_class(labels) if i == 0 else model.tok_emb(tokens[:, i - 1:i])
                steps.append(model.hidden_states(h, torch.tensor([i]), i + 1 if filled_only else None))
            outputs[filled_only] = torch.cat(steps, dim=1)
            model.clear_caches()
        full = model.hidden_states(model.embed(tokens[:, :-1], labels))
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[True], full, atol=1e-5, rtol=1e-5)


def test_training_loss_and_gradients_equal_llamagen_with_dropout():
    """Same seed, dropouts active: both draw the same random numbers in the same order."""
    model = random_gpt("tiny", 4, 256).train()
    tokens, labels = torch.randint(0, 256, (4, 16)), torch.tensor([0, 1, 2, 3])
    losses, grads = [], []
    for loss_fn in (gpt_loss, llamagen_loss):
        torch.manual_seed(7)
        model.zero_grad()
        loss = loss_fn(model, tokens, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.manual_seed(8)
    assert not torch.equal(llamagen_loss(model, tokens, labels), losses[1])  # dropout is active
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_side_by_side_protocol_alternates_and_takes_the_median_pair_ratio(monkeypatch):
    clock, calls = [0.0], []
    durations = iter([0.0, 0.0] + [0.05, 0.25, 0.3, 0.1, 0.2, 0.2])  # warm-ups, then 3 pairs in call order
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def timed(name):
        def run():
            calls.append(name)
            clock[0] += next(durations)
        return run
    result = bench.alternating_pairs(timed("ours"), timed("theirs"), pairs=3)
    assert calls == ["ours", "theirs", "ours", "theirs", "theirs", "ours", "ours", "theirs"]
    # pairs theirs/ours: 0.25/0.05, 0.3/0.1, 0.2/0.2 -> median 3, not the ratio of medians (0.25/0.1)
    assert result["ratio"] == pytest.approx(3.0)
    assert result["ours_ms"] == pytest.approx(100.0) and result["theirs_ms"] == pytest.approx(250.0)


def test_side_by_side_table_covers_every_configuration_and_filters_rows(monkeypatch, capsys):
    seen = []
    fake = {"ours_ms": 1.0, "theirs_ms": 2.0, "ratio": 2.0}
    monkeypatch.setattr(bench, "compare_sampling", lambda size, grid, vocab, batch, pairs, **s: seen.append(
        (size, grid * grid, batch)) or fake)
    monkeypatch.setattr(bench, "compare_train_step", lambda batch, grid, pairs: seen.append(("train", grid)) or fake)
    bench.main(["--vs-llamagen", "--pairs", "1"])
    for size in ("tiny", "B"):  # the table: 64 and 256 tokens, batch 8 and 32, and the train step
        assert {(t, b) for s, t, b in (c for c in seen if len(c) == 3) if s == size} >= {(64, 8), (64, 32), (256, 8),
                                                                                          (256, 32)}
    assert ("train", 16) in seen and "load" in capsys.readouterr().out
    seen.clear()
    bench.main(["--vs-llamagen", "--pairs", "1", "--rows", "GPT-B, 256", "--batches", "32"])
    assert seen == [("B", 256, 32)]
