"""The controller: which stages need a job, submitting them (the whole DAG at once on Slurm:
one array per dependency level and resource shape, each level `afterany` the arrays holding
its upstream stages, so the controller may exit), following the local pool, noticing jobs that
died without a word (OOM kill, node failure, scancel), and holding one lock per sweep.
"""

from __future__ import annotations

import dataclasses
import functools
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from study import ledger, provenance, schema, tracking
from study.backends import Backend, Submitted, make_backend
from study.config import flatten, to_dict
from study.fsio import atomic_write_text
from study.ledger import ACTIVE, State
from study.spec import get_path
from study.stages import Cell, Plan, Stage, read_stage_result
from study.tracking import Tracker
from study.training import Callback
from study.worker import StageJob, StageRun


# --------------------------------------------------------------------------- one controller per sweep
class ControllerBusy(RuntimeError):
    pass


def controller_lock(plan: Plan):
    """One controller per sweep: a second `run` would double-submit. Released when the
    process dies, so a killed controller never blocks the re-run."""
    path = ledger.manifest_path(plan.root, plan.spec.name).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        raise ControllerBusy(f"another controller runs sweep '{plan.spec.name}' (pid {fh.read().strip()})")
    fh.seek(0), fh.truncate(), fh.write(str(os.getpid())), fh.flush()
    return fh


def controller_running(plan: Plan) -> bool:
    try:
        controller_lock(plan).close()
        return False
    except ControllerBusy:
        return True


# --------------------------------------------------------------------------- tracking
def open_sweep_run(plan: Plan, manifest: dict) -> Optional[tracking.Tracker]:
    """Store, experiment and the sweep's parent run, created here before any worker starts (grid
    sweeps and searches alike). The parent run recorded in the manifest is reused, so a re-run
    appends to the same runs (and the run is RUNNING again until the sweep ends)."""
    spec = plan.spec
    if not spec.tracking.enabled:
        return None
    uri = spec.tracking.uri or tracking.default_uri(plan.root)
    exp_id = tracking.init_store(uri, spec.tracking.experiment or spec.name, plan.root / "mlartifacts")
    if manifest.get("tracking", {}).get("uri") == uri and manifest["tracking"].get("parent_run_id"):
        tracker = tracking.Tracker(uri, exp_id, manifest["tracking"]["parent_run_id"])
        tracking.reopen_run(tracker, tracker.parent_run_id)
    else:
        tracker = tracking.start_sweep(uri, exp_id, spec.name, {"spec": str(Path(plan.source).resolve())})
    manifest["tracking"] = {"uri": uri, "experiment_id": exp_id, "parent_run_id": tracker.parent_run_id}
    return tracker.hold_writes()


def resolved_params(cell: Cell) -> dict:
    """What the cell's stages actually read: every semantic field with its default filled in,
    not only the keys the spec wrote."""
    params: dict = {}
    for st in cell.stages.values():
        params.update(flatten(to_dict(st.config, semantic_only=True)))
    return params


def open_cell_run(plan: Plan, tracker: tracking.Tracker, cell: Cell, name: str,
                  extra_tags: Optional[dict[str, str]] = None,
                  on_stored: Optional[Callable[[str], None]] = None) -> tracking.Run:
    """A cell's MLflow run under the sweep run; stages that already ran are logged into it now.
    `on_stored(run_id)`: called once the run is in the store."""
    tags = {schema.CELL_ID: cell.id, schema.SWEEP: plan.spec.name, schema.ROLE: schema.ROLE_CELL,
            schema.CELL: cell.id, **_seed_tag(plan.spec, cell),
            **{schema.stage_tag(k): s.id for k, s in cell.stages.items()},
            **{schema.AXIS_PREFIX + k: str(v) for k, v in cell.values.items()}, **(extra_tags or {})}
    run = tracking.start_run(tracker, name, tags, params=resolved_params(cell), on_stored=on_stored)
    _log_cached(plan, tracker, cell, run)
    return run


