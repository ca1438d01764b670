"""Optuna search: parallel pull workers on a journal file, no duplicate and no lost trial; pruning."""
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study import ledger, schema, tracking
from study.ledger import State
from study.search import open_study
from study.sweep import load_plan, main
from tests.toy_stages import PLUGINS as TOY

FAST = {"steps": 10, "log_every": 5, "ckpt_every": 10, "ema_decay": 0.0, "precision": "fp32",
        "progress": False, "device": "cpu"}


def write(tmp_path, search, launcher, stages=("toy_data", "toy_train")) -> str:
    spec = {"name": "hpo", "stages": list(stages), "plugins": TOY, "study_dir": str(tmp_path / "study"),
            "tracking": {"enabled": False}, "base": {"toy": {"train": FAST}}, "search": search,
            "launcher": launcher}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_parallel_workers_finish_n_trials_without_duplicates(tmp_path):
    # an exhaustive 3 x 2 grid: 6 trials, 2 local workers at a time (the CI has 2 cores)
    path = write(tmp_path, {"n_trials": 6, "metric": "toy_train/val_mse", "sampler": "grid",
                            "space": {"toy.lr": {"type": "categorical", "choices": [0.003, 0.01, 0.03]},
                                      "toy.hidden": {"type": "int", "low": 4, "high": 8, "step": 4}}},
                 {"backend": "local", "max_parallel": 2, "poll_s": 0.5})
    assert main([path]) == 0
    study = open_study(load_plan(path).spec)
    trials = study.get_trials()
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    points = {(t.params["toy.lr"], t.params["toy.hidden"]) for t in trials}
    assert len(points) == 6  # every grid point exactly once
    # the shared dataset stage ran once for all 16 trials
    data_dirs = list((Path(tmp_path) / "study" / "stages" / "toy_data").iterdir())
    assert len(data_dirs) == 1
    # re-running continues toward the total instead of adding 6 more
    assert main([path]) == 0
    assert len(open_study(load_plan(path).spec).get_trials()) == 6


def test_pruning_from_training_curve(tmp_path):
    path = write(tmp_path, {"n_trials": 8, "metric": "toy_train/val_mse", "sampler": "random", "seed": 0,
                            "pruner": "median", "startup_trials": 2, "prune_on": "toy_train/loss/model",
                            "space": {"toy.lr": {"type": "float", "low": 1e-5, "high": 0.1, "log": True}}},
                 {"backend": "debug"})
    main([path, "--set", "base.toy.train.steps=30"])
    study = open_study(load_plan(path).spec)
    states = [t.state for t in study.get_trials()]
    assert len(states) == 8
    assert len({t.params["toy.lr"] for t in study.get_trials()}) == 8  # seeded sampler: no repeated draw
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1
    assert all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states)
    reported = [t for t in study.get_trials() if t.intermediate_values]
    assert reported and all(set(t.intermediate_values) <= {5, 10, 15, 20, 25, 30} for t in reported)


