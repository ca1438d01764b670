"""Where jobs run: submit callables with resources, and tell whether a job id is alive.

    debug  - in the controller process, one stage after another (breakpoints work)
    local  - submitit LocalExecutor behind our own slot pool: submitit's local executor starts
             every job at once and gives all of them the same GPUs (submitit #1685), so jobs
             start only when their resources are free, one job per GPU via CUDA_VISIBLE_DEVICES
    slurm  - submitit job arrays under executor.batch(), chunked to the site's MaxArraySize

A stage whose resources ask for several ranks (nodes x tasks_per_node) runs as that many
processes of one job: Slurm starts them with srun, the local backend with submitit's
tasks_per_node (one machine only); the worker joins them into a torch.distributed group.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from study import ledger
from study.config import ConfigError
from study.spec import LauncherSpec, Resources, SweepSpec


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

    def wait(self, seconds: float) -> None:
        """The controller's pause between two looks at the ledger: `seconds`, or less where the
        backend sees one of its jobs end sooner."""
        time.sleep(seconds)

    def _params(self, res: Resources, name: str) -> dict:
        params = dict(timeout_min=res.timeout_min, cpus_per_task=res.cpus, gpus_per_node=res.gpus,
                      nodes=res.nodes, tasks_per_node=res.tasks, mem_gb=res.mem_gb, name=name)
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


WAKE_S = 0.25  # how often a waiting controller looks whether a local job has ended


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

    def wait(self, seconds: float) -> None:
        """Returns as soon as a job of this pool ends, so that its slot is filled at once rather
        than at the next poll (with a slot per core, a poll's wait is a core left idle)."""
        self.release()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if any(job.done() for job, _, _ in self.running.values()):
                return
            time.sleep(min(WAKE_S, left))

    def free(self, res: Resources) -> bool:
        self.release()
        if len(self.running) >= self.max_parallel:
            return False
        busy = {g for _, gpus, _ in self.running.values() for g in gpus}
        used_cpus = sum(c for _, _, c in self.running.values())
        # a job larger than the machine still runs, alone, rather than never
        cpu_ok = used_cpus + res.cpus * res.tasks <= self.cpus or not self.running
        return len(self.gpus) - len(busy) >= res.gpus and cpu_ok

    def job_folder(self, name: str) -> Path:
        """A new folder for one submission, created before any job starts. Not submitit's `%j`
        folder: the local controller process opens `<pid>/<pid>_0_log.out` as soon as it starts,
        and the submitting process creates `<pid>/` only after it has the pid, so a controller
        scheduled first (a loaded machine) dies on a missing folder before the stage starts."""
        parent = self.root / "submitit" / "local"
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name.replace('/', '-')}-", dir=parent))

    def submit(self, fn, args, res, name, after=()):
        out = []
        for a in args:
            busy = {g for _, gpus, _ in self.running.values() for g in gpus}
            gpus = [g for g in self.gpus if g not in busy][: res.gpus]
            # LocalExecutor itself: AutoExecutor does not pass visible_gpus through
            ex = submitit.LocalExecutor(folder=self.job_folder(name))
            extra = {k.removeprefix("local_"): v for k, v in self.spec.submitit.items() if k.startswith("local_")}
            ex.update_parameters(timeout_min=res.timeout_min, gpus_per_node=res.gpus, visible_gpus=tuple(gpus),
                                 tasks_per_node=res.tasks, **extra)
            job = ex.submit(fn, *a)
            self.running[job.job_id] = (job, gpus, res.cpus * res.tasks)
            out.append(Submitted(job.job_id, str(job.paths.stdout), job))
        return out

    def alive(self, job_id, status):
        if job_id in self.running:
            return not self.running[job_id][0].done()
        if status.get("host") not in (None, ledger.here()["host"]):
            return True  # another machine's process: cannot tell, assume it lives
        pid = status.get("pid") if status.get("job_id") == job_id and status.get("pid") else job_id
        return pid_alive(int(pid)) if str(pid).isdigit() else False


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


def check_resources(spec: SweepSpec, source: str) -> None:
    """Refuse, before anything is created, resources this backend cannot give a stage."""
    try:
        _check_resources(spec)
    except ConfigError as err:
        raise ConfigError(err.detail, source=source, key=err.key) from None


def _check_resources(spec: SweepSpec) -> None:
    launcher = spec.launcher
    for kind in spec.stages:
        res, key = spec.resources_for(kind), f"resources.{kind}"
        if res.gpus and res.tasks != res.gpus:
            raise ConfigError(f"{res.gpus} GPUs per node but {res.tasks} tasks per node: a rank drives one GPU "
                              "(drop tasks_per_node, or set it to gpus)", key=f"{key}.tasks_per_node")
        if launcher.backend == "debug" and res.ranks > 1:
            raise ConfigError(f"{res.ranks} ranks, but the debug backend runs stages in its own process "
                              "(use launcher.backend: local or slurm)", key=key)
        if launcher.backend != "local":
            continue
        if res.nodes > 1:
            raise ConfigError(f"{res.nodes} nodes asked, but the local backend runs on this machine only "
                              "(set nodes: 1, or use launcher.backend: slurm)", key=f"{key}.nodes")
        pool = list(launcher.gpus) if launcher.gpus is not None else list(range(_visible_gpu_count()))
        if res.gpus > len(pool):
            raise ConfigError(f"{res.gpus} GPU(s) asked, but the local pool has {len(pool)} "
                              "(lower it, or list more in launcher.gpus)", key=f"{key}.gpus")