class CellRuns:
    """The cells' MLflow runs, each created when the first stage of its cell is submitted, so
    that a large sweep does not open every run before its first stage starts. `known`: runs
    created earlier (by a previous controller); `remember(cell_id, run_id)` records a new one
    once it is in the store."""

    def __init__(self, plan: Plan, tracker: Tracker, known: dict[str, str],
                 remember: Callable[[str, str], None], name: Optional[Callable[[Cell], str]] = None,
                 extra_tags: Optional[dict[str, str]] = None):
        self.plan, self.tracker, self.known, self.remember = plan, tracker, dict(known), remember
        self.name, self.extra_tags = name or cell_name, extra_tags
        self.artifact_uris: dict[str, str] = {}  # run id -> artifact root, of the runs created here
        self.cells_of: dict[str, list[Cell]] = {}
        for cell in plan.cells:
            for st in cell.stages.values():
                self.cells_of.setdefault(st.key, []).append(cell)

    def run_id(self, cell: Cell) -> str:
        if cell.id not in self.known:
            run = open_cell_run(self.plan, self.tracker, cell, self.name(cell), self.extra_tags,
                                on_stored=functools.partial(self.remember, cell.id))
            self.known[cell.id], self.artifact_uris[run.run_id] = run.run_id, run.artifact_uri
        return self.known[cell.id]

    def stage_run(self, key: str) -> StageRun:
        cells = self.cells_of.get(key, [])
        last = [c for c in cells if list(c.stages.values())[-1].key == key]
        run_ids = [self.run_id(c) for c in cells]
        return StageRun(self.plan.stages[key], run_ids, [self.run_id(c) for c in last],
                        {r: self.artifact_uris[r] for r in run_ids if r in self.artifact_uris})

    def close(self) -> None:
        """At the end: a cell that failed gets its error tag and traceback; a cell served whole
        from the cache (no stage was submitted) gets its run now."""
        for cell in self.plan.cells:
            failed = first_failure(self.plan.root, cell)
            if failed is not None:
                run_id = self.run_id(cell)
                record_failure(self.tracker, run_id, *failed, artifact_uri=self.artifact_uris.get(run_id))
            elif cell.id not in self.known and all(
                    ledger.read_status(st.dir(self.plan.root))["state"] == State.COMPLETED
                    for st in cell.stages.values()):
                self.run_id(cell)


def first_failure(root: Path, cell: Cell) -> Optional[tuple[str, str, Path]]:
    """(reason, traceback, stage folder) of the cell's first FAILED stage; None if none failed."""
    for kind, st in cell.stages.items():
        status = ledger.read_status(st.dir(root))
        if status["state"] == State.FAILED:
            error = (status.get("errors") or [{}])[-1]
            return f"{kind}: {error.get('error', 'failed')}", error.get("traceback", ""), st.dir(root)
    return None


def record_failure(tracker: Tracker, run_id: str, reason: str, trace: str, folder: Path,
                   artifact_uri: Optional[str] = None) -> None:
    """The error tag and the traceback artifact of a failed run, which ends FAILED."""
    path = Path(folder) / schema.TRACEBACK_FILE
    atomic_write_text(path, reason + "\n\n" + trace)
    tracking.log_batch(tracker, [run_id], tags={schema.ERROR: reason})
    tracking.log_artifact(tracker, [run_id], path, schema.ERRORS_DIR, {run_id: artifact_uri} if artifact_uri else None)
    tracking.end_runs(tracker, [run_id], "FAILED")


def open_tracking(plan: Plan, manifest: dict, fresh: bool = False) -> tuple[Optional[Tracker], Optional[CellRuns]]:
    """The sweep run, and the cell runs (created lazily). `fresh` (--force): the cells' old runs
    are deleted, so that recomputed stages do not log a second point at every step."""
    tracker = open_sweep_run(plan, manifest)
    if tracker is None:
        return None, None
    book = _run_book(plan)
    known = recorded_runs(plan, manifest)
    if fresh:
        for run_id in known.values():
            tracking.delete_run(tracker, run_id)
        _append_runs(book, {cell_id: None for cell_id in known})
        known = {}
    manifest["run_ids"] = known

    def remember(cell_id: str, run_id: str) -> None:
        manifest["run_ids"][cell_id] = run_id
        _append_runs(book, {cell_id: run_id})

    return tracker, CellRuns(plan, tracker, known, remember)


