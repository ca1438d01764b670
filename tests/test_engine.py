"""The engine on the toy chain: cache/dedup, failures, local GPU slots, controller kill + resume, preemption."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study import ledger, provenance
from study.backends import make_backend
from study.controller import Scheduler
from study.ledger import State
from study.stages import read_stage_result
from study.sweep import load_plan, main
from tests.toy_stages import PLUGINS as TOY

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, **spec) -> str:
    spec = {"name": "t", "stages": ["toy_data", "toy_train", "toy_eval"], "plugins": TOY, "study_dir": str(tmp_path / "study"),
            "tracking": {"enabled": False}, "launcher": {"backend": "debug", "poll_s": 0.3}, **spec}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def statuses(plan):
    return {k: ledger.read_status(s.dir(plan.root)) for k, s in plan.stages.items()}


def test_shared_stages_run_once_and_rerun_submits_nothing(tmp_path, capsys):
    # 2 lr x 3 eval sizes = 6 cells; 1 data stage, 2 train stages, 6 eval stages
    path = write(tmp_path, axes={"grid": {"toy.lr": [0.01, 0.05], "eval.n": [64, 128, 256]}},
                 base={"toy": {"train": {"steps": 20, "ema_decay": 0.0, "precision": "fp32", "log_every": 5,
                                         "ckpt_every": 10, "progress": False, "device": "cpu"}}})
    assert main([path]) == 0
    plan = load_plan(path)
    st = statuses(plan)
    assert len(plan.cells) == 6 and len(st) == 9
    assert all(s["state"] == State.COMPLETED and s["attempt"] == 1 for s in st.values())  # executed exactly once
    assert len(list((plan.root / "stages" / "toy_train").iterdir())) == 2
    results = {k: read_stage_result(s.dir(plan.root)) for k, s in plan.stages.items()}
    assert all(r.metrics["steps"] == 20 for k, r in results.items() if k.startswith("toy_train"))
    capsys.readouterr()
    assert main([path]) == 0
    assert "0 to submit" in capsys.readouterr().out
    assert all(s["attempt"] == 1 for s in statuses(plan).values())
    # a dry run marks everything cached and estimates from the measured median runtime
    main([path, "--dry-run", "--list"])
    out = capsys.readouterr().out
    assert out.count("[cached]") == 18 and "med" in out


def test_manifest_records_command_commit_start_and_cpus_of_each_run_that_starts_work(tmp_path):
    from datetime import datetime
    path = write(tmp_path, base={"toy": {"train": {"steps": 4, "ema_decay": 0.0, "precision": "fp32", "log_every": 2,
                                                   "ckpt_every": 4, "progress": False, "device": "cpu"}}})
    before = int(time.time())
    assert main([path, "--quiet"]) == 0
    after = time.time()
    plan = load_plan(path)
    runs = provenance.recorded(ledger.read_manifest(plan.root, plan.spec.name))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO / "study", capture_output=True, text=True)
    assert len(runs) == 1
    assert runs[0].command == f"python -m study.sweep {path} --quiet"
    assert runs[0].commit == (head.stdout.strip() if head.returncode == 0 else None)
    assert runs[0].cpu_count == os.cpu_count()
    started = datetime.fromisoformat(runs[0].started)
    assert started.utcoffset().total_seconds() == 0 and before <= started.timestamp() <= after
    # a re-run that finds everything cached adds no record; one that recomputes adds its own
    assert main([path, "--quiet"]) == 0
    assert len(provenance.recorded(ledger.read_manifest(plan.root, plan.spec.name))) == 1
    assert main([path, "--quiet", "--force"]) == 0
    again = provenance.recorded(ledger.read_manifest(plan.root, plan.spec.name))
    assert [r.command for r in again] == [runs[0].command, f"python -m study.sweep {path} --quiet --force"]


def test_manifest_commit_is_the_checkouts_head_and_dirty_only_for_changed_tracked_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never the repository around tmp_path
    repo = tmp_path / "code"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    assert provenance.code_version(repo) == (head, False)
    (repo / "untracked.py").write_text("y = 2\n")
    assert provenance.code_version(repo) == (head, False)
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.code_version(repo) == (head, True)
    assert provenance.current("python -m study.sweep s.yaml", repo).commit == head
    (tmp_path / "plain").mkdir()
    assert provenance.code_version(tmp_path / "plain") == (None, None)


def test_failing_cell_is_failed_with_traceback_others_finish_and_retry_failed(tmp_path, capsys):
    path = write(tmp_path, axes={"lists": [{"toy.fail_at": 7}, {"toy.lr": 0.02}]},
                 launcher={"backend": "local", "max_parallel": 2, "poll_s": 0.3, "retries": 1})
    assert main([path]) == 1
    plan = load_plan(path)
    st = statuses(plan)
    failed = [k for k, s in st.items() if s["state"] == State.FAILED]
    assert len(failed) == 1 and failed[0].startswith("toy_train")
    errs = st[failed[0]]["errors"]
    assert len(errs) == 2  # first try + one app-level retry, both recorded
    assert "toy failure requested at step 7" in errs[-1]["traceback"] and "Traceback" in errs[-1]["traceback"]
    done = [c for c in plan.cells if all(st[s.key]["state"] == State.COMPLETED for s in c.stages.values())]
    assert len(done) == 1
    eval_of_failed = next(c for c in plan.cells if c.values.get("toy.fail_at") == 7).stages["toy_eval"].key
    assert st[eval_of_failed]["state"] == State.PENDING  # blocked, never run
    out = capsys.readouterr().out
    assert "--retry-failed" in out and "toy failure requested" in out
    # re-run: nothing resubmitted; --retry-failed retries only the failed stage (it fails again)
    assert main([path]) == 1
    assert "0 to submit, 1 blocked" in capsys.readouterr().out
    assert main([path, "--retry-failed"]) == 1
    after = statuses(plan)
    assert after[failed[0]]["attempt"] == 4
    assert all(after[k]["attempt"] == 1 for k, s in st.items() if s["state"] == State.COMPLETED)


def test_local_pool_never_puts_two_jobs_on_one_gpu(tmp_path):
    # fake GPU ids (the toy trains on CPU): the pool must hand each id to one job at a time
    path = write(tmp_path, axes={"grid": {"toy.lr": [0.01, 0.02, 0.03]}},
                 stages=["toy_data", "toy_train"], resources={"toy_train": {"gpus": 1}},
                 base={"toy": {"step_sleep_s": 0.02}},
                 launcher={"backend": "local", "gpus": [0, 1], "max_parallel": 4, "poll_s": 0.3})
    assert main([path]) == 0
    plan = load_plan(path)
    runs = [s for k, s in statuses(plan).items() if k.startswith("toy_train")]
    assert sorted(r["cuda_visible_devices"] for r in runs).count("0") >= 1
    assert {r["cuda_visible_devices"] for r in runs} <= {"0", "1"}
    for gpu in ("0", "1"):
        spans = sorted((r["started"], r["ended"]) for r in runs if r["cuda_visible_devices"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    cpu_jobs = [s for k, s in statuses(plan).items() if not k.startswith("toy_train")]
    assert all(r["cuda_visible_devices"] == "" for r in cpu_jobs)


def test_killed_controller_resumes_without_redoing_completed_stages(tmp_path):
    path = write(tmp_path, axes={"grid": {"toy.lr": [0.01, 0.02, 0.03]}}, stages=["toy_data", "toy_train"],
                 base={"toy": {"step_sleep_s": 0.05}},
                 launcher={"backend": "local", "max_parallel": 2, "poll_s": 0.3})
    plan = load_plan(path)
    proc = subprocess.Popen([sys.executable, "-m", "study.sweep", path], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        st = statuses(plan)
        if sum(s["state"] == State.COMPLETED for k, s in st.items() if k.startswith("toy_train")) >= 1:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = statuses(plan)
    completed = {k for k, s in before.items() if s["state"] == State.COMPLETED}
    assert completed and len(completed) < len(before)
    assert main([path]) == 0
    after = statuses(plan)
    assert all(s["state"] == State.COMPLETED for s in after.values())
    assert all(after[k]["attempt"] == 1 for k in completed)  # nothing finished was redone
    assert all(s["attempt"] <= 2 for s in after.values())


def test_preempted_job_resumes_from_checkpoint_with_the_same_result(tmp_path):
    slow = {"toy": {"step_sleep_s": 0.1, "train": {"steps": 60, "ckpt_every": 5, "log_every": 5,
                                                    "ema_decay": 0.0, "precision": "fp32", "progress": False,
                                                    "device": "cpu"}}}
    (tmp_path / "ref").mkdir()
    ref_path = write(tmp_path / "ref", base=slow, stages=["toy_data", "toy_train"])
    assert main([ref_path]) == 0  # uninterrupted, in-process
    ref_plan = load_plan(ref_path)
    train_key = next(k for k in ref_plan.stages if k.startswith("toy_train"))
    reference = ledger.read_result(ref_plan.stages[train_key].dir(ref_plan.root))

    path = write(tmp_path, base=slow, stages=["toy_data", "toy_train"], launcher={"backend": "local", "poll_s": 0.3})
    plan = load_plan(path)
    backend = make_backend(plan.spec.launcher, plan.root)
    sched = Scheduler(plan.stages, None, backend, TOY, None, 0)
    sched.start(sched.prepare(False, False))
    ckpt = plan.stages[train_key].dir(plan.root) / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not (ckpt.exists() and train_key in sched.progress.submitted) and time.time() < deadline:
        sched.step()
        time.sleep(0.2)
    assert ckpt.exists()
    # the preemption signal, to the task as Slurm sends it (submitit 1.5.4's LocalJob._interrupt
    # signals the local controller process instead, which dies of it)
    os.kill(ledger.read_status(plan.stages[train_key].dir(plan.root))["pid"], signal.SIGUSR2)
    while sched.pending() and time.time() < deadline:
        sched.step()
        sched.check_jobs()
        time.sleep(0.3)
    status = ledger.read_status(plan.stages[train_key].dir(plan.root))
    assert status["state"] == State.COMPLETED and status["attempt"] == 2  # ran twice: before and after requeue
    assert "preempted" in status
    assert ledger.read_result(plan.stages[train_key].dir(plan.root)) == reference


def test_a_stage_result_is_typed_and_an_old_layout_reruns_the_stage(tmp_path):
    from study.stages import StageResult

    result = StageResult(metrics={"mse": 1, "acc": 0.5}, outputs={"codes": "codes.pt"}, tags={"n": 3},
                         artifacts={"grids": ["a.png"]})
    assert result.metrics == {"mse": 1.0, "acc": 0.5} and result.tags == {"n": "3"}
    ledger.write_result(tmp_path, result.to_json())
    assert read_stage_result(tmp_path) == result
    for bad in ({"flag": True}, {"name": "dino"}):
        with pytest.raises(TypeError, match="must be a number"):
            StageResult(metrics=bad)
    ledger.write_result(tmp_path, {"mse": 1.0, "tags": {}})  # the reserved-keys dict of old results
    assert read_stage_result(tmp_path) is None


def test_a_stage_job_computes_on_the_cores_it_asked_for():
    """numpy (imported by submitit before any stage code) starts its BLAS pool with one thread per
    core; a 1-cpu stage must shrink that pool too, not only torch's."""
    code = ("import numpy, threadpoolctl, torch; from study.worker import _limit_threads; _limit_threads(1); "
            "print(torch.get_num_threads(), max(d['num_threads'] for d in threadpoolctl.threadpool_info()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}).stdout.split()
    assert out == ["1", "1"]


def test_free_slots_take_the_stage_more_stages_wait_on_first(tmp_path):
    """2 data sets x 2 learning rates, one slot: both data stages (each waited on by 2 train and
    2 eval stages) run before any train stage; in plan order the second data set would wait
    until the first data set's whole chain had run."""
    path = write(tmp_path, axes={"grid": {"data.seed": [1, 2], "toy.lr": [0.01, 0.05]}},
                 base={"toy": {"train": {"steps": 2, "ema_decay": 0.0, "precision": "fp32", "log_every": 1,
                                         "ckpt_every": 2, "progress": False, "device": "cpu"}}})
    assert main([path, "--quiet"]) == 0
    plan = load_plan(path)
    started = sorted((s["started"], key.split("/")[0]) for key, s in statuses(plan).items())
    assert [kind for _, kind in started][:2] == ["toy_data", "toy_data"], started


def _write_marker(path):
    Path(path).write_text("ran")


def test_local_job_log_folder_exists_before_its_controller_process_starts(tmp_path, monkeypatch):
    """submitit's local controller opens its log file as soon as it starts; with a `%j` folder the
    submitting process creates that folder only after it learns the pid, so on a loaded machine the
    controller could die first and the stage was FAILED without having run. Checked at the moment
    the controller process exists: its log folder must already be there."""
    import submitit
    import submitit.local.local as submitit_local
    from study.spec import LauncherSpec, Resources

    seen = []
    real = submitit_local.start_controller

    def watched(folder, *args, **kwargs):
        process = real(folder, *args, **kwargs)
        seen.append(submitit.core.utils.JobPaths(folder, str(process.pid), 0).stdout.parent.is_dir())
        return process

    monkeypatch.setattr(submitit_local, "start_controller", watched)
    backend = make_backend(LauncherSpec(backend="local", max_parallel=1), tmp_path)
    [job] = backend.submit(_write_marker, [(tmp_path / "marker",)], Resources(timeout_min=2), name="toy/abc")
    job.handle.result()
    assert seen == [True]
    assert (tmp_path / "marker").read_text() == "ran"
    assert Path(job.stdout).is_file()


def _sleep_briefly():
    time.sleep(0.5)


def test_local_pool_wait_returns_when_a_job_ends_not_at_the_next_poll(tmp_path):
    """The controller's pause ends as soon as a local job ends, so its slot does not sit idle for
    the rest of poll_s; with no job running it is the whole pause."""
    from study.spec import LauncherSpec, Resources

    backend = make_backend(LauncherSpec(backend="local", max_parallel=1), tmp_path)
    [job] = backend.submit(_sleep_briefly, [()], Resources(timeout_min=2), name="toy")
    start = time.monotonic()
    backend.wait(120)
    assert job.handle.done()
    assert time.monotonic() - start < 60  # a poll of 120 s would still be waiting
    start = time.monotonic()
    backend.wait(0.3)  # the ended job was released: nothing left to wake on
    assert time.monotonic() - start >= 0.3
