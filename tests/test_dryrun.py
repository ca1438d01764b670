"""The dry run without the plan: its summary equals the one recomputed from the full plan (grids,
zips, lists, shared seeds, duplicates, include / exclude, stages on disk), its cell list names
the plan's cells, an invalid spec fails on the plan's first error, and its memory does not grow
with the cells."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study import ledger
from study.dryrun import DrySummary, KindCount, summarize
from study.ledger import StageStates, State
from study.stages import StageResult, get_kind
from study.sweep import load_checked_spec, load_plan, main
from tests.toy_stages import PLUGINS as TOY

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, **spec) -> str:
    spec = {"name": "d", "stages": ["toy_data", "toy_train", "toy_eval"], "plugins": TOY,
            "study_dir": str(tmp_path / "study"), "tracking": {"enabled": False},
            "launcher": {"backend": "debug"}, **spec}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def from_plan(path: str, force: bool = False, retry_failed: bool = False, overrides=()) -> DrySummary:
    """The reference: every cell and stage of the full plan, each stage folder's status read."""
    plan = load_plan(path, list(overrides))
    states = {key: ledger.read_status(st.dir(plan.root))["state"] if st.dir(plan.root).is_dir() else State.PENDING
              for key, st in plan.stages.items()}
    kinds = {}
    for kind in plan.spec.stages:
        keys = [key for key, st in plan.stages.items() if st.kind == kind]
        to_run = [k for k in keys
                  if force or states[k] == State.PENDING or (retry_failed and states[k] == State.FAILED)]
        kinds[kind] = KindCount(len(keys), len(to_run))
    messages = [get_kind(st.kind).missing(st.config) for key, st in plan.stages.items()
                if get_kind(st.kind).missing and states[key] != State.COMPLETED]
    first = {kind: st.config for kind, st in plan.cells[0].stages.items()}
    return DrySummary(len(plan.cells) + plan.merged_duplicates, len(plan.cells), kinds, first,
                      list(dict.fromkeys(m for m in messages if m)))


def streamed(path: str, force: bool = False, retry_failed: bool = False, overrides=()) -> DrySummary:
    spec = load_checked_spec(path, list(overrides))
    return summarize(spec, path, StageStates(spec.root, spec.stages), force, retry_failed)


SWEEPS = {
    "grid and seeds": dict(axes={"grid": {"toy.lr": [0.01, 0.02, 0.03], "eval.n": [100, 200], "data.n": [64, 128]}},
                           seeds=[0, 1]),
    # a value twice, an empty list item and items equal to the base: duplicate cells and kinds that give
    # two points one config
    "zip, lists, duplicates": dict(axes={"zip": {"eval.n": [100, 100, 300], "eval.seed": [1, 1, 2]},
                                         "lists": [{"toy.hidden": 16}, {}, {"data.noise": 0.1},
                                                   {"toy.lr": 0.02, "eval.n": 50}, {"data.noise": 0.3}]}),
    # one seed written into every kind's sections links them all; the lists collapse for toy_data
    "seeds shared by every kind": dict(axes={"lists": [{"data.noise": 0.1}, {"data.noise": 0.2}, {"toy.lr": 0.02}],
                                             "grid": {"toy.hidden": [8, 16]}},
                                       seeds=[0, 1, 2], seed_keys=["seed", "data.seed", "eval.seed"]),
    # a seed in two kinds' sections links them, and every point gives its own config
    "seeds shared, no config twice": dict(axes={"grid": {"toy.hidden": [8, 16], "eval.n": [100, 200]}},
                                          seeds=[0, 1], seed_keys=["seed", "data.seed"]),
    "seeds that set nothing": dict(axes={"grid": {"toy.lr": [0.01, 0.02]}}, seeds=[0, 1, 2], seed_keys=[]),
    "include and exclude": dict(axes={"grid": {"toy.lr": [0.01, 0.02, 0.03], "eval.n": [100, 200],
                                               "data.n": [64, 128]}},
                                include=[{"toy.lr": 0.01}, {"data.n": 64}], exclude=[{"eval.n": 200, "toy.lr": 0.02}]),
    "several zip groups, one cell": dict(axes={"zip": [{"toy.lr": [0.01]}, {"eval.n": [100]}]}),
}


@pytest.mark.parametrize("name", list(SWEEPS))
def test_summary_equals_the_full_plans(tmp_path, name):
    path = write(tmp_path, **SWEEPS[name])
    assert streamed(path) == from_plan(path)


