"""Watching and re-running a sweep: collect keeps integers, a status that fits a terminal, a compact
live view, a re-run that returns at once, a dry run of a million cells."""
import csv
import json

import yaml

from study.sweep import main
from tests.toy_stages import PLUGINS as TOY


def write(tmp_path, **spec) -> str:
    spec = {"name": "w", "stages": ["toy_data", "toy_train", "toy_eval"], "plugins": TOY,
            "study_dir": str(tmp_path / "study"), "tracking": {"enabled": False},
            "launcher": {"backend": "debug", "poll_s": 0.1}, **spec}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_collect_keeps_an_integer_axis_integral_when_some_cells_do_not_set_it(tmp_path, capsys):
    path = write(tmp_path, axes={"lists": [{"toy.hidden": 64}, {"toy.lr": 0.02}]})
    out = tmp_path / "r.csv"
    assert main(["collect", path, "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["toy.hidden"] for r in rows] == ["64", ""]
    assert [r["toy.lr"] for r in rows] == ["", "0.02"]
    assert main(["collect", path, "--out", str(tmp_path / "r.json")]) == 0
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["toy.hidden"] for r in records] == [64, None] and isinstance(records[0]["toy.hidden"], int)


TRAIN = {"toy": {"train": {"steps": 20, "ema_decay": 0.0, "precision": "fp32", "log_every": 5, "ckpt_every": 10,
                           "progress": False, "device": "cpu"}}}


def test_status_fits_100_columns_and_has_wide_and_json_forms(tmp_path, capsys):
    # long cell names and a failure message: the rows that used to run past 250 characters
    path = write(tmp_path, base=TRAIN, axes={"grid": {"toy.lr": [0.003, 0.03], "eval.n": [100, 200]},
                                            "lists": [{"toy.fail_at": 7, "data.noise": 0.123456789}, {"data.n": 300}]})
    assert main([path]) == 1
    capsys.readouterr()
    assert main(["status", path]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 8 and max(len(line) for line in lines) <= 100, max(map(len, lines))
    assert sum(" CCC" in line for line in lines) == 4 and sum(" CF." in line for line in lines) == 4
    assert main(["status", path, "--wide"]) == 1
    wide = capsys.readouterr().out
    assert wide.count("toy_train:FAILED") == 4 and max(len(line) for line in wide.splitlines()) > 100
    assert main(["status", path, "--json"]) == 1
    cells = json.loads(capsys.readouterr().out)
    assert [c["state"] for c in cells].count("COMPLETED") == 4 and len(cells) == 8
    failed = next(c for c in cells if c["state"] == "FAILED")
    assert failed["stages"]["toy_train"]["state"] == "FAILED"
    assert "toy failure requested at step 7" in failed["stages"]["toy_train"]["error"]
    done = next(c for c in cells if c["state"] == "COMPLETED")
    assert done["stages"]["toy_train"]["metrics"]["steps"] == 20
    assert done["stages"]["toy_train"]["total_steps"] == 20  # recorded by the worker for the progress bar


def test_live_view_piped_prints_state_changes_only_and_on_a_terminal_a_bar_per_running_stage(tmp_path, capsys):
    import time

    from study import ledger
    from study.sweep import Follower, load_plan
    path = write(tmp_path, axes={"grid": {"toy.lr": [0.003, 0.03], "eval.n": [100, 200]}})
    plan = load_plan(path)  # 1 + 2 + 4 stages, none started
    view = Follower(plan)  # stdout is captured: not a terminal
    view.show()
    assert capsys.readouterr().out == ""  # no PENDING flood
    train = next(s for s in plan.stages.values() if s.kind == "toy_train")
    ledger.update_status(train.dir(plan.root), state="RUNNING", step=10, start_step=0, total_steps=40,
                         train_started=time.time() - 5.0, last_metric={"loss/model": 0.25})
    view.show()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith(f"{train.key} RUNNING")
    assert lines[1].endswith("4 cells; stages PENDING=6 RUNNING=1")
    view.show()
    assert capsys.readouterr().out == ""  # nothing changed

    Follower(plan, tty=True).show()
    frame = capsys.readouterr().out.split("\x1b[J", 1)[1].splitlines()
    assert len(frame) == 2 and "PENDING=6 RUNNING=1" in frame[0]
    # 10 of 40 steps in 5 s: 30 steps left take 15 s
    assert frame[1].startswith(f"{train.key} [#####...............] 10/40 0:05 eta 0:15 model=0.25")


def test_rerun_of_a_finished_sweep_is_fast_and_rebuilds_the_report_only_when_a_result_changed(tmp_path, monkeypatch,
                                                                                              capsys):
    import subprocess

    from study import sweep, tracking
    from study.sweep import load_plan
    reports, real_run = [], subprocess.run

    def fake_report_steps(cmd, **kwargs):  # the report's subprocesses: record them, write the file
        if cmd[1] != "-m" or not cmd[2].startswith("analysis."):
            return real_run(cmd, **kwargs)
        if cmd[2] == "analysis.report":
            reports.append(cmd)
            (tmp_path / "study" / "report").mkdir(parents=True, exist_ok=True)
            (tmp_path / "study" / "report" / "report.html").write_text("<html/>")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sweep.subprocess, "run", fake_report_steps)
    path = write(tmp_path, base=TRAIN, tracking={"enabled": True}, report=True,
                 axes={"grid": {"toy.lr": [0.003, 0.03]}})
    assert main([path]) == 0 and len(reports) == 1

    def no_store(*args, **kwargs):
        raise AssertionError("a finished sweep opened the tracking store")

    monkeypatch.setattr(tracking, "init_store", no_store)
    assert main([path]) == 0  # how long it takes is for `python -m study.bench engine`, not a test
    assert len(reports) == 1 and "no result changed" in capsys.readouterr().out

    plan = load_plan(path)
    evaluated = next(s for s in plan.stages.values() if s.kind == "toy_eval").dir(plan.root) / "result.json"
    result = json.loads(evaluated.read_text())
    result["metrics"]["mse"] += 1.0
    evaluated.write_text(json.dumps(result))
    assert main([path]) == 0 and len(reports) == 2


def test_stage_ids_hashed_from_a_cached_semantic_json_equal_the_full_recompute():
    import hashlib

    from study.config import config_hash, hash_semantic, semantic_json, to_dict
    from tests.toy_stages import TrainStage
    cfg = TrainStage()
    extra = ("toy_train", 1, "toy_data/0123456789ab")
    full = json.dumps([to_dict(cfg, semantic_only=True), list(extra)], sort_keys=True, default=str)
    expected = hashlib.sha256(full.encode()).hexdigest()[:12]
    assert config_hash(cfg, *extra) == hash_semantic(semantic_json(cfg), *extra) == expected


def test_dry_run_of_a_hundred_thousand_cells_is_a_bounded_summary(tmp_path):
    # 10^5 cells; that 10^6 take no more memory: tests/test_dryrun.py
    import subprocess
    import sys
    from pathlib import Path
    ten = list(range(1, 11))
    path = write(tmp_path, axes={"grid": {"toy.lr": [i / 1000 for i in ten], "toy.hidden": ten, "eval.n": ten,
                                          "eval.seed": ten, "data.n": [10 + i for i in ten]}})
    # the child reports its own usage: RUSAGE_CHILDREN's peak would be that of any earlier child of
    # this (possibly long-lived xdist worker) process, and ru_maxrss keeps the forked parent's resident
    # size across exec; VmHWM belongs to the child's own address space
    own_usage = ("import json, re, resource, sys\nfrom study.sweep import main\ncode = main(sys.argv[1:])\n"
                 "u = resource.getrusage(resource.RUSAGE_SELF)\n"
                 "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
                 "print(json.dumps([u.ru_utime + u.ru_stime, hwm]), file=sys.stderr)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", own_usage, path, "--dry-run"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stderr
    cpu_s, maxrss_kib = json.loads(done.stderr.strip().splitlines()[-1])
    lines = done.stdout.splitlines()
    assert lines[0].startswith("sweep 'w': 100000 cells, 101010 distinct stages") and len(lines) < 20, lines  # a summary, not a line per cell
    assert "toy_eval        100000  100000" in done.stdout
    assert cpu_s < 40, cpu_s  # CPU time: the wall clock of a loaded CI says little
    assert maxrss_kib < 1_000_000, maxrss_kib


def test_engine_benchmark_runs_a_sweep_of_trivial_cells_and_its_rerun():
    from study.bench_engine import engine_overhead
    report = engine_overhead(cells=3, tracking=False)
    assert report["cells"] == 3 and report["tracking"] == "off"
    assert report["run"]["wall_s"] > 0 and report["rerun"]["wall_s"] > 0
