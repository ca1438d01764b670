"""Running stages: the job callable (what executes on a worker) and the three backends.

    debug  - in the controller process, one stage after another (breakpoints work)
    local  - submitit LocalExecutor behind our own slot pool: submitit's local executor starts
             every job at once and gives all of them the same GPUs (submitit #1685), so jobs
             start only when their resources are free, one job per GPU via CUDA_VISIBLE_DEVICES
    slurm  - submitit job arrays under executor.batch(), chunked to the site's MaxArraySize,
             one array per dependency level and resource shape, each level `afterany` the
             arrays holding its upstream stages: the whole DAG is queued at once, so the
             controller may exit (--detach) and Slurm keeps going

Whatever the backend, the truth is the ledger (study.ledger): the worker writes RUNNING /
COMPLETED / FAILED itself, and the controller only needs job ids to notice jobs that died
without a word (OOM kill, node failure, scancel).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from study import ledger
from study.config import dump_yaml
from study.ledger import ACTIVE, State
from study.spec import LauncherSpec, Resources
from study.stages import Stage, StageContext, Upstream, get_kind, load_providers
from study.tracking import MlflowCallback, Tracker, end_runs, job_tags, log_stage_result, set_tags
from study.training import Callback


# --------------------------------------------------------------------------- worker side
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

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if time.time() - self.last >= self.every_s:
            self.last = time.time()
            loss = next(((k, v) for k, v in metrics.items() if k.startswith("loss")), None)
            ledger.update_status(self.dir, step=step, last_metric=dict([loss]) if loss else {})


def run_stage(item: StageRun, root: Path, tracker: Optional[Tracker], retries: int = 0,
              extra_callbacks: list[Callback] = (), job_id: str = "inline") -> dict:
    """Execute one stage with its ledger bookkeeping; return its result.

    Runs under a per-stage lock, so two jobs that need the same stage (Optuna trials sharing
    a dataset stage) execute it once. A Python exception is retried `retries` times (the
    Trainer resumes from the stage's last checkpoint), each error kept in status.json."""
    stage, root = item.stage, Path(root)
    sdir = stage.dir(root)
    sdir.mkdir(parents=True, exist_ok=True)
    with ledger.file_lock(sdir / ".run.lock"):
        status = ledger.read_status(sdir)
        result = ledger.read_result(sdir)
        if status["state"] == State.COMPLETED and result is not None:
            return result
        inputs = {}
        for key in stage.upstream:
            kind, sid = key.split("/")
            udir = root / "stages" / kind / sid
            up = ledger.read_result(udir)
            if up is None or ledger.read_status(udir)["state"] != State.COMPLETED:
                # blocked, not failed: back to PENDING so that --retry-failed of the upstream
                # also runs it (Slurm starts it `afterany`, even when the upstream failed)
                msg = f"upstream {key} is {ledger.read_status(udir)['state'].value}, not COMPLETED"
                ledger.update_status(sdir, state=State.PENDING.value, note=f"blocked: {msg}")
                raise StageFailed(msg)
            inputs[kind] = Upstream(udir, up)
        dump_yaml(stage.config, sdir / "config.yaml")
        kind = get_kind(stage.kind)
        for attempt_in_job in range(retries + 1):
            status = ledger.update_status(
                sdir, state=State.RUNNING.value, kind=stage.kind, id=stage.id, job_id=job_id,
                attempt=ledger.read_status(sdir).get("attempt", 0) + 1, started=time.time(), **ledger.here())
            callbacks = [_StatusCallback(sdir), *extra_callbacks]
            if tracker and item.run_ids:
                callbacks.append(MlflowCallback(tracker, item.run_ids, stage.kind))
                set_tags(tracker, item.run_ids, {f"stage.{stage.kind}": stage.id,
                                                 f"stage.{stage.kind}.job_id": job_id, **job_tags()})
            try:
                result = ledger.check_result(kind.run(StageContext(stage.config, sdir, inputs, callbacks)))
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
        ledger.write_result(sdir, result)
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
        load_providers(plugins)
        return run_stage(item, Path(root), tracker, retries, job_id=_job_id())

    def checkpoint(self, item: StageRun, root: str, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        ledger.update_status(item.stage.dir(Path(root)), state=State.PREEMPTED.value, preempted=time.time())
        return super().checkpoint(item, root, *args, **kwargs)


def _job_id() -> str:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:
        return "inline"


# --------------------------------------------------------------------------- backends
@dataclass
class Submitted:
    job_id: str
    stdout: Optional[str] = None
    handle: Any = None  # a submitit Job when this process submitted it


class Backend:
    """Submits callables with resources; tells whether a job id is still alive."""

    name = "base"
    streams = False  # True: submit() starts jobs only when free(); the controller paces them

    def __init__(self, spec: LauncherSpec, root: Path):
        self.spec, self.root = spec, Path(root)
        self.folder = self.root / "submitit" / "%j"

    def free(self, res: Resources) -> bool:
        return True

    def submit(self, fn: Callable, args: list[tuple], res: Resources, name: str,
               after: list[str] = ()) -> list[Submitted]:
        raise NotImplementedError

    def alive(self, job_id: str, status: dict) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        """Forget jobs that finished (frees local slots)."""

    def _params(self, res: Resources, name: str) -> dict:
        params = dict(timeout_min=res.timeout_min, cpus_per_task=res.cpus, gpus_per_node=res.gpus,
                      mem_gb=res.mem_gb, name=name)
        params.update(self.spec.submitit)
        return params


class DebugBackend(Backend):
    """Runs each job in this process at submit time; nothing outlives the controller."""
    name = "debug"

    def submit(self, fn, args, res, name, after=()):
        out = []
        for a in args:
            try:
                fn(*a)
            except Exception:  # recorded in the ledger by run_stage; the sweep goes on
                pass
            out.append(Submitted("debug"))
        return out

    def alive(self, job_id, status):
        return False


class LocalBackend(Backend):
    """A slot pool over submitit's LocalExecutor: a GPU is given to one job at a time."""
    name = "local"
    streams = True

    def __init__(self, spec: LauncherSpec, root: Path):
        super().__init__(spec, root)
        self.gpus = list(spec.gpus) if spec.gpus is not None else list(range(_visible_gpu_count()))
        self.cpus = os.cpu_count() or 1
        self.max_parallel = spec.max_parallel or max(1, len(self.gpus) or self.cpus)
        self.running: dict[str, tuple[Any, list[int], int]] = {}  # job id -> (job, gpus, cpus)

    def release(self) -> None:
        for job_id, (job, _, _) in list(self.running.items()):
            if job.done():
                del self.running[job_id]

    def free(self, res: Resources) -> bool:
        self.release()
        if len(self.running) >= self.max_parallel:
            return False
        busy = {g for _, gpus, _ in self.running.values() for g in gpus}
        if res.gpus > len(self.gpus):
            raise ValueError(f"a stage asks for {res.gpus} GPUs but the local pool has {len(self.gpus)}")
        used_cpus = sum(c for _, _, c in self.running.values())
        # a job larger than the machine still runs, alone, rather than never
        cpu_ok = used_cpus + res.cpus <= self.cpus or not self.running
        return len(self.gpus) - len(busy) >= res.gpus and cpu_ok

    def submit(self, fn, args, res, name, after=()):
        out = []
        for a in args:
            busy = {g for _, gpus, _ in self.running.values() for g in gpus}
            gpus = [g for g in self.gpus if g not in busy][: res.gpus]
            # LocalExecutor itself: AutoExecutor does not pass visible_gpus through
            ex = submitit.LocalExecutor(folder=self.folder)
            extra = {k.removeprefix("local_"): v for k, v in self.spec.submitit.items() if k.startswith("local_")}
            ex.update_parameters(timeout_min=res.timeout_min, gpus_per_node=res.gpus, visible_gpus=tuple(gpus),
                                 **extra)
            job = ex.submit(fn, *a)
            self.running[job.job_id] = (job, gpus, res.cpus)
            out.append(Submitted(job.job_id, str(job.paths.stdout), job))
        return out

    def alive(self, job_id, status):
        if job_id in self.running:
            return not self.running[job_id][0].done()
        if status.get("host") not in (None, ledger.here()["host"]):
            return True  # another machine's process: cannot tell, assume it lives
        pid = status.get("pid") if status.get("job_id") == job_id and status.get("pid") else job_id
        return _pid_alive(int(pid)) if str(pid).isdigit() else False


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, spec: LauncherSpec, root: Path):
        super().__init__(spec, root)
        self._max_array: Optional[int] = spec.max_array_size

    @property
    def max_array(self) -> int:
        if self._max_array is None:
            self._max_array = site_max_array_size()
        return self._max_array

    def submit(self, fn, args, res, name, after=()):
        params = self._params(res, name)
        params["slurm_array_parallelism"] = self.spec.array_parallelism
        if res.partition:
            params["slurm_partition"] = res.partition
        extra = dict(params.pop("slurm_additional_parameters", {}) or {})
        if after:
            extra["dependency"] = "afterany:" + ":".join(sorted(set(after)))
        out = []
        for start in range(0, len(args), self.max_array):
            ex = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
            ex.update_parameters(**params, slurm_additional_parameters=extra)
            with ex.batch():
                jobs = [ex.submit(fn, *a) for a in args[start:start + self.max_array]]
            out.extend(Submitted(j.job_id, str(j.paths.stdout), j) for j in jobs)
        return out

    def alive(self, job_id, status):
        state = submitit.SlurmJob(folder=self.folder, job_id=job_id).watcher.get_state(job_id, mode="force")
        return state.split()[0] not in _SLURM_DONE


_SLURM_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
               "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


def site_max_array_size() -> int:
    """MaxArraySize from `scontrol show config` (array indices go up to MaxArraySize - 1)."""
    try:
        text = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 1000
    for line in text.splitlines():
        if line.strip().startswith("MaxArraySize"):
            return max(1, int(line.split("=")[1].strip()) - 1)
    return 1000  # Slurm's default MaxArraySize is 1001


def make_backend(spec: LauncherSpec, root: Path) -> Backend:
    return {"debug": DebugBackend, "local": LocalBackend, "slurm": SlurmBackend}[spec.backend](spec, root)


def _visible_gpu_count() -> int:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([g for g in env.split(",") if g.strip()])
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


# --------------------------------------------------------------------------- controller side
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

    def __init__(self, stages: dict[str, Stage], runs: dict[str, StageRun], backend: Backend,
                 plugins: list[str], tracker: Optional[Tracker], retries: int):
        self.stages, self.runs, self.backend = stages, runs, backend
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
            elif state == State.COMPLETED and ledger.read_result(sdir) is not None:
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
        return (self.runs[key], str(self.root), self.plugins, self.tracker, self.retries)

    def _submit(self, keys: list[str], after: list[str] = ()) -> list[Submitted]:
        res = self.stages[keys[0]].resources
        jobs = self.backend.submit(StageJob(), [self._args(k) for k in keys], res,
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
            self.progress.waiting = list(todo)
            self.step()

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
        """Local/debug: submit every waiting stage whose upstream is COMPLETED, while slots are free."""
        if self.backend.name == "slurm":
            return
        for key in list(self.progress.waiting):
            ups = [self.state(u) for u in self.stages[key].upstream]
            if any(s == State.FAILED for s in ups):
                continue  # blocked; shown as such, resubmitted after --retry-failed
            if all(s == State.COMPLETED for s in ups) and self.backend.free(self.stages[key].resources):
                self.progress.waiting.remove(key)
                self._submit([key])

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
