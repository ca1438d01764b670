"""MLflow: parent/child runs with curves from a sweep, and 16 concurrent writer processes losing nothing."""
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from mlflow.tracking import MlflowClient

from study import schema, tracking
from study.stages import read_stage_result
from study.sweep import main
from tests.toy_stages import PLUGINS as TOY

REPO = Path(__file__).resolve().parents[1]


def _schema(db: Path) -> tuple:
    """Tables and indexes with their columns in order and their constraints as a set: MLflow's own
    migrations write a table's constraints in an order that varies from process to process."""
    def definition(sql: str) -> tuple:
        parts = [p.strip().removesuffix(")").strip() for p in re.split(r",\s*\n", sql or "")]
        constraint = ("CONSTRAINT", "CHECK", "FOREIGN", "UNIQUE", "PRIMARY")
        return tuple(p for p in parts if not p.startswith(constraint)), frozenset(p for p in parts if p.startswith(constraint))
    with sqlite3.connect(db) as con:
        objects = {(kind, name, definition(sql)) for kind, name, sql in con.execute("SELECT type, name, sql FROM sqlite_master")}
        return objects, con.execute("SELECT version_num FROM alembic_version").fetchall()


def test_a_store_copied_from_the_empty_store_is_the_store_mlflow_creates(tmp_path, monkeypatch):
    """The reference: a store MLflow creates itself (its client on a new file). The copy has the
    same tables, indexes, schema revision and default experiment, and MLflow opens it as its own."""
    monkeypatch.setenv("VFMSTUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # MLflow's default experiment keeps its artifact root relative to here
    own, ours = tmp_path / "own" / "mlflow.db", tmp_path / "ours" / "mlflow.db"
    own.parent.mkdir()
    MlflowClient(f"sqlite:///{own}").search_experiments()
    exp = tracking.init_store(tracking.default_uri(ours.parent), "copied", tmp_path / "art")
    assert list((tmp_path / "cache" / "mlflow").glob("empty-store-*.db"))  # built on first use
    assert _schema(ours) == _schema(own)
    def default_experiment(db: Path) -> tuple:
        found = MlflowClient(f"sqlite:///{db}").get_experiment_by_name("Default")
        return found.experiment_id, found.artifact_location, found.lifecycle_stage
    assert default_experiment(ours) == default_experiment(own)
    run = tracking.start_run(tracking.start_sweep(tracking.default_uri(ours.parent), exp, "copied", {}), "cell", {})
    assert MlflowClient(f"sqlite:///{ours}").get_run(run.run_id).info.experiment_id == exp


WRITER = """
import sys
from study.tracking import Tracker, MlflowCallback, end_runs
uri, exp, parent, run_id, n = sys.argv[1:6]
cb = MlflowCallback(Tracker(uri, exp, parent), [run_id], "stage")
for step in range(int(n)):
    cb.on_step(step, {"loss": 1.0 / (step + 1), "lr": 0.1})
end_runs(Tracker(uri, exp, parent), [run_id], "FINISHED")
"""


def test_16_concurrent_writers_lose_nothing(tmp_path):
    uri = tracking.default_uri(tmp_path)
    exp = tracking.init_store(uri, "concurrency", tmp_path / "art")  # controller: before any worker
    sweep = tracking.start_sweep(uri, exp, "concurrency", {})
    runs = [tracking.start_run(sweep, f"cell-{i}", {"i": str(i)}).run_id for i in range(16)]
    steps = 20
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, exp, sweep.parent_run_id, r, str(steps)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True) for r in runs]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    elapsed = time.time() - t0
    assert all(p.returncode == 0 for p in procs), [e[-500:] for e in errors if e]
    client = MlflowClient(uri)
    counts = [len(client.get_metric_history(r, "stage/loss")) + len(client.get_metric_history(r, "stage/lr"))
              for r in runs]
    assert counts == [2 * steps] * 16  # 1280 points, none lost
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    assert len(children) == 16 and all(c.info.status == "FINISHED" for c in children)
    print(f"16 writers x {2 * steps} metrics in {elapsed:.1f}s")


