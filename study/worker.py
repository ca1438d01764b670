"""The worker: what runs one stage inside a job, on any backend.

The truth is the ledger (study.ledger): the worker writes RUNNING / COMPLETED / FAILED itself
(with retries of Python errors and their tracebacks), tags the cell runs with the job, logs
the stage's curves and result to MLflow, and on preemption marks the stage PREEMPTED and lets
submitit requeue the same job, which resumes from the stage's last checkpoint.

A job of several ranks (resources nodes x tasks_per_node) runs the stage function on every
rank inside one torch.distributed group (the Trainer shards batches and averages gradients;
evaluation passes are shared out with study.training.sharded, rank 0 computing the metrics);
only rank 0 writes the ledger and MLflow, and the Trainer writes checkpoints on rank 0 only.
After a requeue every rank resumes from that same checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import submitit
from submitit.slurm.slurm import SlurmJobEnvironment

from study import ledger, schema
from study.config import dump_yaml
from study.ledger import State
from study.stages import Stage, StageContext, StageResult, Upstream, get_kind, load_providers, read_stage_result
from study.tracking import MlflowCallback, Tracker, end_runs, job_tags, log_batch, log_stage_result
from study.training import Callback, ranks_leave_together


@dataclass
class StageRun:
    """One stage to execute and the cell runs (MLflow) it reports to."""
    stage: Stage
    run_ids: list[str] = field(default_factory=list)  # cell runs containing the stage
    finishes: list[str] = field(default_factory=list)  # cell runs whose last stage this is
    artifact_uris: dict[str, str] = field(default_factory=dict)  # run id -> artifact root, where the controller knows it


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

    def on_train_end(self, step: int, metrics: dict[str, float]) -> None:
        # not throttled: the stage's result is logged to MLflow at this step, the curves' last
        ledger.update_status(self.dir, step=step)


def run_stage(item: StageRun, root: Path, tracker: Optional[Tracker], retries: int = 0,
              extra_callbacks: list[Callback] = (), job_id: str = "inline", rank: int = 0) -> StageResult:
    """Execute one stage with its ledger bookkeeping; return its result.

    Runs under a per-stage lock, so two jobs that need the same stage (Optuna trials sharing
    a dataset stage) execute it once. A Python exception is retried `retries` times (the
    Trainer resumes from the stage's last checkpoint), each error kept in status.json.
    Ranks other than 0 only compute (see `_follow`)."""
    if rank != 0:
        return _follow(item, Path(root))
    stage, root = item.stage, Path(root)
    sdir = stage.dir(root)
    sdir.mkdir(parents=True, exist_ok=True)
    with ledger.file_lock(sdir / ".run.lock"):
        status = ledger.read_status(sdir)
        result = read_stage_result(sdir)
        if status["state"] == State.COMPLETED and result is not None:
            return result
        try:
            inputs = _inputs(stage, root)
        except StageFailed as blocked:
            # blocked, not failed: back to PENDING so that --retry-failed of the upstream
            # also runs it (Slurm starts it `afterany`, even when the upstream failed)
            ledger.update_status(sdir, state=State.PENDING.value, note=f"blocked: {blocked}")
            raise
        dump_yaml(stage.config, sdir / schema.STAGE_CONFIG, durable=False)  # the plan's copy, rewritten at every start
        kind = get_kind(stage.kind)
        for attempt_in_job in range(retries + 1):
            status = ledger.update_status(
                sdir, state=State.RUNNING.value, kind=stage.kind, id=stage.id, job_id=job_id,
                attempt=status.get("attempt", 0) + 1, started=time.time(), **ledger.here())
            callbacks = [_StatusCallback(sdir), *extra_callbacks]
            if tracker and item.run_ids:
                curves = MlflowCallback(tracker, item.run_ids, stage.kind)
                callbacks.append(curves)
                log_batch(tracker, item.run_ids, tags={schema.stage_tag(stage.kind): stage.id,
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
                         step=int(ledger.read_status(sdir).get("step") or 0), curves=curves.last_step,
                         artifact_uris=item.artifact_uris)
        if item.finishes:
            end_runs(tracker, item.finishes, "FINISHED")
    return result


def _inputs(stage: Stage, root: Path) -> dict[str, Upstream]:
    inputs = {}
    for key in stage.upstream:
        kind, sid = key.split("/")
        udir = root / "stages" / kind / sid
        up = read_stage_result(udir)
        state = ledger.read_status(udir)["state"]
        if up is None or state != State.COMPLETED:
            raise StageFailed(f"upstream {key} is {state.value}, not COMPLETED")
        inputs[kind] = Upstream(udir, up)
    return inputs


def _follow(item: StageRun, root: Path) -> StageResult:
    """A rank other than 0: the same stage function on the same inputs, writing no ledger and
    no MLflow (rank 0 does). No lock: rank 0 holds it while it waits for this rank in the
    process group. No retries: one rank's error breaks the group, so the job fails."""
    stage, sdir = item.stage, item.stage.dir(root)
    result = read_stage_result(sdir)
    if ledger.read_status(sdir)["state"] == State.COMPLETED and result is not None:
        return result
    return get_kind(stage.kind).run(StageContext(stage.config, sdir, _inputs(stage, root), []))


def _is_prune(err: BaseException) -> bool:
    return type(err).__name__ == "TrialPruned"  # optuna stays an optional import for the worker


_threads_limited_to: Optional[int] = None  # the limit this process set last


def _limit_threads(cpus: int) -> None:
    """A job computes on the cores it asked for: torch and the BLAS behind numpy / scikit-learn
    would otherwise start one thread per core of the node in every job, and jobs sharing a node
    slow each other down. The BLAS pools exist before this runs (submitit imports numpy), so the
    environment variable alone does not reach them; threadpoolctl resizes them in place. A process
    that runs many stages (the debug backend) sets the same limit once: threadpoolctl scans every
    loaded library per call, and a pool loaded later starts from the environment variable."""
    global _threads_limited_to
    import torch
    if cpus == _threads_limited_to and torch.get_num_threads() == cpus:
        return
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(cpus)
    threadpool_limits(limits=cpus)
    _threads_limited_to = cpus


class StageJob(submitit.helpers.Checkpointable):
    """The submitit callable for one stage. On preemption or timeout submitit calls
    checkpoint(): the stage is marked PREEMPTED and the same job is requeued; the rerun
    resumes from the Trainer's last checkpoint in the stage folder. `callbacks`: extra training
    callbacks (a search trial's pruning), pickled with the job."""

    def __init__(self, callbacks: list[Callback] = ()):
        self.callbacks = list(callbacks)

    def __call__(self, item: StageRun, root: str, plugins: list[str], tracker: Optional[Tracker],
                 retries: int) -> dict:
        _limit_threads(item.stage.resources.cpus)
        requeue_survives_its_own_kill()
        load_providers([item.stage.kind], plugins)
        rank = join_ranks()
        with ranks_leave_together():
            return run_stage(item, Path(root), tracker, retries if rank is None else 0, self.callbacks,
                             job_id=job_id(), rank=rank or 0)

    def checkpoint(self, item: StageRun, root: str, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        ledger.update_status(item.stage.dir(Path(root)), state=State.PREEMPTED.value, preempted=time.time())
        return super().checkpoint(item, root, *args, **kwargs)


def _requeue_ignoring_sigterm(env: SlurmJobEnvironment, countdown: int) -> None:
    subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60,
                   preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))


