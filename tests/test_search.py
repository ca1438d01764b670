"""Optuna search: parallel pull workers on a journal file, no duplicate and no lost trial; pruning."""
import os
import signal
import threading
import time
from pathlib import Path

import optuna
import yaml

from study import ledger
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