def _run_book(plan: Plan) -> Path:
    return ledger.manifest_path(plan.root, plan.spec.name).with_suffix(".runs.jsonl")


def record_start(plan: Plan, manifest: dict, command: str) -> None:
    """A run that starts work adds its provenance (command, commit, start, CPUs) to the manifest."""
    provenance.record(manifest, provenance.current(command))
    ledger.write_json(ledger.manifest_path(plan.root, plan.spec.name), manifest)


def recorded_runs(plan: Plan, manifest: dict) -> dict[str, str]:
    """cell id -> MLflow run id of every cell run created so far (the manifest's, then the run book's)."""
    return {**manifest.get("run_ids", {}), **_read_runs(_run_book(plan))}


def _read_runs(book: Path) -> dict[str, str]:
    """cell id -> run id from the append-only run book (one controller writes it; the last line wins)."""
    known: dict[str, Optional[str]] = {}
    if book.exists():
        for line in book.read_text().splitlines():
            try:
                known.update(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed controller
                continue
    return {k: v for k, v in known.items() if v}


def _append_runs(book: Path, entries: dict[str, Optional[str]]) -> None:
    book.parent.mkdir(parents=True, exist_ok=True)
    with open(book, "a") as fh:
        fh.write(json.dumps(entries) + "\n")


def end_sweep_run(tracker: Optional[Tracker], state: str) -> None:
    """The parent run ends with the sweep's state: FINISHED, FAILED (a cell failed) or KILLED;
    everything held is written."""
    if tracker is not None:
        tracking.end_runs(tracker, [tracker.parent_run_id], state)
        tracker.flush()


def _seed_tag(spec, cell: Cell) -> dict[str, str]:
    """The cell's seed (the value at the first seed key), for grouping runs by seed."""
    for key in spec.seed_keys:
        value = get_path(cell.config, key, None)
        if value is not None:
            return {schema.SEED: str(value)}
    return {}


def _log_cached(plan: Plan, tracker: tracking.Tracker, cell: Cell, run: tracking.Run) -> None:
    """A new cell run whose stages already ran (in another sweep) gets their results now."""
    done = 0
    for kind, st in cell.stages.items():
        result = read_stage_result(st.dir(plan.root))
        status = ledger.read_status(st.dir(plan.root))
        if result is not None and status["state"] == State.COMPLETED:
            done += 1
            tracking.log_stage_result(tracker, [run.run_id], kind, st.dir(plan.root), result,
                                      step=int(status.get("step") or 0), artifact_uris={run.run_id: run.artifact_uri})
    if done == len(cell.stages):
        tracking.end_runs(tracker, [run.run_id], "FINISHED")


def cell_name(cell: Cell) -> str:
    """`name=inhouse:dino,kind=vfmtok,seed=0`: the last part of each axis key (a seed written to
    several keys once)."""
    return ",".join(dict.fromkeys(f"{k.split('.')[-1]}={v}" for k, v in cell.values.items())) or cell.id


# --------------------------------------------------------------------------- scheduling
def reset_stage(stage_dir: Path, keep_checkpoints: bool) -> None:
    """Back to PENDING (for --force: from scratch; for --retry-failed: resume from checkpoints)."""
    if not keep_checkpoints and stage_dir.exists():
        for child in stage_dir.iterdir():
            if not child.name.startswith("."):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    (stage_dir / "result.json").unlink(missing_ok=True)
    ledger.update_status(stage_dir, state=State.PENDING.value)


def mark_lost(stage_dir: Path, job_id: str, stdout: Optional[str]) -> bool:
    """A job that ended while its stage was still active: FAILED with the log tail. Checked
    under the status lock, so a worker that just wrote COMPLETED is not overwritten."""
    with ledger.file_lock(stage_dir / ".status.lock"):
        status = ledger.read_status(stage_dir)
        if status["state"] not in ACTIVE or status.get("job_id") != job_id:
            return False
    tail = ""
    for path in (stdout, stdout and stdout.replace(".out", ".err")):
        if path and Path(path).exists():
            tail += Path(path).read_text(errors="replace")[-2000:]
    ledger.update_status(stage_dir, state=State.FAILED.value, ended=time.time(), errors=[{
        "time": time.time(), "job_id": job_id, "error": f"job {job_id} ended without finishing the stage",
        "traceback": tail}])
    return True


@dataclass
class Progress:
    """What a scheduling pass leaves for the follow loop."""
    submitted: dict[str, Submitted] = field(default_factory=dict)  # stage key -> job
    waiting: list[str] = field(default_factory=list)  # stage keys not yet submitted (local pool)


class Scheduler:
    """Decides which stages run, submits them, and keeps submitting (local pool) until done.

    Stage rules: COMPLETED is never recomputed (unless force); FAILED stays failed (unless
    retry_failed); an active stage whose job is alive is followed, not resubmitted; an active
    stage whose job is gone (controller killed, node lost) is resubmitted and resumes from its
    checkpoints."""

    def __init__(self, stages: dict[str, Stage], runs: Optional[CellRuns], backend: Backend,
                 plugins: list[str], tracker: Optional[Tracker], retries: int,
                 callbacks: Optional[dict[str, list[Callback]]] = None):
        self.stages, self.runs, self.backend = stages, runs, backend
        self.callbacks = callbacks or {}  # stage kind -> extra training callbacks (a search's pruning)
        self.plugins, self.tracker, self.retries = plugins, tracker, retries
        self.root = backend.root
        self.progress = Progress()

    def dir(self, key: str) -> Path:
        return self.stages[key].dir(self.root)

    def state(self, key: str) -> State:
        return ledger.read_status(self.dir(key))["state"]

    def prepare(self, force: bool, retry_failed: bool) -> list[str]:
        """Stage keys that need a job now, in dependency order."""
        todo = []
        for key in self.stages:
            sdir = self.dir(key)
            status = ledger.read_status(sdir)
            state = status["state"]
            if force:
                reset_stage(sdir, keep_checkpoints=False)
                todo.append(key)
            elif state == State.COMPLETED and read_stage_result(sdir) is not None:
                continue
            elif state == State.FAILED:
                if retry_failed:
                    reset_stage(sdir, keep_checkpoints=True)
                    todo.append(key)
            elif state in ACTIVE and status.get("job_id") and self._alive(status):
                continue
            else:
                todo.append(key)
        return todo

    def _alive(self, status: dict) -> bool:
        backend = make_backend(dataclasses.replace(self.backend.spec, backend=status.get("backend", "local")),
                               self.root) if status.get("backend") != self.backend.name else self.backend
        try:
            return backend.alive(status["job_id"], status)
        except Exception:  # noqa: BLE001 -- e.g. sacct unreachable: do not double-submit
            return True

    def _args(self, key: str) -> tuple:
        run = self.runs.stage_run(key) if self.runs else StageRun(self.stages[key])
        return (run, str(self.root), self.plugins, self.tracker, self.retries)

    def _submit(self, keys: list[str], after: list[str] = ()) -> list[Submitted]:
        res, args = self.stages[keys[0]].resources, [self._args(k) for k in keys]
        if self.tracker and self.backend.name != "debug":
            self.tracker.flush()  # a job in another process logs into the runs `_args` created
        jobs = self.backend.submit(StageJob(self.callbacks.get(self.stages[keys[0]].kind, [])), args, res,
                                   name=self.stages[keys[0]].kind, after=after)
        for key, job in zip(keys, jobs):
            if self.backend.name != "debug":
                ledger.mark_submitted(self.dir(key), job.job_id, backend=self.backend.name, stdout=job.stdout)
            self.progress.submitted[key] = job
        return jobs

    def start(self, todo: list[str]) -> None:
        if self.backend.name == "slurm":
            self._submit_dag(todo)
        else:
            self.progress.waiting = self._critical_first(todo)
            self.step()

    def _critical_first(self, keys: list[str]) -> list[str]:
        """The order free slots take ready stages in: the stage more later stages wait on goes first
        (a backbone before a tokenizer of another backbone), so that no slot idles at the end of a
        sweep while the last backbone's chain runs alone; ties keep the plan's order."""
        below: dict[str, set[str]] = {key: set() for key in self.stages}
        for key in reversed(list(self.stages)):  # the plan lists upstream stages first
            for up in self.stages[key].upstream:
                below[up] |= below[key] | {key}
        order = {key: i for i, key in enumerate(self.stages)}
        return sorted(keys, key=lambda key: (-len(below[key]), order[key]))

    def _submit_dag(self, todo: list[str]) -> None:
        """Every level at once; a level's arrays start after the arrays of its upstream stages."""
        todo_set = set(todo)
        depth: dict[str, int] = {}
        for key in self.stages:
            depth[key] = 1 + max((depth[u] for u in self.stages[key].upstream), default=-1)
        for level in sorted({depth[k] for k in todo}):
            groups: dict[tuple, list[str]] = {}
            for key in (k for k in todo if depth[k] == level):
                groups.setdefault(dataclasses.astuple(self.stages[key].resources) + (self.stages[key].kind,),
                                  []).append(key)
            for keys in groups.values():
                after = set()
                for key in keys:
                    for up in self.stages[key].upstream:
                        job = self.progress.submitted.get(up)
                        if up in todo_set and job:
                            after.add(job.job_id.split("_")[0])
                        elif self.state(up) in ACTIVE:  # queued by an earlier invocation
                            after.add(str(ledger.read_status(self.dir(up)).get("job_id", "")).split("_")[0])
                self._submit(keys, after=sorted(a for a in after if a))

    def step(self) -> None:
        """Local/debug: submit every waiting stage whose upstream is COMPLETED, while slots are free.
        Then what this controller holds for MLflow is written (once per pass of the follow loop)."""
        if self.backend.name != "slurm":
            for key in list(self.progress.waiting):
                ups = [self.state(u) for u in self.stages[key].upstream]
                if any(s == State.FAILED for s in ups):
                    continue  # blocked; shown as such, resubmitted after --retry-failed
                if all(s == State.COMPLETED for s in ups) and self.backend.free(self.stages[key].resources):
                    self.progress.waiting.remove(key)
                    self._submit([key])
        if self.tracker:
            self.tracker.flush()

    def check_jobs(self) -> None:
        """Mark stages whose job died without a word (OOM kill, scancel, lost node) as FAILED."""
        slow = self.backend.name == "slurm"  # sacct calls: not on every poll
        if slow and time.time() - getattr(self, "_last_check", 0.0) < 15:
            return
        self._last_check = time.time()
        for key in self.stages:
            status = ledger.read_status(self.dir(key))
            if status["state"] not in ACTIVE or not status.get("job_id"):
                continue
            job = self.progress.submitted.get(key)
            if job is not None and job.handle is not None and job.job_id == status["job_id"]:
                dead = job.handle.done()
            else:
                dead = not self._alive(status)
            if dead:
                time.sleep(0.2)  # let a worker's last status write land before judging
                mark_lost(self.dir(key), status["job_id"], status.get("stdout"))

    def pending(self) -> bool:
        """True while something may still change (active stages or runnable waiting ones)."""
        if any(self.state(k) in ACTIVE for k in self.stages):
            return True
        return any(all(self.state(u) == State.COMPLETED for u in self.stages[k].upstream)
                   for k in self.progress.waiting)