def requeue_survives_its_own_kill() -> None:
    """Make submitit's requeue on preemption reliable. Slurm carries out `scontrol requeue` by
    sending SIGTERM to every process of the job, and the scontrol that asked is one of them until
    it exits: when the signal comes first, scontrol dies after the requeue was done and submitit
    records the preempted job as failed. A SIGTERM ignored before exec stays ignored, so scontrol
    lives to report (the job's own process bypasses SIGTERM already; Slurm's SIGKILL comes only
    after its KillWait)."""
    SlurmJobEnvironment._requeue = _requeue_ignoring_sigterm


def join_ranks() -> Optional[int]:
    """In a job of several tasks: export the torch.distributed variables of this task (the
    Trainer initialises the group from them) and return its rank; None in a one-task job."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return None
    if env.num_tasks <= 1:
        return None
    # every task computes the same port; a requeued job gets a new one, so the rerun never
    # waits for the previous attempt's socket to be released
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    digits = int("".join(c for c in env.job_id if c.isdigit()) or "0")
    os.environ.setdefault("MASTER_PORT", str(20000 + (digits * 7919 + restarts * 104729) % 40000))
    # each task keeps every GPU of its node visible and picks cuda:LOCAL_RANK itself
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                     overwrite=True)
    return dist_env.rank


def job_id() -> str:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:
        return "inline"
