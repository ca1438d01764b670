"""A stage of several ranks: the study's tokenizer stage as 2 gloo ranks through the local backend
ends where one rank with the same global batch ends; resources the backend cannot give are
refused before anything is created."""
from __future__ import annotations

import copy
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from study import ledger
from study import schema as S
from study.config import ConfigError
from study.ledger import State
from study.sweep import load_plan, main
from tests.real_chain import MICRO

# DDP averages the two half-batch gradients where one rank takes the mean over the whole batch:
# the same sum in another order, so float32 rounding is the only difference left
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
STEPS = 4
# the quantizer's buffer of recently used codes records every rank's codes of the global batch: codes
# of weights equal to WEIGHT_ATOL, so compared like the exported codes below
USAGE_BUFFER = "quantizer.recent"


def tokenizer_spec(root: Path, launcher: dict, tokenizer_res: dict | None = None, steps: int = STEPS) -> str:
    """The micro chain's reference, vfm and tokenizer stages (one cell), tracked in the study's sqlite
    MLflow (the vfm stage measures its alignment against the reference classifier)."""
    spec = copy.deepcopy(MICRO)
    for key in ("axes", "include"):
        spec.pop(key)
    for section in ("generator", "eval"):  # sections of stages this sweep leaves out
        spec["base"].pop(section)
    spec["base"]["tokenizer"]["train"].update(steps=steps, log_every=1, ckpt_every=2)
    spec.update(stages=[S.REFERENCE, S.VFM, S.TOKENIZER], seed_keys=["pretrain.train.seed", "tokenizer.train.seed"], study_dir=str(root / "study"), launcher=launcher,
                resources={S.TOKENIZER: tokenizer_res or {}})
    root.mkdir(parents=True, exist_ok=True)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def tokenizer_stage_dir(path: str) -> Path:
    plan = load_plan(path)
    return next(s.dir(plan.root) for s in plan.stages.values() if s.kind == S.TOKENIZER)


def loss_curves(path: str) -> dict[str, list[tuple[int, float]]]:
    """Every `tokenizer/loss/*` curve of the sweep's cell runs, as (step, value) lists."""
    plan = load_plan(path)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{(plan.root / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(plan.spec.name)
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if any(k.startswith("tokenizer/loss/") for k in r.data.metrics)]
    assert len(runs) == 1, f"{len(runs)} runs hold tokenizer curves"
    run_id = runs[0].info.run_id
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in runs[0].data.metrics if key.startswith("tokenizer/loss/")}


def final_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(stage_dir / "checkpoints" / "last.pt", weights_only=True)["modules"]["model"]