def test_sweep_logs_parent_children_curves_params_tags(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    spec = {"name": "tracked", "stages": ["toy_data", "toy_train"], "plugins": TOY, "study_dir": str(study),
            "axes": {"grid": {"toy.lr": [0.01, 0.03]}}, "launcher": {"backend": "debug", "poll_s": 0.2},
            "base": {"toy": {"train": {"steps": 20, "log_every": 5, "ckpt_every": 10, "ema_decay": 0.0,
                                       "precision": "fp32", "progress": False, "device": "cpu"}}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path)]) == 0
    client = MlflowClient(tracking.default_uri(study))
    exp = client.get_experiment_by_name("tracked")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(cells) == 2
    assert "git.sha" in parents[0].data.tags and parents[0].data.tags["git.dirty"] in ("true", "false")
    for run in cells:
        assert run.info.status == "FINISHED"
        assert run.data.params["toy.lr"] in ("0.01", "0.03") and run.data.params["toy.train.steps"] == "20"
        assert run.data.tags["stage.toy_train"] and run.data.tags["stage.toy_data"]
        curve = client.get_metric_history(run.info.run_id, "toy_train/loss/model")
        assert [m.step for m in curve] == [5, 10, 15, 20]
        assert "toy_train/val_mse" in run.data.metrics and "toy_data/y_var" in run.data.metrics
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "stages/toy_train")]
        assert arts == ["stages/toy_train/config.yaml"]
    # the shared data stage ran once but reported into both cell runs
    assert cells[0].data.tags["stage.toy_data"] == cells[1].data.tags["stage.toy_data"]


RACER = """
import sys, time
from pathlib import Path
from study.sweep import main
who, other, rounds, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
for i in range(rounds):
    (base / f"ready-{i}-{who}").touch()
    deadline = time.time() + 60
    while not (base / f"ready-{i}-{other}").exists():  # both controllers start together
        if time.time() > deadline:
            sys.exit(f"round {i}: the other controller never started the round (it failed before)")
        time.sleep(0.005)
    code = main([str(base / f"round{i}" / f"{who}.yaml"), "--quiet"])
    print(f"round {i}: exit {code}", flush=True)
    if code != 0:
        sys.exit(code)
"""


def test_two_sweeps_create_one_fresh_shared_store_at_once(tmp_path):
    """Two controllers starting on one fresh sqlite store (one copies the empty store in, the
    other waits): both finish, ten times over, each round on a new store; in the first round
    they also race to build the empty store in a fresh cache."""
    rounds = 10
    for i in range(rounds):
        store = tmp_path / f"round{i}"
        store.mkdir()
        for who in ("a", "b"):
            spec = {"name": f"sweep-{who}", "stages": ["toy_data"], "plugins": TOY, "study_dir": str(store / who), "seed_keys": ["data.seed"],
                    "tracking": {"uri": f"sqlite:///{store / 'shared.db'}"}, "report": False,
                    "launcher": {"backend": "debug", "poll_s": 0.05}}
            (store / f"{who}.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "VFMSTUDY_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, who, other, str(rounds), str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for who, other in (("a", "b"), ("b", "a"))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    for i in range(rounds):
        client = MlflowClient(f"sqlite:///{tmp_path / f'round{i}' / 'shared.db'}")
        for who in ("a", "b"):
            exp = client.get_experiment_by_name(f"sweep-{who}")
            assert exp is not None, f"round {i}: no experiment of sweep {who}"
            assert len(client.search_runs([exp.experiment_id])) == 2  # the sweep run and its cell run


TRAIN = {"steps": 10, "log_every": 5, "ckpt_every": 10, "ema_decay": 0.0, "precision": "fp32", "progress": False,
         "device": "cpu"}


def tracked_spec(tmp_path, **spec) -> Path:
    study = tmp_path / "study"
    study.mkdir()
    spec = {"name": "truth", "stages": ["toy_data", "toy_train"], "plugins": TOY, "study_dir": str(study),
            "launcher": {"backend": "debug", "poll_s": 0.1}, "report": False, "base": {"toy": {"train": TRAIN}},
            **spec}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cell_runs(study: Path, name: str):
    client = MlflowClient(tracking.default_uri(study))
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parent = next(r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_SWEEP)
    return client, parent, [r for r in runs if r.data.tags.get(schema.ROLE) == schema.ROLE_CELL]


def test_mlflow_failed_cell_error_and_traceback_parent_state_resolved_params(tmp_path):
    path = tracked_spec(tmp_path, axes={"lists": [{"toy.fail_at": 7}, {"toy.lr": 0.02}]})
    assert main([str(path)]) == 1
    client, parent, cells = cell_runs(tmp_path / "study", "truth")
    assert parent.info.status == "FAILED"  # the sweep's state, not RUNNING for ever
    failed = next(r for r in cells if r.data.params["toy.fail_at"] == "7")
    good = next(r for r in cells if r.data.params["toy.fail_at"] == "-1")
    assert failed.info.status == "FAILED" and good.info.status == "FINISHED"
    assert failed.data.tags[schema.ERROR].startswith("toy_train: RuntimeError: toy failure requested at step 7")
    assert [a.path for a in client.list_artifacts(failed.info.run_id, schema.ERRORS_DIR)] == \
        [f"{schema.ERRORS_DIR}/{schema.TRACEBACK_FILE}"]
    local = client.download_artifacts(failed.info.run_id, f"{schema.ERRORS_DIR}/{schema.TRACEBACK_FILE}", str(tmp_path))
    assert "Traceback (most recent call last)" in Path(local).read_text()
    # the resolved config: defaults the spec never wrote are there, non-semantic fields are not
    assert good.data.params["toy.train.batch_size"] == "32" and good.data.params["data.n"] == "256"
    assert good.data.params["toy.lr"] == "0.02" and "toy.step_sleep_s" not in good.data.params


def test_force_does_not_duplicate_metric_points(tmp_path):
    path = tracked_spec(tmp_path, axes={"grid": {"toy.lr": [0.01, 0.03]}})
    assert main([str(path)]) == 0
    assert main([str(path), "--force"]) == 0
    client, parent, cells = cell_runs(tmp_path / "study", "truth")
    assert parent.info.status == "FINISHED" and len(cells) == 2
    for run in cells:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "toy_train/loss/model")]
        assert steps == [5, 10]
        evals = [m.step for m in client.get_metric_history(run.info.run_id, "toy_train/val_mse")]
        assert evals == [10]  # the evaluation at the last step is also the stage's final value: one point


