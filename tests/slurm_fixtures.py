"""pytest plugin: the ``slurm_cluster`` fixture for tests that need the dev Slurm cluster.

Load it from tests/conftest.py with ``pytest_plugins = ["tests.slurm_fixtures"]``.

``VFMSTUDY_SLURM`` decides what happens when the cluster cannot be reached:

* ``1``     the cluster is required (CI: .ci/run starts it): tests using the fixture FAIL
            with a clear message if ``sinfo``/``sacct`` do not answer or the node is not usable;
* ``0``     the tests are skipped without looking;
* unset     auto: the tests run if the cluster answers, else they are skipped.

The check (``sinfo`` shows the node idle/mixed/allocated, and ``sacct`` answers) runs once
per session and is cached.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

SKIP_REASON = "Slurm dev cluster not started (bash study/cluster/slurm-up.sh)"
_UNREACHABLE = "_vfmstudy_slurm_unreachable"


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    node: str
    cpus: int
    state: str


def _run(cmd: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def probe_slurm() -> tuple[SlurmCluster | None, str]:
    """Return (cluster, "") when Slurm is usable, else (None, why)."""
    missing = [c for c in ("sinfo", "sbatch", "sacct", "scontrol") if shutil.which(c) is None]
    if missing:
        return None, f"Slurm client commands not found: {', '.join(missing)}"
    try:
        r = _run(["sinfo", "-h", "-o", "%P|%n|%c|%T"])
    except subprocess.TimeoutExpired:
        return None, "`sinfo` timed out (is slurmctld running?)"
    if r.returncode != 0:
        return None, f"`sinfo` failed (rc={r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
    usable = None
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    for ln in lines:
        part, node, cpus, state = ln.split("|")
        if state.rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated", "completing"):
            usable = SlurmCluster(part.rstrip("*"), node, int(cpus), state)
            if part.endswith("*"):  # prefer the default partition
                break
    if usable is None:
        return None, f"no usable Slurm node (sinfo: {lines or 'empty'})"
    try:
        r = _run(["sacct", "-n", "-X", "-S", "now"])
    except subprocess.TimeoutExpired:
        return None, "`sacct` timed out (is slurmdbd running?)"
    if r.returncode != 0:
        return None, (f"`sacct` failed (rc={r.returncode}): {r.stderr.strip()} "
                      "(accounting is needed: submitit polls job states with sacct)")
    return usable, ""


_cache: dict = {}


def _probe_cached() -> tuple[SlurmCluster | None, str]:
    if "probe" not in _cache:
        _cache["probe"] = probe_slurm()
    return _cache["probe"]


@pytest.fixture
def slurm_cluster(request) -> SlurmCluster | None:
    """The reachable dev Slurm cluster (partition, node, cpus), or skip / fail (see module doc)."""
    mode = os.environ.get("VFMSTUDY_SLURM", "").strip()
    if mode == "0":
        pytest.skip(SKIP_REASON + " [VFMSTUDY_SLURM=0]")
    cluster, why = _probe_cached()
    if cluster is not None:
        return cluster
    if mode == "1":
        msg = (f"VFMSTUDY_SLURM=1 but the Slurm dev cluster is not reachable: {why}. "
               "Start it with `bash study/cluster/slurm-up.sh` (as root), or unset VFMSTUDY_SLURM.")
        if not getattr(request.config, "_vfmstudy_slurm_plugin", False):
            pytest.fail(msg, pytrace=False)  # plugin hooks not loaded: fail in setup (ERROR)
        # fail in the test's call phase (reported FAILED, not ERROR): see pytest_runtest_call
        setattr(request.node, _UNREACHABLE, msg)
        return None
    pytest.skip(SKIP_REASON)


def pytest_configure(config):
    config._vfmstudy_slurm_plugin = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    msg = getattr(item, _UNREACHABLE, None)
    if msg:
        pytest.fail(msg, pytrace=False)
