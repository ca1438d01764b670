"""Evaluation shared out over the ranks of a stage: `study.training.sharded` joins the ranks' parts
in item order (also when the items do not split evenly), the quantizer's usage buffer under DDP
holds the whole global batch, and tok_eval / gen_eval as 2 gloo ranks give the metrics of 1 rank."""
from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from study import schema as S
from study.training import init_distributed, rank_part, ranks_leave_together, sharded

# a rank's share goes through the same network as the whole batch, in smaller batches: float32
# rounding of the features is the only difference left, and Fréchet distances of 16 images amplify it
METRIC_RTOL = 1e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed()
    with ranks_leave_together():
        result = fn(*args)
    Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))


def on_ranks(world: int, tmp: Path, fn, *args) -> list:
    """fn(*args) in `world` spawned processes joined in one gloo group; every rank's return value."""
    tmp.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(_rank_main, args=(world, _free_port(), str(tmp), fn, args), nprocs=world)
    return [pickle.loads((tmp / f"{rank}.pkl").read_bytes()) for rank in range(world)]


# --------------------------------------------------------------------------- the helper
def _shares(n: int, everywhere: bool) -> tuple:
    seen = []

    def part(items: slice):
        seen.append((items.start, items.stop))
        return np.arange(n)[items] * 10, (torch.arange(n)[items], np.arange(n)[items].astype(str))
    return sharded(part, n, everywhere), seen


@pytest.mark.parametrize("n, world", [(7, 2), (2, 3)])
def test_parts_are_joined_in_item_order_when_the_items_do_not_split_evenly(tmp_path, n, world):
    got = on_ranks(world, tmp_path, _shares, n, False)
    (tens, (ids, names)), _ = got[0]
    assert np.array_equal(tens, np.arange(n) * 10) and torch.equal(ids, torch.arange(n))
    assert list(names) == [str(i) for i in range(n)]
    assert all(result is None for result, _ in got[1:])
    shares = [seen for _, seen in got]
    # contiguous shares of sizes differing by at most one; a rank with nothing to do is not called
    expected = [(rank_part(n, r, world).start, rank_part(n, r, world).stop) for r in range(world)]
    assert [s for share in shares for s in share] == [e for e in expected if e[1] > e[0]]
    assert max(b - a for a, b in expected) - min(b - a for a, b in expected) <= 1

    everywhere = on_ranks(world, tmp_path / "all", _shares, n, True)
    for (tens, (ids, _)), _ in everywhere:
        assert np.array_equal(tens, np.arange(n) * 10) and torch.equal(ids, torch.arange(n))


def test_one_rank_calls_fn_once_on_every_item(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []
    value = object()
    assert sharded(lambda part: calls.append(part) or value, 5) is value
    assert calls == [slice(0, 5)] and not dist.is_initialized()


# --------------------------------------------------------------------------- codebook usage under DDP
BATCH, TOKENS, DIM, CODES, BUFFER = 4, 6, 8, 16, 40  # two steps of 24 ids wrap the 40-slot buffer


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, TOKENS, DIM, generator=g) for _ in range(2)]


def _record_steps(rank: int, world: int) -> dict[str, torch.Tensor]:
    from tokenizer.quantizer import CosineVQ

    torch.manual_seed(0)
    vq = CosineVQ(CODES, DIM, usage_buffer=BUFFER).train()
    share = rank_part(BATCH, rank, world)
    for z in _batches():
        vq(z[share])
    return {"recent": vq.recent.clone(), "cursor": vq.cursor.clone(), **vq.usage_stats()}


def _record_on_my_rank() -> dict:
    return _record_steps(dist.get_rank(), dist.get_world_size())


def test_codebook_usage_under_ddp_counts_every_ranks_ids(tmp_path):
    one = _record_steps(0, 1)  # one rank, the whole global batch
    assert (one["recent"] >= 0).all()
    for got in on_ranks(2, tmp_path, _record_on_my_rank):
        assert torch.equal(got["recent"], one["recent"]) and int(got["cursor"]) == int(one["cursor"])
        assert got["usage"] == one["usage"] and got["perplexity"] == one["perplexity"]


# --------------------------------------------------------------------------- the stages, end to end
def _stage_metrics(spec: str, kind: str, upstream: str, tag: str, value: str, out: str, chunk: int) -> dict:
    """The metrics of the micro study's `kind` stage whose `upstream` stage is tagged tag=value, run
    again into `out` (label chunks of `chunk` rows, so that the 8 samples split into uneven chunks)."""
    import generators.train
    from study.stages import StageContext, get_kind
    from study.sweep import load_plan
    from study.worker import _inputs

    generators.train.SAMPLE_CHUNK = chunk
    plan = load_plan(spec)
    found = [(st, _inputs(st, plan.root)) for st in plan.stages.values() if st.kind == kind]
    stage, inputs = next((st, inp) for st, inp in found if inp[upstream].result.tags.get(tag) == value)
    folder = Path(out, str(dist.get_rank() if dist.is_initialized() else 0))
    folder.mkdir(parents=True, exist_ok=True)
    return get_kind(kind).run(StageContext(stage.config, folder, inputs, [])).metrics


@pytest.mark.parametrize("kind, upstream, tag, value", [
    (S.TOK_EVAL, S.TOKENIZER, S.TOKENIZER_KIND, "vfmtok"),
    (S.GEN_EVAL, S.GENERATOR, S.GENERATOR_KIND, "gpt"),
    (S.GEN_EVAL, S.GENERATOR, S.GENERATOR_KIND, "dit"),
])
def test_an_evaluation_stage_on_two_ranks_gives_the_metrics_of_one(micro_study, tmp_path, kind, upstream, tag, value):
    assert micro_study["code"] == 0
    args = (str(micro_study["spec"]), kind, upstream, tag, value)
    one = _stage_metrics(*args, str(tmp_path / "one"), 3)
    two = on_ranks(2, tmp_path / "ranks", _stage_metrics, *args, str(tmp_path / "two"), 3)
    assert two[1] == {}  # rank 1 computes its shares; rank 0 alone holds the metrics
    assert sorted(two[0]) == sorted(one) and one
    assert two[0] == pytest.approx(one, rel=METRIC_RTOL, abs=1e-6)


def test_the_generators_fd_ref_curve_on_two_ranks_gives_the_value_of_one(micro_study, tmp_path):
    """The GPT generator trained as 2 ranks: every rank enters its evaluations, draws its label chunks
    and decodes its share of the samples for the fd_ref hook. Training itself differs from one rank's by
    DDP's summation order only (tests/test_multirank.py); the tiny weight differences leave the tokens
    drawn, and with them fd_ref, unchanged."""
    assert micro_study["code"] == 0
    args = (str(micro_study["spec"]), S.GENERATOR, S.TOKENIZER, S.TOKENIZER_KIND, "vfmtok")
    one = _stage_metrics(*args, str(tmp_path / "one"), 3)
    two = on_ranks(2, tmp_path / "ranks", _stage_metrics, *args, str(tmp_path / "two"), 3)
    assert S.FD_REF not in two[1]  # the evaluation's metrics are rank 0's
    assert two[0][S.FD_REF] == pytest.approx(one[S.FD_REF], rel=METRIC_RTOL)