def test_cell_runs_are_created_when_their_first_stage_starts(tmp_path, monkeypatch):
    from study import controller, worker
    events = []
    open_run, run_stage = controller.open_cell_run, worker.run_stage

    def spy_open(plan, tracker, cell, *args, **kwargs):
        events.append("open")
        return open_run(plan, tracker, cell, *args, **kwargs)

    def spy_stage(item, *args, **kwargs):
        events.append("stage")
        return run_stage(item, *args, **kwargs)

    monkeypatch.setattr(controller, "open_cell_run", spy_open)
    monkeypatch.setattr(worker, "run_stage", spy_stage)
    path = tracked_spec(tmp_path, axes={"grid": {"data.seed": [0, 1, 2]}})  # 3 unshared chains
    assert main([str(path)]) == 0
    assert events.count("open") == 3 and events.count("stage") == 6
    assert events.index("stage") < len(events) - 1 - events[::-1].index("open")  # a stage ran before the last open


def test_a_controller_stopped_mid_sweep_writes_what_it_held(tmp_path, monkeypatch):
    """Ctrl-C while an in-process stage runs: every stage that completed before it has its result
    in its cell run (the controller held those writes), and the sweep run is KILLED; the re-run
    completes the sweep."""
    from study import worker
    run_stage, calls = worker.run_stage, []

    def interrupted_fourth(item, *args, **kwargs):
        calls.append(item.stage.key)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return run_stage(item, *args, **kwargs)

    monkeypatch.setattr(worker, "run_stage", interrupted_fourth)
    path = tracked_spec(tmp_path, axes={"grid": {"data.seed": [0, 1, 2]}})
    with pytest.raises(KeyboardInterrupt):
        main([str(path), "--quiet"])
    client = MlflowClient(tracking.default_uri(tmp_path / "study"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs if r.data.tags.get(schema.ROLE) != schema.ROLE_CELL] == ["KILLED"]
    logged = {name for r in runs for name in r.data.metrics}
    for key in calls[:3]:  # the stages that completed before the interrupt
        result = read_stage_result(tmp_path / "study" / "stages" / key)
        assert result.metrics and {schema.metric(key.split("/")[0], k) for k in result.metrics} <= logged, key
    monkeypatch.setattr(worker, "run_stage", run_stage)
    assert main([str(path), "--quiet"]) == 0


def test_a_wide_stage_result_reaches_its_run_whole_and_once_also_after_force(tmp_path):
    """A result wider than one MLflow call takes (1100 metrics, 150 tags) lands in its cell's run
    whole: every metric (one point, the stage's value), tag, resolved param and artifact, the run
    FINISHED under the sweep run; --force recomputes into fresh runs without a second point."""
    from study.controller import resolved_params
    from study.stages import read_stage_result
    from study.sweep import load_plan
    path = tracked_spec(tmp_path, stages=["toy_report"], seeds=[0, 1],
                        base={"report": {"metrics": 1100, "tags": 150}})
    plan = load_plan(str(path))
    for round_ in ("run", "force"):
        assert main([str(path)] + (["--force"] if round_ == "force" else [])) == 0
        client, parent, runs = cell_runs(tmp_path / "study", "truth")
        assert parent.info.status == "FINISHED" and len(runs) == 2
        for cell in plan.cells:
            run = next(r for r in runs if r.data.tags[schema.CELL_ID] == cell.id)
            stage = cell.stages["toy_report"]
            result = read_stage_result(stage.dir(plan.root))
            assert run.info.status == "FINISHED" and run.data.tags[schema.PARENT_RUN] == parent.info.run_id
            assert run.data.metrics == {f"toy_report/{k}": v for k, v in result.metrics.items()}
            assert len(run.data.metrics) == 1100 and run.data.metrics["toy_report/m7"] == cell.config["seed"] + 7 / 8
            assert {k: run.data.tags[k] for k in result.tags} == result.tags and len(result.tags) == 150
            assert run.data.tags[schema.stage_tag("toy_report")] == stage.id
            assert run.data.params == {k: str(v) for k, v in resolved_params(cell).items()}
            for key in ("toy_report/m0", "toy_report/m1099"):
                assert len(client.get_metric_history(run.info.run_id, key)) == 1, (round_, key)
            assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/note.txt"]
            assert [a.path for a in client.list_artifacts(run.info.run_id, "stages/toy_report")] == \
                ["stages/toy_report/config.yaml"]


def test_an_artifact_lands_in_the_runs_root_whether_its_writer_knows_the_root_or_reads_it(tmp_path):
    """A run this process created is written to the root create_run returned; a run from another
    controller (no root known) is read back from the store first: MLflow lists both files in one run."""
    uri = tracking.default_uri(tmp_path)
    sweep = tracking.start_sweep(uri, tracking.init_store(uri, "roots", tmp_path / "art"), "roots", {})
    run = tracking.start_run(sweep, "cell", {})
    for name, uris in (("known.txt", {run.run_id: run.artifact_uri}), ("read.txt", None)):
        (tmp_path / name).write_text(name)
        tracking.log_artifact(sweep, [run.run_id], tmp_path / name, "notes", uris)
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run.run_id, "notes")] == ["notes/known.txt", "notes/read.txt"]
    assert Path(client.download_artifacts(run.run_id, "notes/known.txt", str(tmp_path / "out"))).read_text() == "known.txt"