def test_preempted_trial_job_continues_its_trial(tmp_path):
    """A preempted trial job is requeued by submitit with its pickled state: it must continue the
    same trial (its training stage resuming from the checkpoint), not ask a second trial and leave
    the first RUNNING for ever."""
    slow = {**FAST, "steps": 60, "ckpt_every": 5}
    path = write(tmp_path, {"n_trials": 1, "metric": "toy_train/val_mse", "sampler": "random", "seed": 0,
                            "space": {"toy.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}},
                 {"backend": "local", "max_parallel": 1, "poll_s": 0.3})
    spec = yaml.safe_load(Path(path).read_text())
    spec["base"]["toy"] = {"train": slow, "step_sleep_s": 0.1}
    Path(path).write_text(yaml.safe_dump(spec))
    exit_code = []
    controller = threading.Thread(target=lambda: exit_code.append(main([path])))
    controller.start()
    train_dirs = Path(tmp_path) / "study" / "stages" / "toy_train"
    deadline = time.time() + 240
    while not list(train_dirs.glob("*/checkpoints/last.pt")) and time.time() < deadline:
        time.sleep(0.2)
    stage_dir = next(train_dirs.iterdir())
    # the preemption signal, to the job's process as Slurm sends it
    os.kill(ledger.read_status(stage_dir)["pid"], signal.SIGUSR2)
    controller.join(timeout=240)
    assert exit_code == [0]
    trials = open_study(load_plan(path).spec).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    status = ledger.read_status(stage_dir)
    assert status["state"] == State.COMPLETED and status["attempt"] == 2  # before and after the requeue


def trial_state(study, number):
    return next(t for t in study.get_trials() if t.number == number)


@pytest.mark.timeout(300)
def test_a_crashed_stage_fails_its_trial_through_the_grid_machinery(tmp_path):
    """A trial's cell runs through the Scheduler, ledger and MLflow cell runs like a grid cell;
    a crashed stage is FAIL with its reason on the trial, in the study folder and in MLflow,
    and `wait` returns."""
    path = write(tmp_path, {"n_trials": 2, "metric": "toy_train/val_mse", "sampler": "grid",
                            "space": {"toy.fail_at": {"type": "categorical", "choices": [-1, 5]}}},
                 {"backend": "debug", "poll_s": 0.1})
    spec = yaml.safe_load(Path(path).read_text())
    spec.update(tracking={"enabled": True}, report=False)
    Path(path).write_text(yaml.safe_dump(spec))
    assert main([path]) == 1  # one of two trials failed
    study = open_study(load_plan(path).spec)
    by_fail = {t.params["toy.fail_at"]: t for t in study.get_trials()}
    assert by_fail[-1].state == optuna.trial.TrialState.COMPLETE
    failed = by_fail[5]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "toy failure requested at step 5" in failed.user_attrs["fail_reason"]
    record = ledger.read_json(Path(tmp_path) / "study" / "trials" / str(failed.number) / "trial.json")
    assert record["state"] == "FAIL" and "toy failure requested" in record["reason"]
    client = MlflowClient(tracking.default_uri(Path(tmp_path) / "study"))
    runs = client.search_runs([client.get_experiment_by_name("hpo").experiment_id])
    parent = next(r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_SWEEP)
    cells = {r.data.tags[schema.TRIAL_NUMBER]: r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_CELL}
    assert parent.info.status == "FAILED" and len(cells) == 2
    run = cells[str(failed.number)]
    assert run.data.tags[schema.PARENT_RUN] == parent.info.run_id
    assert run.data.tags[schema.CELL_ID] == failed.user_attrs[schema.CELL_ID]
    assert run.info.status == "FAILED" and "toy failure requested" in run.data.tags[schema.ERROR]
    assert run.data.params["toy.train.batch_size"] == "32"  # the resolved config, as for a grid cell
    assert cells[str(by_fail[-1].number)].info.status == "FINISHED"
    # the stage ran under the engine's ledger, as a grid cell's does
    stage_dirs = list((Path(tmp_path) / "study" / "stages" / "toy_train").iterdir())
    assert sorted(ledger.read_status(d)["state"].value for d in stage_dirs) == ["COMPLETED", "FAILED"]
    assert main(["wait", path]) == 1  # returns at once: no trial is left RUNNING


@pytest.mark.timeout(300)
def test_a_metric_the_stage_never_returns_fails_the_trial(tmp_path):
    path = write(tmp_path, {"n_trials": 1, "metric": "toy_train/no_such_metric", "sampler": "random", "seed": 0,
                            "space": {"toy.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}},
                 {"backend": "debug", "poll_s": 0.1})
    assert main([path]) == 1
    (trial,) = open_study(load_plan(path).spec).get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "returned no metric 'no_such_metric'" in trial.user_attrs["fail_reason"]
    assert "val_mse" in trial.user_attrs["fail_reason"]  # what it did return
    assert main(["wait", path]) == 1


@pytest.mark.timeout(300)
def test_an_error_while_drawing_parameters_fails_the_trial(tmp_path, monkeypatch):
    from study import search

    def broken(trial, key, p):
        raise ValueError("no distribution fits")

    monkeypatch.setattr(search, "_suggest", broken)
    path = write(tmp_path, {"n_trials": 2, "metric": "toy_train/val_mse", "sampler": "random", "seed": 0,
                            "space": {"toy.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}},
                 {"backend": "debug", "poll_s": 0.1})
    assert main([path]) == 1
    trials = open_study(load_plan(path).spec).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("ValueError: no distribution fits" in t.user_attrs["fail_reason"] for t in trials)
    assert main(["wait", path]) == 1


def test_a_log_scale_from_zero_is_rejected_before_anything_runs(tmp_path, capsys):
    path = write(tmp_path, {"n_trials": 1, "metric": "toy_train/val_mse",
                            "space": {"toy.lr": {"type": "float", "low": 0, "high": 1e-2, "log": True}}},
                 {"backend": "debug"})
    assert main([path]) == 2
    assert "log scale needs low > 0" in capsys.readouterr().err
    assert not (Path(tmp_path) / "study").exists()