# --------------------------------------------------------------------------- dry-run: ranks, stores, GPU-hours
def spans_nodes(spec: SweepSpec) -> bool:
    """Jobs of this sweep may run on several machines at once (their stores are shared)."""
    return spec.launcher.backend == "slurm" or any(spec.resources_for(k).nodes > 1 for k in spec.stages)


def store_warnings(spec: SweepSpec) -> list[str]:
    """Stores that many machines must not write through a shared filesystem, with the fix."""
    if not spans_nodes(spec):
        return []
    found = []
    uri = spec.tracking.uri or ""
    if spec.tracking.enabled and (uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri):
        found.append(f"tracking.uri {uri or 'sqlite:///<study_dir>/mlflow.db'}: an MLflow file store written by jobs "
                     "on many nodes through a shared filesystem (NFS) locks unreliably (start one server: "
                     "python -m study.cluster.mlflow_server start DIR, then tracking.uri: the URL it prints)")
    storage = spec.search.storage if spec.search else None
    if spec.search and (storage is None or storage.startswith("sqlite:") or "://" not in storage):
        found.append(f"search.storage {storage or '<study_dir>/optuna.journal'}: Optuna's JournalFileBackend (or "
                     "sqlite) is known to corrupt on NFS under Slurm (search.storage: an RDB URL such as "
                     "postgresql://USER@HOST/DB, or a journal behind optuna.storages.run_grpc_proxy_server)")
    return found


def bench_figures() -> tuple[dict, str]:
    """Measured images/s per GPU from `python -m study.bench gpu --out FILE` named by
    $VFMSTUDY_BENCH, and where they came from ("" when there are none)."""
    path = os.environ.get("VFMSTUDY_BENCH")
    if not path:
        return {}, ""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the benchmark JSON ({err}); run python -m study.bench gpu "
                          "--out FILE and point VFMSTUDY_BENCH at it", key="VFMSTUDY_BENCH") from None
    rates = {name: item["images_per_s"] for name, item in report.get("items", {}).items()
             if isinstance(item, dict) and item.get("images_per_s")}
    return rates, f"{path} ({report.get('device', 'device not named')}, sizes {report.get('sizes', {}).get('name')})"


# which benchmark item measures a stage's training step
BENCH_ITEM = {"tokenizer": "tokenizer_paper"}


def estimated_gpu_hours(config: Any, kind: str, rates: dict) -> Optional[float]:
    """GPU-hours of one job of `kind` with this typed config: steps x global batch / (measured
    images/s per GPU), the GPUs of all ranks together; None without a measured figure."""
    rate = rates.get(BENCH_ITEM.get(kind, ""))
    train = getattr(getattr(config, kind, None), "train", None)
    if not rate or train is None:
        return None
    return train.steps * train.batch_size / rate / 3600


def scale_summary(spec: SweepSpec, first: dict[str, Any]) -> list[str]:
    """Dry-run lines: ranks per stage, an estimate of GPU-hours per job (`first`: the first cell's
    typed config per kind), the stores in use and the ones unsafe for a sweep over many nodes."""
    rates, source = bench_figures()
    lines = ["ranks per stage (nodes x tasks per node; gpus per node) and estimated GPU-hours per job "
             f"({'from ' + source if source else 'no measured figures: set VFMSTUDY_BENCH=FILE.json from python -m study.bench gpu'}):"]
    for kind in spec.stages:
        res = spec.resources_for(kind)
        hours = estimated_gpu_hours(first.get(kind), kind, rates)
        est = f"~{hours:.3g} GPU-h (estimate)" if hours is not None else "no estimate"
        lines.append(f"  {kind:12s} {res.ranks:3d} rank(s) = {res.nodes} x {res.tasks}; {res.gpus} GPU(s)/node   {est}")
    store = spec.tracking.uri or "sqlite:///<study_dir>/mlflow.db" if spec.tracking.enabled else "off"
    lines.append(f"stores: MLflow {store}" + (f"; Optuna {spec.search.storage or '<study_dir>/optuna.journal'}"
                                             if spec.search else ""))
    lines.extend(f"  UNSAFE at cluster scale: {w}" for w in store_warnings(spec))
    return lines


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


def pid_alive(pid: int) -> bool:
    """A process of this machine that has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" not in state