def test_two_local_ranks_match_one_rank_at_the_same_global_batch(tmp_path):
    one = tokenizer_spec(tmp_path / "one", {"backend": "debug"})
    two = tokenizer_spec(tmp_path / "two", {"backend": "local", "poll_s": 0.2},
                         {"cpus": 1, "tasks_per_node": 2, "timeout_min": 20})
    assert main([one, "--quiet"]) == 0
    assert main([two, "--quiet"]) == 0, (tokenizer_stage_dir(two) / "status.json").read_text()

    ref, got = loss_curves(one), loss_curves(two)
    assert sorted(ref) == sorted(got) and ref
    for key in ref:
        steps = [s for s, _ in ref[key]]
        assert steps == [s for s, _ in got[key]] == list(range(1, STEPS + 1)), key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in ref[key]], rel=LOSS_RTOL), key

    ref_w, got_w = final_weights(tokenizer_stage_dir(one)), final_weights(tokenizer_stage_dir(two))
    for name, tensor in ref_w.items():
        if name == USAGE_BUFFER:  # the same slots filled (1 rank: the whole global batch), nearly the same codes
            filled = tensor >= 0
            assert torch.equal(got_w[name] >= 0, filled) and (got_w[name][filled] == tensor[filled]).float().mean() > 0.95
        else:
            assert torch.allclose(got_w[name], tensor, atol=WEIGHT_ATOL), name
    # the export is shared out over the ranks and merged by rank 0: the same rows, and codes from
    # weights equal to the tolerance above
    codes = [torch.load(tokenizer_stage_dir(p) / S.CODES_FILE, weights_only=True) for p in (one, two)]
    assert torch.equal(codes[0]["labels"], codes[1]["labels"])
    key = "tokens" if "tokens" in codes[0] else "latents"
    assert codes[0][key].shape == codes[1][key].shape
    if key == "tokens":
        assert (codes[0][key] == codes[1][key]).float().mean() > 0.95
    else:
        assert torch.allclose(codes[0][key].float(), codes[1][key].float(), atol=1e-3)
    ckpt = torch.load(tokenizer_stage_dir(two) / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2  # both ranks' generators, for an exact resume
    status = ledger.read_status(tokenizer_stage_dir(two))
    assert status["state"] == State.COMPLETED and status["attempt"] == 1


@pytest.mark.parametrize("launcher, res, problem", [
    ({"backend": "local", "gpus": []}, {"gpus": 1}, "1 GPU(s) asked, but the local pool has 0"),
    ({"backend": "local"}, {"nodes": 2}, "2 nodes asked, but the local backend runs on this machine only"),
    ({"backend": "debug"}, {"tasks_per_node": 2}, "2 ranks, but the debug backend runs stages in its own process"),
    ({"backend": "slurm"}, {"gpus": 4, "tasks_per_node": 2}, "4 GPUs per node but 2 tasks per node"),
])
def test_resources_the_backend_cannot_give_are_refused_in_one_line(tmp_path, launcher, res, problem):
    path = tokenizer_spec(tmp_path, launcher, res)
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: resources.{S.TOKENIZER}") and problem in message
    assert not (tmp_path / "study").exists()


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(monkeypatch):
    from study.training import Trainer, TrainConfig
    from tests.train_toy import Regression

    monkeypatch.setattr("study.training.init_distributed", lambda: (0, 3, 0))
    with pytest.raises(ValueError, match="train.batch_size=8 does not split over 3 ranks"):
        Trainer(TrainConfig(steps=1, batch_size=8, device="cpu", progress=False), Regression(8))


def _scale_lines(path: str) -> str:
    from study.backends import scale_summary
    plan = load_plan(path)
    return "\n".join(scale_summary(plan.spec, {kind: st.config for kind, st in plan.cells[0].stages.items()}))


def test_dry_run_shows_ranks_unsafe_stores_and_an_estimate_from_the_benchmark(tmp_path, monkeypatch):
    path = tokenizer_spec(tmp_path, {"backend": "slurm"}, {"gpus": 4, "nodes": 2})
    bench = tmp_path / "bench.json"
    bench.write_text('{"device": "NVIDIA H200", "sizes": {"name": "full"}, '
                     '"items": {"tokenizer_paper": {"images_per_s": 2.0}}}')
    monkeypatch.setenv("VFMSTUDY_BENCH", str(bench))
    text = _scale_lines(path)
    # steps x global batch / (images/s per GPU): the GPU-seconds of all ranks together
    hours = STEPS * MICRO["base"]["tokenizer"]["train"]["batch_size"] / 2.0 / 3600
    assert f"{S.TOKENIZER}      8 rank(s) = 2 x 4; 4 GPU(s)/node   ~{hours:.3g} GPU-h (estimate)" in text
    assert "UNSAFE at cluster scale: tracking.uri sqlite:///<study_dir>/mlflow.db" in text
    assert "study.cluster.mlflow_server start" in text

    local = tokenizer_spec(tmp_path / "local", {"backend": "local"})
    assert "UNSAFE" not in _scale_lines(local)


def test_an_optuna_journal_file_is_flagged_on_slurm_and_an_rdb_url_is_not(tmp_path):
    import dataclasses

    from study.backends import store_warnings
    from study.spec import ParamSpec, SearchSpec

    spec = load_plan(tokenizer_spec(tmp_path, {"backend": "slurm"})).spec
    server = dataclasses.replace(spec, tracking=dataclasses.replace(spec.tracking, uri="http://host:5000"))
    space = {"tokenizer.optim.lr": ParamSpec(type="float", low=1e-4, high=1e-3)}
    journal = dataclasses.replace(server, search=SearchSpec(n_trials=2, metric="tokenizer/x", space=space))
    rdb = dataclasses.replace(server, search=SearchSpec(n_trials=2, metric="tokenizer/x", space=space,
                                                         storage="postgresql://user@db/optuna"))
    assert store_warnings(server) == []
    [warning] = store_warnings(journal)
    assert "JournalFileBackend" in warning and "postgresql://" in warning
    assert store_warnings(rdb) == []