def _store_view(client: MlflowClient, run_id: str, parent: str) -> dict:
    """What MLflow's client reads back of a run, without what differs between two writings of
    the same run (ids, clock times); NaN as a string so that views compare equal."""
    show = lambda v: "nan" if v != v else v  # noqa: E731
    run = client.get_run(run_id)
    tags = {k: ("<parent>" if v == parent else v) for k, v in run.data.tags.items()}
    history = {key: sorted((m.step, show(m.value)) for m in client.get_metric_history(run_id, key))
               for key in run.data.metrics}
    return {"name": run.info.run_name, "status": run.info.status, "user": run.info.user_id,
            "lifecycle": run.info.lifecycle_stage, "ended": run.info.end_time is not None,
            "artifacts": run.info.artifact_uri.endswith(f"/{run_id}/artifacts"),
            "params": run.data.params, "tags": tags, "latest": {k: show(v) for k, v in run.data.metrics.items()},
            "history": history}


def _write_runs(tracker: tracking.Tracker, earlier: str) -> list[str]:
    """The writes a controller makes, with every case the store treats specially: a repeated
    point (stored once), a later step logged first, the same step at a later time (latest is the
    last by step, then time, then value; an earlier step written last is not the latest), NaN and infinities, a tag overwritten, runs ended FAILED
    and FINISHED, and a run created earlier (in the store) that is logged into and ended."""
    first = tracking.start_run(tracker, "first", {"axis.lr": "0.1", "note": "a"},
                               params={"model": {"dim": 8, "name": "vit"}, "lr": 0.1})
    second = tracking.start_run(tracker, "second", {"note": "b"}, params={"lr": 0.3})
    for run_id in (first.run_id, second.run_id, earlier):
        tracking.log_batch(tracker, [run_id], {"loss": 2.0, "acc": 0.5}, step=5)
        tracking.log_batch(tracker, [run_id], {"loss": 3.0}, step=3)
        time.sleep(0.005)
        tracking.log_batch(tracker, [run_id], {"loss": 1.0, "nan": float("nan"), "big": float("inf"),
                                               "small": float("-inf")}, step=5, tags={"note": "c"})
        with mock.patch.object(tracking.time, "time", return_value=1234.5):  # the same point twice
            for _ in range(2):
                tracking.log_batch(tracker, [run_id], {"dup": 4.0}, step=1)
        tracking.log_batch(tracker, [run_id], {"loss": 0.5}, step=4)  # written last, not the latest
    tracking.end_runs(tracker, [first.run_id, earlier], "FAILED")
    tracking.end_runs(tracker, [second.run_id], "FINISHED")
    return [first.run_id, second.run_id, earlier]


