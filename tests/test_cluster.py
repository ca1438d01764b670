"""The dev cluster works end to end: submitit jobs on the single-node Slurm started by
study/cluster/slurm-up.sh (arrays, failures, preemption + Checkpointable resume, sacct states),
and the local MLflow server helper (study.cluster.mlflow_server).

Slurm tests need the ``slurm_cluster`` fixture (tests/slurm_fixtures.py): they are skipped
when the cluster is not up, and FAIL when VFMSTUDY_SLURM=1 says it should be.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError

# The fixture also works when tests/conftest.py does not load the plugin
# (pytest_plugins = ["tests.slurm_fixtures"] there is what makes "unreachable" a FAILED test).

# The jobs unpickle these functions in a fresh interpreter on the node: ship them by value
# so that the job does not need to import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


# ----------------------------------------------------------------------------- job functions
def square_with_env(x):
    return {"x": x, "y": x * x, "job_id": os.environ.get("SLURM_JOB_ID"),
            "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}


def boom(msg):
    raise ValueError(msg)


class ResumableCounter(submitit.helpers.Checkpointable):
    """Counts to ``n`` slowly; after a preemption it resumes from its checkpointed state.
    ``hardened``: requeue the way the study's stage jobs do (study.worker)."""

    def __init__(self, hardened: bool = True):
        self.i = 0
        self.starts: list[int] = []   # value of i at the start of each run (saved in checkpoints)
        self.hardened = hardened

    def __call__(self, n, sleep_s):
        if self.hardened:
            from study.worker import requeue_survives_its_own_kill
            requeue_survives_its_own_kill()
        self.starts.append(self.i)
        print(f"start at i={self.i}", flush=True)
        while self.i < n:
            time.sleep(sleep_s)
            self.i += 1
            print(f"i={self.i}", flush=True)
        return {"i": self.i, "starts": list(self.starts),
                "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0))}


# ----------------------------------------------------------------------------- helpers
def make_executor(folder, cluster, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
    ex.update_parameters(slurm_partition=cluster.partition, cpus_per_task=1, mem_gb=1,
                         timeout_min=params.pop("timeout_min", 5), **params)
    return ex


def sacct_states(job_id: str, want: set[str] | None = None, timeout: float = 60.0, count: int = 1) -> dict:
    """{JobID: State} for job_id (and its array tasks), polled until at least ``count`` records
    exist and every state is in ``want`` (default: terminal) -- sacct lags squeue by seconds,
    and an array's tasks reach it one by one."""
    want = want or TERMINAL
    base = job_id.split("_")[0]
    states: dict = {}
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        out = subprocess.run(["sacct", "-j", base, "-X", "-n", "-P", "-o", "JobID,State"],
                             capture_output=True, text=True, timeout=30).stdout
        states = {jid: st.split()[0] for jid, st in
                  (ln.split("|", 1) for ln in out.splitlines() if "|" in ln)}
        if job_id != base:
            states = {k: v for k, v in states.items() if k == job_id}
        if len(states) >= count and all(s in want for s in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"sacct states of {job_id} never all in {sorted(want)}: {states}")


def wait_for(pred, what: str, timeout: float = 60.0, every: float = 0.5):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ----------------------------------------------------------------------------- slurm tests
@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_submitit_job_array_of_three_completes_and_sacct_says_completed(slurm_cluster, tmp_path):
    ex = make_executor(tmp_path, slurm_cluster, slurm_array_parallelism=3)
    assert type(ex._executor).__name__ == "SlurmExecutor"
    jobs = ex.map_array(square_with_env, [1, 2, 3])
    for j in jobs:
        j._results_timeout_s = 0
    results = [j.result() for j in jobs]

    assert [r["y"] for r in results] == [1, 4, 9]
    assert [r["array_task"] for r in results] == ["0", "1", "2"]
    array_id = jobs[0].job_id.split("_")[0]
    assert all(r["job_id"] for r in results)
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    states = sacct_states(array_id, count=3)
    assert states == {f"{array_id}_{i}": "COMPLETED" for i in range(3)}, states
    assert all(j.get_info().get("State") == "COMPLETED" for j in jobs)


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_job_that_raises_is_failed_with_traceback_in_stderr(slurm_cluster, tmp_path):
    ex = make_executor(tmp_path, slurm_cluster)
    job = ex.submit(boom, "expected failure from the test")
    job._results_timeout_s = 0
    with pytest.raises(FailedJobError) as ei:
        job.result()
    assert "ValueError: expected failure from the test" in str(ei.value)

    assert sacct_states(job.job_id) == {job.job_id: "FAILED"}
    assert job.get_info().get("State") == "FAILED"
    err = wait_for(lambda: job.stderr(), "stderr file", timeout=30) or ""
    assert "Traceback (most recent call last)" in err, err[-2000:]
    assert "ValueError: expected failure from the test" in err, err[-2000:]


def slow_scontrol(folder) -> str:
    """A PATH entry whose `scontrol` does the real work, then lingers: Slurm's SIGTERM for the job
    it requeued then always finds it alive (the race that otherwise shows now and then)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "scontrol"
    wrapper.write_text(f'#!/bin/sh\n{shutil.which("scontrol")} "$@"\nrc=$?\nsleep 3\nexit $rc\n')
    wrapper.chmod(0o755)
    return str(bin_dir)


def preempt_counter(folder, cluster, hardened: bool):
    # timeout_min > 10: with less, submitit counts every preemption as a timeout
    ex = make_executor(folder, cluster, timeout_min=20,
                       slurm_setup=[f"export PATH={slow_scontrol(folder)}:$PATH"])
    job = ex.submit(ResumableCounter(hardened), 16, 0.5)
    job._results_timeout_s = 0
    # let it make some progress, then preempt it (checkpoint + scontrol requeue)
    wait_for(lambda: "i=3" in (job.stdout() or ""), "the job to count to 3", timeout=90)
    job._interrupt()
    return job


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_checkpointable_job_resumes_from_saved_state_after_preemption(slurm_cluster, tmp_path):
    job = preempt_counter(tmp_path, slurm_cluster, hardened=True)
    res = job.result()
    assert res["i"] == 16
    assert res["restarts"] >= 1, res
    assert len(res["starts"]) >= 2, res
    assert res["starts"][0] == 0
    assert 3 <= res["starts"][-1] < 16, f"second run did not resume from the checkpoint: {res}"
    assert sacct_states(job.job_id) == {job.job_id: "COMPLETED"}


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_plain_submitit_fails_a_preempted_job_when_slurm_kills_scontrol(slurm_cluster, tmp_path):
    """The control for the test above: without study.worker's requeue, the same slow scontrol is
    killed by the SIGTERM of the requeue it asked for, and the job reports that as its failure."""
    job = preempt_counter(tmp_path, slurm_cluster, hardened=False)
    with pytest.raises(FailedJobError, match=r"scontrol.*requeue.*SIGTERM"):
        job.result()


# ----------------------------------------------------------------------------- MLflow server
def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.mlflow_server
@pytest.mark.timeout(400)
def test_mlflow_server_helper_serves_logged_runs_over_rest(mlflow_server):
    """The session's server (tests/real_chain.py; its teardown checks that it stops)."""
    from mlflow.tracking import MlflowClient

    from study.cluster.mlflow_server import MlflowServer, health_ok

    url, root = mlflow_server.url, mlflow_server.root
    assert url.startswith("http://127.0.0.1:") and health_ok(url)
    assert (root / "server.json").exists() and os.path.exists(f"/proc/{mlflow_server.pid}")
    with MlflowServer(root) as again:  # a second helper on the same folder reuses the running server
        assert again.url == url and again.pid == mlflow_server.pid

    client = MlflowClient(tracking_uri=url)
    exp_id = client.create_experiment("cluster-test")
    run = client.create_run(exp_id, run_name="r0")
    rid = run.info.run_id
    client.log_param(rid, "lr", "0.001")
    for step, v in enumerate([1.0, 0.5, 0.25]):
        client.log_metric(rid, "loss", v, step=step)
    client.log_text(rid, "hello", "notes/hello.txt")
    client.set_terminated(rid)

    exps = _post(f"{url}/api/2.0/mlflow/experiments/search", {"max_results": 100})
    assert "cluster-test" in {e["name"] for e in exps["experiments"]}
    runs = _post(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [rid]
    data = runs[0]["data"]
    assert {p["key"]: p["value"] for p in data["params"]} == {"lr": "0.001"}
    assert {m["key"]: m["value"] for m in data["metrics"]} == {"loss": 0.25}
    assert runs[0]["info"]["status"] == "FINISHED"
    # artifacts went through the server into DIR/artifacts
    assert [p.read_text() for p in (root / "artifacts").rglob("hello.txt")] == ["hello"]
    assert health_ok(url)  # the helper that reused it left it running