def _fake_stage(root: Path, kind: str, stage_id: str, state: State) -> None:
    stage_dir = root / "stages" / kind / stage_id
    stage_dir.mkdir(parents=True)
    if state == State.COMPLETED:
        ledger.write_result(stage_dir, StageResult(metrics={"x": 1.0}).to_json())
    ledger.update_status(stage_dir, state=state.value, runtime_s=5.0)


@pytest.mark.parametrize("name", ["grid and seeds", "include and exclude"])
def test_summary_with_stages_on_disk_equals_the_full_plans(tmp_path, name):
    path = write(tmp_path, **SWEEPS[name])
    plan = load_plan(path)
    cells = plan.cells
    _fake_stage(plan.root, "toy_data", cells[0].stages["toy_data"].id, State.COMPLETED)
    _fake_stage(plan.root, "toy_train", cells[0].stages["toy_train"].id, State.COMPLETED)
    _fake_stage(plan.root, "toy_train", cells[-1].stages["toy_train"].id, State.FAILED)
    _fake_stage(plan.root, "toy_eval", cells[1].stages["toy_eval"].id, State.RUNNING)
    _fake_stage(plan.root, "toy_eval", "0123456789ab", State.COMPLETED)  # no cell of this sweep's
    for force, retry in ((False, False), (False, True), (True, False)):
        summary = streamed(path, force, retry)
        assert summary == from_plan(path, force, retry)
    assert summary.kinds["toy_data"].total > 1  # the comparison saw stages beyond the ones on disk


def test_missing_inputs_of_the_studys_chain_equal_the_full_plans(tmp_path):
    # several kinds check their inputs (data folder, weights): the messages in the plan's order
    path = str(REPO / "sweeps" / "backbones.yaml")
    overrides = [f"study_dir={tmp_path}/study"]
    summary = streamed(path, overrides=overrides)
    assert summary == from_plan(path, overrides=overrides) and summary.cells == 18


def test_listed_cells_are_the_plans(tmp_path, capsys):
    path = write(tmp_path, **SWEEPS["zip, lists, duplicates"])
    plan = load_plan(path)
    assert plan.merged_duplicates > 0
    _fake_stage(plan.root, "toy_data", plan.cells[0].stages["toy_data"].id, State.COMPLETED)
    assert main([path, "--dry-run", "--list"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  cell +(\d+) (\w+)  .*\n      (.*)$", out, flags=re.M)
    assert [(int(i), cid) for i, cid, _ in listed] == [(c.index, c.id) for c in plan.cells]
    cached = plan.cells[0].stages["toy_data"].id
    for (_, _, stages), cell in zip(listed, plan.cells):
        assert stages.split("  ") == [f"{kind}:{st.id}[{'cached' if st.id == cached else 'run'}]"
                                      for kind, st in cell.stages.items()]
    header = out.splitlines()[0]
    assert header.startswith(f"sweep 'd': {len(plan.cells)} cells, {len(plan.stages)} distinct stages")


def test_an_invalid_spec_fails_on_the_error_the_plan_meets_first(tmp_path, capsys):
    # cell 0 has an eval.n that is not an int; toy.hidden=0 (toy_train, an earlier kind) comes in cell 2
    path = write(tmp_path, axes={"grid": {"toy.hidden": [16, 0], "eval.n": ["x", 100]}})
    assert main([path]) == 2
    expected = capsys.readouterr().err
    assert main([path, "--dry-run"]) == 2
    assert capsys.readouterr().err == expected and "eval.n" in expected


def _dry_run_peak_kib(tmp_path, factors: int) -> int:
    ten = list(range(1, 11))
    grid = {"toy.lr": [i / 1000 for i in ten], "toy.hidden": ten, "eval.n": ten, "eval.seed": ten,
            "data.n": [10 + i for i in ten], "data.noise": [i / 100 for i in ten]}
    tmp_path.mkdir()
    path = write(tmp_path, axes={"grid": dict(list(grid.items())[:factors])})
    # the child's own peak: ru_maxrss keeps the forked parent's resident size across exec
    own_peak = ("import re, sys\nfrom study.sweep import main\ncode = main(sys.argv[1:])\n"
                "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr)\n"
                "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", own_peak, path, "--dry-run"], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"sweep 'd': {10 ** factors} cells"), done.stdout
    return int(done.stderr.strip().splitlines()[-1])


def test_dry_run_memory_does_not_grow_with_the_cells(tmp_path):
    small, large = _dry_run_peak_kib(tmp_path / "a", 5), _dry_run_peak_kib(tmp_path / "b", 6)
    assert large <= 1.1 * small, (small, large)