@pytest.mark.parametrize("every_s", [3600.0, 0.0])
def test_held_writes_leave_the_store_as_mlflows_client_does(tmp_path, every_s):
    """The reference is MLflow's own client: the same writes made through it and through the
    controller's held writes (all in one transaction, or one transaction per write) read back
    identically through the client: run fields, params, tags, latest values and every point."""
    uri = tracking.default_uri(tmp_path)
    sweep = tracking.start_sweep(uri, tracking.init_store(uri, "held", tmp_path / "art"), "held", {})
    client = MlflowClient(uri)
    views = []
    for held in (False, True):
        tracker = tracking.Tracker(uri, sweep.experiment_id, sweep.parent_run_id)
        earlier = tracking.start_run(tracker, "earlier", {"note": "e"}).run_id  # in the store before holding
        if held:
            tracker.hold_writes(every_s=every_s)
        run_ids = _write_runs(tracker, earlier)
        tracker.flush()
        views.append([_store_view(client, r, sweep.parent_run_id) for r in run_ids])
    direct, held_view = views
    assert held_view == direct
    assert direct[0]["latest"] == {"loss": 1.0, "acc": 0.5, "dup": 4.0, "nan": "nan", "big": 1.7976931348623157e308,
                                   "small": -1.7976931348623157e308}
    assert direct[0]["history"]["loss"] == [(3, 3.0), (4, 0.5), (5, 1.0), (5, 2.0)] and direct[0]["status"] == "FAILED"
    assert direct[0]["history"]["dup"] == [(1, 4.0)]


def test_held_runs_are_announced_only_once_stored_and_jobs_write_directly(tmp_path):
    """A held run is neither in the store nor announced (`on_stored`, which records its id in the
    study) before the flush; a job in another process gets the tracker without what is held."""
    import pickle
    uri = tracking.default_uri(tmp_path)
    sweep = tracking.start_sweep(uri, tracking.init_store(uri, "announce", tmp_path / "art"), "announce", {})
    tracker = tracking.Tracker(uri, sweep.experiment_id, sweep.parent_run_id).hold_writes(every_s=3600)
    stored = []
    run = tracking.start_run(tracker, "cell", {}, on_stored=stored.append)
    client = MlflowClient(uri)
    assert stored == [] and client.search_runs([sweep.experiment_id], f"attributes.run_id = '{run.run_id}'") == []
    tracker.flush()
    assert stored == [run.run_id] and client.get_run(run.run_id).info.status == "RUNNING"
    job_side = pickle.loads(pickle.dumps(tracker))
    assert job_side.held is None and tracker.held is not None
    tracking.log_batch(job_side, [run.run_id], {"x": 1.0})  # straight into the store
    assert client.get_run(run.run_id).data.metrics == {"x": 1.0}
