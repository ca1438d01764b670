"""The engine on the real single-node Slurm (study/cluster/slurm-up.sh): arrays, failures, requeue + resume."""
import time

import pytest
import submitit
import yaml

from study import ledger
from study.ledger import State
from study.sweep import load_plan, main
from tests.toy_stages import PLUGINS as TOY

pytestmark = pytest.mark.slurm

FAST = {"steps": 20, "log_every": 5, "ckpt_every": 5, "ema_decay": 0.0, "precision": "fp32", "progress": False,
        "device": "cpu"}


def write(tmp_path, partition, **spec) -> str:
    # timeout_min > 10: below that submitit counts every preemption as a timeout
    stages = spec.pop("stages", ["toy_data", "toy_train"])
    spec = {"name": "slurm", "stages": stages, "plugins": TOY, "study_dir": str(tmp_path / "study"),
            "tracking": {"enabled": False}, "base": {"toy": {"train": FAST}},
            "resources": {k: {"cpus": 1, "mem_gb": 1, "timeout_min": 20, "partition": partition} for k in stages},
            "launcher": {"backend": "slurm", "poll_s": 1, "submitit": {"slurm_signal_delay_s": 10}}, **spec}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def statuses(plan):
    return {k: ledger.read_status(s.dir(plan.root)) for k, s in plan.stages.items()}


def test_2x2_sweep_with_a_failing_cell_then_rerun_submits_nothing(tmp_path, slurm_cluster, capsys):
    path = write(tmp_path, slurm_cluster.partition, stages=["toy_data", "toy_train", "toy_eval"],
                 axes={"grid": {"toy.lr": [0.01, 0.03], "toy.fail_at": [-1, 3]}})
    assert main([path]) == 1
    plan = load_plan(path)
    st = statuses(plan)
    failed = sorted(k for k, s in st.items() if s["state"] == State.FAILED)
    assert len(failed) == 2 and all(k.startswith("toy_train") for k in failed)
    assert all("toy failure requested at step 3" in st[k]["errors"][-1]["traceback"] for k in failed)
    ok = [c for c in plan.cells if c.values["toy.fail_at"] == -1]
    assert all(st[s.key]["state"] == State.COMPLETED for c in ok for s in c.stages.values())
    assert all(st[s.key]["job_id"] and st[s.key]["attempt"] == 1 for c in ok for s in c.stages.values())
    # stages of one level went out as one array: array ids look like <array>_<task>
    assert len({st[k]["job_id"].split("_")[0] for k in st if k.startswith("toy_train")}) == 1
    capsys.readouterr()
    blocked = [c.stages["toy_eval"].key for c in plan.cells if c.values["toy.fail_at"] == 3]
    assert all(st[k]["state"] == State.PENDING and "blocked" in st[k]["note"] for k in blocked)
    assert main([path]) == 1
    assert "0 to submit, 2 blocked" in capsys.readouterr().out


def test_requeued_job_resumes_from_checkpoint_with_the_same_result(tmp_path, slurm_cluster):
    slow = {"toy": {"step_sleep_s": 0.5, "train": {**FAST, "steps": 40}}}
    (tmp_path / "ref").mkdir()
    ref = write(tmp_path / "ref", slurm_cluster.partition, base=slow, launcher={"backend": "debug"})
    assert main([ref]) == 0
    ref_plan = load_plan(ref)
    key = next(k for k in ref_plan.stages if k.startswith("toy_train"))
    reference = ledger.read_result(ref_plan.stages[key].dir(ref_plan.root))

    path = write(tmp_path, slurm_cluster.partition, base=slow)
    assert main([path, "--detach"]) == 0
    plan = load_plan(path)
    sdir = plan.stages[key].dir(plan.root)
    deadline = time.time() + 300
    while not (sdir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.5)
    status = ledger.read_status(sdir)
    assert status["state"] == State.RUNNING
    submitit.SlurmJob(folder=plan.root / "submitit" / "%j", job_id=status["job_id"])._interrupt()
    assert main(["wait", path]) == 0
    status = ledger.read_status(sdir)
    assert status["state"] == State.COMPLETED and status["attempt"] == 2 and "preempted" in status
    assert ledger.read_result(sdir) == reference
