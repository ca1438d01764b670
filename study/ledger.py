"""The ledger: what happened to each stage, on disk, so that any process can pick a sweep up.

Per stage folder `<study_dir>/stages/<kind>/<id>/`:
    status.json   state, job id, attempt, host/pid, times, last metric, errors (tracebacks)
    result.json   the stage's final result (written before status says COMPLETED)
    config.yaml   the stage's resolved config
Per sweep `<study_dir>/sweeps/<name>.json`: the expansion (cells -> stage keys), MLflow run ids,
the spec file and overrides, so that `status | wait | collect` reattach without the controller.

Every write goes through study.fsio (a reader never sees half a file); read-modify-write of a
status goes under an flock so that the controller and a worker never lose each other's fields.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

from study.fsio import atomic_write_text


class State(str, Enum):
    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    PREEMPTED = "PREEMPTED"


ACTIVE = {State.SUBMITTED, State.RUNNING, State.PREEMPTED}


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held while the block runs (released if the process dies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_status(stage_dir: Path) -> dict:
    status = read_json(Path(stage_dir) / "status.json", {"state": State.PENDING.value, "attempt": 0})
    status["state"] = State(status["state"])
    return status


def update_status(stage_dir: Path, **fields: Any) -> dict:
    """Merge `fields` into status.json atomically; `errors` entries are appended, not replaced."""
    stage_dir = Path(stage_dir)
    with file_lock(stage_dir / ".status.lock"):
        return _merge(stage_dir, read_status(stage_dir), fields)


def _merge(stage_dir: Path, status: dict, fields: dict) -> dict:
    new_errors = fields.pop("errors", [])
    status.update(fields, updated=time.time())
    status["errors"] = status.get("errors", []) + list(new_errors)
    status["state"] = State(status["state"]).value
    write_json(stage_dir / "status.json", status)
    status["state"] = State(status["state"])
    return status


def mark_submitted(stage_dir: Path, job_id: str, **fields: Any) -> dict:
    """SUBMITTED unless the job already started (a fast worker may write RUNNING first)."""
    stage_dir = Path(stage_dir)
    with file_lock(stage_dir / ".status.lock"):
        status = read_status(stage_dir)
        fields["job_id"] = job_id
        if status["state"] not in (State.RUNNING, State.COMPLETED, State.FAILED):
            fields.update(state=State.SUBMITTED.value, submitted=time.time())
        return _merge(stage_dir, status, fields)


def read_result(stage_dir: Path) -> dict | None:
    return read_json(Path(stage_dir) / "result.json")


def write_result(stage_dir: Path, result: dict) -> None:
    write_json(Path(stage_dir) / "result.json", result)


def here() -> dict:
    """Where a stage runs: host/pid tell a live job from a dead one; the GPUs it was given."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def manifest_path(root: Path, name: str) -> Path:
    return Path(root) / "sweeps" / f"{name}.json"
