"""MLflow for sweeps: one parent run per sweep, one child run per cell (linked by the
`mlflow.parentRunId` tag, so jobs in other processes can attach), stage curves with steps.

The controller creates the store (a copy of an empty one), the experiment and the parent run before any
worker starts, and each cell run before the first job of its cell: N workers racing to migrate
a fresh sqlite file all fail.  Workers only append to existing runs.  A stage shared by several cells logs into each
of their runs, prefixed with its kind (`toy_train/loss/model`), so every cell run is complete
on its own in the MLflow UI.

The controller's own writes to a sqlite store (cell runs, and everything stages run in its
process log) go through a `WriteBehind`: held in memory and written in one transaction at
most a second apart, because MLflow's client commits up to three transactions per call, the
most of a trivial cell's cost. Jobs in other processes write through the client.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, TypeVar

from study import ledger, schema
from study.config import flatten
from study.fsio import atomic_copy, cache_root
from study.training import Callback

if TYPE_CHECKING:  # the writers in jobs import this module: keep it free of the engine
    from study.stages import StageResult

T = TypeVar("T")
_PACKAGES = ("torch", "mlflow", "optuna", "submitit", "vfmstudy")


@dataclass(frozen=True)
class Tracker:
    """What a job needs to log: picklable, no client inside."""
    uri: str
    experiment_id: str
    parent_run_id: str
    held: ClassVar[Optional["WriteBehind"]] = None  # this process's held writes (see hold_writes)

    @functools.cached_property
    def client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.uri)

    def __getstate__(self):  # the cached client and held writes stay in this process
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id}

    def __setstate__(self, state):
        for k, v in state.items():
            object.__setattr__(self, k, v)

    def hold_writes(self, every_s: float = 1.0) -> "Tracker":
        """From now on this process's writes to a sqlite store are held and written together at
        most `every_s` apart (and on `flush`); other stores are written at once."""
        if self.uri.startswith("sqlite:///") and self.held is None:
            location = self.client.get_experiment(self.experiment_id).artifact_location
            object.__setattr__(self, "held", WriteBehind(self.uri, self.experiment_id, location, every_s))
        return self

    def flush(self) -> None:
        """Write what is held; before another process needs to see it, and at the end."""
        if self.held is not None:
            self.held.flush()


def retry(fn: Callable[..., T], *args, attempts: int = 8, **kwargs) -> T:
    """Call `fn`, retrying on transient store contention ("database is locked", HTTP 5xx/429)."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 -- mlflow wraps sqlite/HTTP errors in several types
            text = str(err).lower()
            transient = any(s in text for s in ("locked", "busy", "429", "503", "502", "timed out", "connection"))
            if not transient or i == attempts - 1:
                raise
            time.sleep(min(5.0, 0.1 * 2 ** i) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def default_uri(root: Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def init_store(uri: str, experiment: str, artifact_root: Path) -> str:
    """Create/migrate the store and the experiment (controller only); return the experiment id.

    Several controllers may share one sqlite store: the first to arrive creates the schema and
    the others wait on a lock file next to it, because two concurrent migrations of a fresh
    file fail. A server store (http) serialises this itself."""
    with _store_lock(uri):
        from mlflow.tracking import MlflowClient
        if uri.startswith("sqlite:///"):
            _copy_empty_store(Path(uri.removeprefix("sqlite:///")))
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        location = None if uri.startswith("http") else Path(artifact_root).resolve().as_uri()
        return client.create_experiment(experiment, artifact_location=location)


def _copy_empty_store(db: Path) -> None:
    """A new sqlite store starts as a copy of an empty one with MLflow's schema, built once per
    MLflow version under the cache: replaying the schema's migrations is most of what creating a
    store costs, and the tests and every new study folder pay it. MLflow then opens the copy as
    it opens any existing store (checks the schema revision, adds its default experiment)."""
    if db.exists():
        return
    import mlflow
    template = cache_root() / "mlflow" / f"empty-store-{mlflow.__version__}.db"
    try:
        if not template.is_file():
            with ledger.file_lock(template.with_name(template.name + ".lock")):
                if not template.is_file():
                    _build_empty_store(template)
        atomic_copy(template, db)
    except OSError:  # an unwritable cache: MLflow creates the store itself
        return


def _build_empty_store(path: Path) -> None:
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables
    building = path.with_name(f".{path.name}.{os.getpid()}.building")
    engine = sqlalchemy.create_engine(f"sqlite:///{building}")
    try:
        _initialize_tables(engine)  # what MLflow runs on a store without tables
        engine.dispose()
        os.replace(building, path)
    except BaseException:
        engine.dispose()
        building.unlink(missing_ok=True)
        raise


def _store_lock(uri: str):
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    return ledger.file_lock(db.with_name(db.name + ".lock"))


def provenance() -> dict[str, str]:
    """git SHA + dirty flag (MLflow records no dirty flag) and package versions."""
    tags: dict[str, str] = {}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            tags["git.sha"] = sha.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            tags["git.dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    for pkg in _PACKAGES:
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags


def job_tags() -> dict[str, str]:
    env = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
           "SLURM_ARRAY_TASK_ID": "slurm.array_task_id", "SUBMITIT_LOCAL_JOB_ID": "submitit.local_job_id"}
    return {tag: os.environ[var] for var, tag in env.items() if var in os.environ}


@dataclass(frozen=True)
class Run:
    """A run as its creator knows it: the id, and where its artifacts go (so that writers need not
    read the run back from the store to find out)."""
    run_id: str
    artifact_uri: str


def start_run(tracker: Tracker, name: str, tags: dict[str, str], params: dict[str, Any] | None = None,
              parent: bool = False, on_stored: Optional[Callable[[str], None]] = None) -> Run:
    """A new run; `on_stored(run_id)` is called once the run is in the store (later, for held
    writes), so that nothing records the id of a run a killed controller never wrote."""
    from mlflow.entities import Param
    all_tags = dict(tags)
    if not parent:
        all_tags[schema.PARENT_RUN] = tracker.parent_run_id
    flat = [Param(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]
    if tracker.held is not None:
        return tracker.held.create_run(name, all_tags, flat, on_stored)
    info = retry(tracker.client.create_run, tracker.experiment_id, run_name=name, tags=all_tags).info
    retry(tracker.client.log_batch, info.run_id, params=flat)  # the client splits it within MLflow's limits per call
    if on_stored is not None:
        on_stored(info.run_id)
    return Run(info.run_id, info.artifact_uri)


def start_sweep(uri: str, experiment_id: str, name: str, tags: dict[str, str]) -> Tracker:
    base = Tracker(uri, experiment_id, "")
    run = start_run(base, name, {schema.SWEEP: name, schema.ROLE: schema.ROLE_SWEEP, **provenance(), **tags},
                    parent=True)
    return Tracker(uri, experiment_id, run.run_id)


def log_batch(tracker: Tracker, run_ids: list[str], metrics: Optional[dict[str, float]] = None, step: int = 0,
              tags: Optional[dict[str, str]] = None) -> None:
    """Metrics (at `step`) and tags into each run: one client call per run (the client splits it
    within MLflow's limits per store call; a retried call logs nothing twice)."""
    from mlflow.entities import Metric, RunTag
    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    labels = [RunTag(k, str(v)[:8000]) for k, v in (tags or {}).items()]
    for run_id in run_ids:
        if tracker.held is not None:
            tracker.held.log(run_id, points, labels)
        else:
            retry(tracker.client.log_batch, run_id, metrics=points, tags=labels)


def log_artifact(tracker: Tracker, run_ids: list[str], path: Path, artifact_dir: str,
                 artifact_uris: Optional[dict[str, str]] = None) -> None:
    """`artifact_uris`: run id -> the run's artifact root where the caller knows it (a run this
    process created); any other run is read from the store to find its root."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.file_utils import local_file_uri_to_path
    for run_id in run_ids:
        uri = (artifact_uris or {}).get(run_id)
        if uri is None:  # the client reads the run from the store
            tracker.flush()
            retry(tracker.client.log_artifact, run_id, str(path), artifact_dir)
        elif uri.startswith("file:"):  # a folder: a copy, without the repository's per-call path checks
            atomic_copy(path, Path(local_file_uri_to_path(uri)) / artifact_dir / Path(path).name, durable=False)
        else:
            retry(get_artifact_repository(uri, tracking_uri=tracker.uri).log_artifact, str(path), artifact_dir)


def end_runs(tracker: Tracker, run_ids: list[str], status: str) -> None:
    """status: FINISHED | FAILED | KILLED."""
    for run_id in run_ids:
        if tracker.held is not None:
            tracker.held.end(run_id, status)
        else:
            retry(tracker.client.set_terminated, run_id, status)


def reopen_run(tracker: Tracker, run_id: str) -> None:
    """A run ended by an earlier controller is RUNNING again while this one works on it."""
    tracker.flush()
    retry(tracker.client.update_run, run_id, status="RUNNING")


def delete_run(tracker: Tracker, run_id: str) -> None:
    """Hide a run whose results are being recomputed (MLflow keeps it, marked deleted)."""
    tracker.flush()
    retry(tracker.client.delete_run, run_id)


def log_stage_result(tracker: Tracker, run_ids: list[str], kind: str, stage_dir: Path, result: StageResult,
                     step: int = 0, curves: Optional[dict[str, int]] = None,
                     artifact_uris: Optional[dict[str, str]] = None) -> None:
    """A finished stage's result into the cell runs that contain it: its metrics as
    `<kind>/<key>` and its tags (e.g. backbone, family) in one call per run, its config and its
    artifacts. `step`: the stage's last training step, so that a final value shares the x axis of the
    curve the stage's callback logged under the same name (at step 0 it would read as the
    curve's starting point). `curves`: name -> last step the callback logged it at; a final value
    the curve already holds at that step is not logged a second time."""
    curves = curves or {}
    metrics = {schema.metric(kind, k): v for k, v in result.metrics.items()}
    log_batch(tracker, run_ids, {name: v for name, v in metrics.items() if curves.get(name) != step}, step=step,
              tags=result.tags)
    log_artifact(tracker, run_ids, Path(stage_dir) / schema.STAGE_CONFIG, schema.stage_config_artifact_dir(kind),
                 artifact_uris)
    for folder, files in result.artifacts.items():
        for name in files:
            log_artifact(tracker, run_ids, ledger.result_path(stage_dir, name), folder, artifact_uris)


class WriteBehind:
    """A sqlite store's writes, held in memory and written in one transaction: new runs with their
    params and tags, tags and metric points of runs, run ends. What lands is what MLflow's client
    would have written: its checks run when a write is made (a bad key fails at its call), a
    repeated point is stored once, the latest value per key is the last by (step, timestamp,
    value), NaN is stored as 0 with is_nan and inf as the largest float."""

    def __init__(self, uri: str, experiment_id: str, artifact_location: str, every_s: float):
        import sqlalchemy
        self.engine = sqlalchemy.create_engine(uri)
        self.experiment_id, self.location, self.every_s = int(experiment_id), artifact_location, every_s
        self.last = time.monotonic()
        self._clear()

    def _clear(self) -> None:
        self.runs: dict[str, dict] = {}  # run id -> row, of runs not yet in the store
        self.params: list[dict] = []
        self.tags: dict[tuple[str, str], str] = {}  # (run id, key) -> value; the last write wins
        self.points: dict[tuple, dict] = {}  # a metric row by its primary key
        self.ends: dict[str, dict] = {}  # run id -> status and end time, of runs already in the store
        self.stored: list[Callable[[], None]] = []

    def create_run(self, name: str, tags: dict[str, str], params: list, on_stored) -> Run:
        from mlflow.entities import RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_USER
        from mlflow.utils.uri import append_to_uri_path
        from mlflow.utils.validation import _validate_batch_log_data
        tags = {**tags, MLFLOW_RUN_NAME: name}
        _validate_batch_log_data([], params, [RunTag(k, v) for k, v in tags.items()])
        run_id = uuid.uuid4().hex
        artifact_uri = append_to_uri_path(self.location, run_id, "artifacts")
        self.runs[run_id] = dict(
            run_uuid=run_id, name=name, source_type="UNKNOWN", source_name="", entry_point_name="",
            user_id=tags.get(MLFLOW_USER, "unknown"), status="RUNNING", start_time=int(time.time() * 1000),
            end_time=None, deleted_time=None, source_version="", lifecycle_stage="active",
            artifact_uri=artifact_uri, experiment_id=self.experiment_id)
        self.params += [{"run_uuid": run_id, "key": p.key, "value": p.value} for p in params]
        self.tags.update({(run_id, k): v for k, v in tags.items()})
        if on_stored is not None:
            self.stored.append(lambda: on_stored(run_id))
        self._due()
        return Run(run_id, artifact_uri)

    def log(self, run_id: str, points: list, labels: list) -> None:
        from mlflow.utils.validation import _validate_batch_log_data
        _validate_batch_log_data(points, [], labels)
        for m in points:
            is_nan = math.isnan(m.value)
            value = 0.0 if is_nan else max(-sys.float_info.max, min(sys.float_info.max, m.value))
            row = dict(run_uuid=run_id, key=m.key, value=value, timestamp=m.timestamp, step=m.step, is_nan=is_nan)
            self.points.setdefault((run_id, m.key, m.timestamp, m.step, value, is_nan), row)
        self.tags.update({(run_id, t.key): t.value for t in labels})
        self._due()

    def end(self, run_id: str, status: str) -> None:
        change = {"status": status, "end_time": int(time.time() * 1000)}
        (self.runs.get(run_id) or self.ends.setdefault(run_id, {})).update(change)
        self._due()

    def _due(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.runs or self.tags or self.points or self.ends:
            retry(self._write)
        stored = self.stored
        self._clear()
        self.last = time.monotonic()
        for fn in stored:
            fn()

    def _write(self) -> None:
        import sqlalchemy as sa
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
        from sqlalchemy.dialects.sqlite import insert
        latest: dict[tuple[str, str], dict] = {}
        for row in self.points.values():
            old = latest.get((row["run_uuid"], row["key"]))
            if old is None or (row["step"], row["timestamp"], row["value"]) > (old["step"], old["timestamp"], old["value"]):
                latest[row["run_uuid"], row["key"]] = row
        tags, last = insert(SqlTag.__table__), insert(SqlLatestMetric.__table__)
        held, runs = SqlLatestMetric.__table__.c, SqlRun.__table__
        writes = [
            (insert(runs), list(self.runs.values())),
            (insert(SqlParam.__table__), self.params),
            (tags.on_conflict_do_update(index_elements=["key", "run_uuid"], set_={"value": tags.excluded.value}),
             [{"run_uuid": r, "key": k, "value": v} for (r, k), v in self.tags.items()]),
            (insert(SqlMetric.__table__).on_conflict_do_nothing(), list(self.points.values())),
            (last.on_conflict_do_update(
                index_elements=["key", "run_uuid"],
                set_={c: last.excluded[c] for c in ("value", "timestamp", "step", "is_nan")},
                where=sa.tuple_(last.excluded.step, last.excluded.timestamp, last.excluded.value)
                > sa.tuple_(held.step, held.timestamp, held.value)), list(latest.values())),
            (sa.update(runs).where(runs.c.run_uuid == sa.bindparam("id")).values(
                status=sa.bindparam("new_status"), end_time=sa.bindparam("new_end")),
             [{"id": r, "new_status": e["status"], "new_end": e["end_time"]} for r, e in self.ends.items()]),
        ]
        with self.engine.begin() as db:
            for statement, rows in writes:
                if rows:
                    db.execute(statement, rows)


class MlflowCallback(Callback):
    """Training curves of one stage into the cell runs that contain it, at the Trainer's steps."""

    def __init__(self, tracker: Tracker, run_ids: list[str], prefix: str):
        self.tracker, self.run_ids, self.prefix = tracker, list(run_ids), prefix
        self.last_step: dict[str, int] = {}  # metric name -> the last step it was logged at

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        named = {schema.metric(self.prefix, k): v for k, v in metrics.items()}
        log_batch(self.tracker, self.run_ids, named, step)
        self.last_step.update(dict.fromkeys(named, step))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._log(step, metrics)
