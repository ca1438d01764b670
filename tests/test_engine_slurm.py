"""The engine on the real single-node Slurm (study/cluster/slurm-up.sh): arrays, failures, requeue + resume."""
import time

import pytest
import submitit
import torch
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


def test_two_rank_tokenizer_requeued_mid_run_ends_as_the_uninterrupted_run(tmp_path, slurm_cluster):
    """2 tasks (gloo) of the study's tokenizer stage: preempted after its first checkpoint, both
    ranks resume from it, and the final weights equal an uninterrupted 2-rank run (the local
    backend's); the ledger and MLflow hold one run, its result written once."""
    from tests.test_multirank import WEIGHT_ATOL, final_weights, loss_curves, tokenizer_spec, tokenizer_stage_dir

    steps, res = 24, {"cpus": 1, "mem_gb": 2, "timeout_min": 20, "tasks_per_node": 2,
                      "partition": slurm_cluster.partition}
    ref = tokenizer_spec(tmp_path / "ref", {"backend": "local", "poll_s": 0.2}, {**res, "partition": None}, steps)
    assert main([ref, "--quiet"]) == 0
    path = tokenizer_spec(tmp_path / "slurm", {"backend": "slurm", "poll_s": 1,
                                               "submitit": {"slurm_signal_delay_s": 10}}, res, steps)
    assert main([path, "--detach", "--quiet"]) == 0
    plan, sdir = load_plan(path), tokenizer_stage_dir(path)
    deadline = time.time() + 600
    while not (sdir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    status = ledger.read_status(sdir)
    assert status["state"] == State.RUNNING, "the stage ended before it could be preempted"
    submitit.SlurmJob(folder=plan.root / "submitit" / "%j", job_id=status["job_id"])._interrupt()
    assert main(["wait", path]) == 0
    status = ledger.read_status(sdir)
    assert status["state"] == State.COMPLETED and status["attempt"] == 2 and "preempted" in status
    assert not status.get("errors")

    want, got = final_weights(tokenizer_stage_dir(ref)), final_weights(sdir)
    # all of them, the quantizer's usage buffer too (every rank's ids; rank 0 saves it, every rank restores it)
    assert all(torch.allclose(got[k].float(), v.float(), atol=WEIGHT_ATOL) for k, v in want.items())
    # one cell run; a step replayed after the requeue logs the value it logged before
    curves = loss_curves(path)
    for key, points in curves.items():
        by_step: dict[int, set] = {}
        for step, value in points:
            by_step.setdefault(step, set()).add(round(value, 6))
        assert sorted(by_step) == list(range(1, steps + 1)) and all(len(v) == 1 for v in by_step.values()), key

