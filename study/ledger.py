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
import math
import os
import socket
import sys
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


def write_json(path: Path, data: Any, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str), durable)


class LedgerError(ValueError):
    """A ledger file that cannot be trusted (not JSON, wrong shape, a path leaving the study
    folder). The message is one line naming the file."""


def read_json(path: Path, default: Any = None) -> Any:
    """The file's JSON, `default` if it does not exist; LedgerError if it is not JSON (a
    truncated write from a disk that filled, or a hand edit)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LedgerError(f"{path}: not valid JSON ({err}); restore or delete the file") from None


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


class StageStates:
    """Stage states of a study folder by (kind, id): a stage without a folder is PENDING, so a sweep
    that has not run costs one directory listing per kind, and each folder's status is read once."""

    def __init__(self, root: Path, kinds: list[str]):
        self.root = Path(root)
        self.on_disk = {kind: set(os.listdir(d)) if (d := self.root / "stages" / kind).is_dir() else set()
                        for kind in kinds}
        self._read: dict[tuple[str, str], State] = {}

    def __call__(self, kind: str, stage_id: str) -> State:
        if stage_id not in self.on_disk[kind]:
            return State.PENDING
        if (kind, stage_id) not in self._read:
            self._read[kind, stage_id] = read_status(self.root / "stages" / kind / stage_id)["state"]
        return self._read[kind, stage_id]


def runs(state: State, force: bool, retry_failed: bool) -> bool:
    """Whether `run` submits a stage in this state."""
    return force or state == State.PENDING or (retry_failed and state == State.FAILED)


def read_status(stage_dir: Path) -> dict:
    """The stage's status; a corrupt status.json, or a COMPLETED stage whose result.json is
    corrupt, reads as FAILED with the reason in `errors` (other stages stay readable)."""
    stage_dir = Path(stage_dir)
    try:
        status = _parse_status(stage_dir / "status.json")
    except LedgerError as err:
        return _failed({"attempt": 0}, err)
    if status["state"] == State.COMPLETED:
        try:
            _parse_result(stage_dir / "result.json")
        except LedgerError as err:
            return _failed(status, err)
    return status


def _failed(status: dict, err: LedgerError) -> dict:
    error = {"time": time.time(), "error": str(err), "traceback": ""}
    return {**status, "state": State.FAILED, "errors": [*status.get("errors", []), error]}


def _parse_status(path: Path) -> dict:
    status = read_json(path, {"state": State.PENDING.value, "attempt": 0})
    if not isinstance(status, dict) or status.get("state") not in State.__members__:
        raise LedgerError(f"{path}: not a stage status (no valid 'state'); delete it to start that stage again")
    status["state"] = State(status["state"])
    return status


def _parse_result(path: Path) -> dict | None:
    result = read_json(path)
    if result is not None and not isinstance(result, dict):
        raise LedgerError(f"{path}: a stage result must be a JSON object, got {type(result).__name__}")
    return result


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
    # not fsynced: an OS crash can only take the stage back to an earlier state (or leave a
    # status that read_status reports as corrupt), and the stage then runs again from its checkpoint
    write_json(stage_dir / "status.json", status, durable=False)
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
    """The stage's result; None if absent or corrupt (read_status then says FAILED and why)."""
    try:
        return _parse_result(Path(stage_dir) / "result.json")
    except LedgerError:
        return None


def write_result(stage_dir: Path, result: dict) -> None:
    write_json(Path(stage_dir) / "result.json", result)


def check_result(result: Any) -> dict:
    """A stage's return value, refused (ValueError naming the key) when it is not a mapping or
    holds a NaN or an infinity: a diverged run must fail, not be COMPLETED with a bare NaN."""
    if not isinstance(result, dict):
        raise ValueError(f"a stage must return a dict, got {type(result).__name__}")
    for key, value in _leaves(result):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"result '{key}' is {value} (the run diverged or divided by zero)")
    return result


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, data


def result_path(stage_dir: Path, name: str) -> Path:
    """A file named in a stage's result.json (`codes`, `artifacts`), resolved; LedgerError when
    it points outside the study folder (`<study_dir>/stages/<kind>/<id>` is the stage folder)."""
    stage_dir = Path(stage_dir).resolve()
    root = stage_dir.parents[2]
    path = (stage_dir / name).resolve()
    if not path.is_relative_to(root):
        raise LedgerError(f"{stage_dir / 'result.json'}: path {name!r} points outside the study folder {root}")
    return path


def here() -> dict:
    """Where a stage runs: host/pid tell a live job from a dead one; the GPUs it was given."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def manifest_path(root: Path, name: str) -> Path:
    return Path(root) / "sweeps" / f"{name}.json"


def read_manifest(root: Path, name: str) -> dict:
    """The sweep's manifest, {} when absent; a corrupt one is reported on stderr and replaced
    by the next run (its MLflow run ids are lost: the cell runs are created again)."""
    try:
        manifest = read_json(manifest_path(root, name), {})
    except LedgerError as err:
        print(f"warning: {err}; it will be written again", file=sys.stderr)
        return {}
    return manifest if isinstance(manifest, dict) else {}
