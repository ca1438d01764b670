"""The worker: what runs one stage inside a job, on any backend.

The truth is the ledger (study.ledger): the worker writes RUNNING / COMPLETED / FAILED itself
(with retries of Python errors and their tracebacks), tags the cell runs with the job, logs
the stage's curves and result to MLflow, and on preemption marks the stage PREEMPTED and lets
submitit requeue the same job, which resumes from the stage's last checkpoint.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import submitit

from study import ledger, schema
from study.config import dump_yaml
from study.ledger import State
from study.stages import Stage, StageContext, StageResult, Upstream, get_kind, load_providers, read_stage_result
from study.tracking import MlflowCallback, Tracker, end_runs, job_tags, log_stage_result, set_tags
from study.training import Callback


@dataclass
class StageRun:
    """One stage to execute and the cell runs (MLflow) it reports to."""
    stage: Stage
    run_ids: list[str] = field(default_factory=list)  # cell runs containing the stage
    finishes: list[str] = field(default_factory=list)  # cell runs whose last stage this is


class StageFailed(RuntimeError):
    pass


class _StatusCallback(Callback):
    """Keeps `last_metric` / `step` in status.json fresh for the status table (throttled)."""

    def __init__(self, stage_dir: Path, every_s: float = 2.0):
        self.dir, self.every_s, self.last = stage_dir, every_s, 0.0

    def on_train_start(self, trainer) -> None:  # the live view's progress bar and ETA
        ledger.update_status(self.dir, step=trainer.step, start_step=trainer.step, total_steps=trainer.cfg.steps,
                             train_started=time.time())

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if time.time() - self.last >= self.every_s:
            self.last = time.time()
            loss = next(((k, v) for k, v in metrics.items() if k.startswith("loss")), None)
            ledger.update_status(self.dir, step=step, last_metric=dict([loss]) if loss else {})


def run_stage(item: StageRun, root: Path, tracker: Optional[Tracker], retries: int = 0,
              extra_callbacks: list[Callback] = (), job_id: str = "inline") -> StageResult:
    """Execute one stage with its ledger bookkeeping; return its result.

    Runs under a per-stage lock, so two jobs that need the same stage (Optuna trials sharing
    a dataset stage) execute it once. A Python exception is retried `retries` times (the
    Trainer resumes from the stage's last checkpoint), each error kept in status.json."""
    stage, root = item.stage, Path(root)
    sdir = stage.dir(root)
    sdir.mkdir(parents=True, exist_ok=True)
    with ledger.file_lock(sdir / ".run.lock"):
        status = ledger.read_status(sdir)
        result = read_stage_result(sdir)
        if status["state"] == State.COMPLETED and result is not None:
            return result
        inputs = {}
        for key in stage.upstream:
            kind, sid = key.split("/")
            udir = root / "stages" / kind / sid
            up = read_stage_result(udir)
            if up is None or ledger.read_status(udir)["state"] != State.COMPLETED:
                # blocked, not failed: back to PENDING so that --retry-failed of the upstream
                # also runs it (Slurm starts it `afterany`, even when the upstream failed)
                msg = f"upstream {key} is {ledger.read_status(udir)['state'].value}, not COMPLETED"
                ledger.update_status(sdir, state=State.PENDING.value, note=f"blocked: {msg}")
                raise StageFailed(msg)
            inputs[kind] = Upstream(udir, up)
        dump_yaml(stage.config, sdir / schema.STAGE_CONFIG)
        kind = get_kind(stage.kind)
        for attempt_in_job in range(retries + 1):
            status = ledger.update_status(
                sdir, state=State.RUNNING.value, kind=stage.kind, id=stage.id, job_id=job_id,
                attempt=ledger.read_status(sdir).get("attempt", 0) + 1, started=time.time(), **ledger.here())
            callbacks = [_StatusCallback(sdir), *extra_callbacks]
            if tracker and item.run_ids:
                callbacks.append(MlflowCallback(tracker, item.run_ids, stage.kind))
                set_tags(tracker, item.run_ids, {schema.stage_tag(stage.kind): stage.id,
                                                 schema.stage_job_tag(stage.kind): job_id, **job_tags()})
            try:
                result = kind.run(StageContext(stage.config, sdir, inputs, callbacks))
                if not isinstance(result, StageResult):
                    raise TypeError(f"stage kind '{stage.kind}' returned {type(result).__name__}, not a StageResult")
                ledger.check_result(result.to_json())  # NaN / inf fail the stage, naming the key
                break
            except Exception as err:
                if _is_prune(err):
                    # not a failure: back to PENDING (checkpoints kept) so an identical trial resumes
                    ledger.update_status(sdir, state=State.PENDING.value, note="pruned by optuna")
                    raise
                last_try = attempt_in_job == retries
                # while a retry is pending the stage stays RUNNING: FAILED would tell the
                # controller that nothing more will happen
                ledger.update_status(sdir, state=(State.FAILED if last_try else State.RUNNING).value,
                                     ended=time.time(), errors=[{
                                         "time": time.time(), "attempt": status["attempt"], "job_id": job_id,
                                         "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}])
                if last_try:
                    if tracker and item.run_ids:
                        end_runs(tracker, item.run_ids, "FAILED")
                    raise
                time.sleep(min(60.0, 2.0 ** attempt_in_job))
        ledger.write_result(sdir, result.to_json())
        ended = time.time()
        ledger.update_status(sdir, state=State.COMPLETED.value, ended=ended,
                             runtime_s=ended - status["started"])
    if tracker and item.run_ids:
        log_stage_result(tracker, item.run_ids, stage.kind, sdir, result,
                         step=int(ledger.read_status(sdir).get("step") or 0))
        if item.finishes:
            end_runs(tracker, item.finishes, "FINISHED")
    return result


def _is_prune(err: BaseException) -> bool:
    return type(err).__name__ == "TrialPruned"  # optuna stays an optional import for the worker


def _limit_threads(cpus: int) -> None:
    """A job computes on the cores it asked for: torch would otherwise start one thread per core
    of the node in every job, and jobs sharing a node slow each other down."""
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    import torch
    torch.set_num_threads(cpus)


class StageJob(submitit.helpers.Checkpointable):
    """The submitit callable for one stage. On preemption or timeout submitit calls
    checkpoint(): the stage is marked PREEMPTED and the same job is requeued; the rerun
    resumes from the Trainer's last checkpoint in the stage folder."""

    def __call__(self, item: StageRun, root: str, plugins: list[str], tracker: Optional[Tracker],
                 retries: int) -> dict:
        _limit_threads(item.stage.resources.cpus)
        load_providers([item.stage.kind], plugins)
        return run_stage(item, Path(root), tracker, retries, job_id=job_id())

    def checkpoint(self, item: StageRun, root: str, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        ledger.update_status(item.stage.dir(Path(root)), state=State.PREEMPTED.value, preempted=time.time())
        return super().checkpoint(item, root, *args, **kwargs)


def job_id() -> str:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:
        return "inline"
