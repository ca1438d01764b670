"""Start/stop a local ``mlflow server`` (127.0.0.1, sqlite backend, served artifacts).

Everything lives in one directory ``DIR``::

    DIR/mlflow.db       sqlite backend store (runs, metrics, params, registry)
    DIR/artifacts/      artifact store, served by the server (mlflow-artifacts:/)
    DIR/server.json     {"url", "port", "pid", "host"} of the running server
    DIR/server.log      the server's stdout + stderr

Python::

    from study.cluster.mlflow_server import MlflowServer
    with MlflowServer("outputs/mlflow") as srv:      # free port unless port=...
        mlflow.set_tracking_uri(srv.url)
        ...

CLI (a detached server that outlives the command)::

    python -m study.cluster.mlflow_server start DIR [--port N]   # prints the URL
    python -m study.cluster.mlflow_server stop DIR
    python -m study.cluster.mlflow_server status DIR

``start`` is idempotent: if DIR's server is already up and healthy it prints its URL.
The server runs in its own session (process group); ``stop`` sends SIGTERM to that group
(the mlflow CLI and its uvicorn/gunicorn workers), then SIGKILL after a grace period.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from study.backends import pid_alive
from study.fsio import atomic_write_text

__all__ = ["MlflowServer", "free_port", "health_ok"]

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET {url}/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class MlflowServer:
    """A local MLflow tracking server rooted at ``root``.

    ``start()`` returns the URL once ``/health`` answers; ``stop()`` shuts it down.
    As a context manager it starts on enter (returning itself) and stops on exit, unless
    it found a server already running for ``root`` (then it leaves that one alone).
    """

    def __init__(self, root: str | os.PathLike, port: int | None = None, host: str = HOST,
                 workers: int = 1, startup_timeout: float = 180.0):
        self.root = Path(root).resolve()
        self.db_path = self.root / "mlflow.db"
        self.artifacts_dir = self.root / "artifacts"
        self.state_file = self.root / "server.json"
        self.log_file = self.root / "server.log"
        self.port = port
        self.host = host
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._owned = False

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("MLflow server not started")
        return f"http://{self.host}:{self.port}"

    # -- state -------------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def running(self) -> str | None:
        """URL of the healthy server recorded in ``root``, else None."""
        st = self._read_state()
        if not st or not pid_alive(int(st.get("pid", -1))):
            return None
        return st["url"] if health_ok(st["url"]) else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db_path}",
            "--artifacts-destination", str(self.artifacts_dir),
            "--serve-artifacts",
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
        ]

    # -- start / stop ------------------------------------------------------------------
    def start(self) -> str:
        """Start (or reuse) the server; return its URL once ``/health`` answers."""
        url = self.running()
        if url is not None:
            st = self._read_state()
            self.port, self.pid, self._owned = int(st["port"]), int(st["pid"]), False
            return url
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        env = dict(os.environ)
        env.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        # the server's background job runner (huey consumers: ~8 extra Python processes,
        # for GenAI scorers) is not used by the study and slows start-up on 2 cores
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_file, "ab") as log:
            log.write(f"\n=== {time.strftime('%F %T')} {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.root, env=env, start_new_session=True, close_fds=True)
        self.pid, self._owned = self._proc.pid, True
        atomic_write_text(self.state_file, json.dumps({"url": self.url, "port": self.port, "pid": self.pid,
                                                       "host": self.host}))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._cleanup_state()
                raise RuntimeError(
                    f"mlflow server exited with code {self._proc.returncode} during start-up "
                    f"(port {self.port}); log tail:\n{self._log_tail()}")
            if health_ok(self.url, timeout=1.0):
                return self.url
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server on {self.url} not healthy after "
                           f"{self.startup_timeout:.0f}s; log tail:\n{self._log_tail()}")

    def stop(self, grace: float = 15.0) -> bool:
        """Stop the server recorded in ``root`` (its whole process group). True if one ran."""
        pid = self.pid
        if pid is None:
            st = self._read_state()
            pid = int(st["pid"]) if st and "pid" in st else None
        if pid is None:
            return False
        was_running = pid_alive(pid) or _group_alive(pid)
        if was_running:
            # start_new_session=True made pid the leader of its own process group
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(pid):
                if self._proc is not None:
                    self._proc.poll()  # reap our child so that it does not linger as a zombie
                if not pid_alive(pid) and not self._group_has_live_members(pid):
                    break
                time.sleep(0.1)
            if self._group_has_live_members(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
        self._cleanup_state()
        self.pid = None
        return was_running

    @staticmethod
    def _group_has_live_members(pgid: int) -> bool:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] = state, fields[2] = pgrp
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False

    def _cleanup_state(self) -> None:
        st = self._read_state()
        if st is None or st.get("pid") == self.pid or self.pid is None:
            self.state_file.unlink(missing_ok=True)

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "MlflowServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._owned:
            self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.cluster.mlflow_server",
                                description="Local MLflow server: sqlite backend + artifacts dir.")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("dir", help="directory for mlflow.db, artifacts/, server.json, server.log")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--host", default=HOST)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=180.0, help="start-up timeout in seconds")
    a = p.parse_args(argv)
    srv = MlflowServer(a.dir, port=a.port, host=a.host, workers=a.workers, startup_timeout=a.timeout)
    if a.action == "start":
        try:
            print(srv.start())
        except (RuntimeError, TimeoutError) as e:
            print(f"mlflow_server: {e}", file=sys.stderr)
            return 1
        return 0
    if a.action == "stop":
        print("stopped" if srv.stop() else "not running")
        return 0
    url = srv.running()
    print(url or "not running")
    return 0 if url else 1


if __name__ == "__main__":
    sys.exit(main())
