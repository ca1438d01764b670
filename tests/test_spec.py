"""Sweep spec: expansion counts, stage-id stability/sensitivity, one-line load errors (exit 2, no side effects)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.config import ConfigError
from study.sweep import load_plan, main
from tests.toy_stages import PLUGINS as TOY

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, spec: dict, name="s.yaml") -> Path:
    spec.setdefault("name", "t")
    spec.setdefault("stages", ["toy_data", "toy_train", "toy_eval"])
    spec.setdefault("plugins", TOY)
    spec.setdefault("study_dir", str(tmp_path / "study"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_zip_lists_seeds_multiply(tmp_path):
    path = write(tmp_path, {"axes": {"grid": {"toy.lr": [0.1, 0.01, 0.001]},
                                     "zip": {"toy.hidden": [4, 8], "data.n": [64, 128]},
                                     "lists": [{"eval.n": 10}, {"eval.n": 20, "eval.seed": 3}]},
                            "seeds": [0, 1]})
    plan = load_plan(str(path))
    assert len(plan.cells) == 3 * 2 * 2 * 2
    # stages: data varies with the zip (2), train with lr x zip x seed (12), eval with everything (24)
    kinds = [s.kind for s in plan.stages.values()]
    assert (kinds.count("toy_data"), kinds.count("toy_train"), kinds.count("toy_eval")) == (2, 12, 24)


def test_two_zip_groups_and_filters(tmp_path):
    path = write(tmp_path, {"axes": {"zip": [{"toy.hidden": [4, 8, 16], "toy.lr": [0.1, 0.2, 0.3]},
                                             {"data.n": [64, 128]}]},
                            "seeds": [0, 1, 2],
                            "include": [{"toy.hidden": 4}, {"toy.hidden": 8}],
                            "exclude": [{"toy.hidden": 8, "seed": 2}, {"data.n": 128, "seed": 0}]})
    plan = load_plan(str(path))
    kept = [(c.values["toy.hidden"], c.values["data.n"], c.values["seed"]) for c in plan.cells]
    expected = [(h, n, s) for h in (4, 8) for n in (64, 128) for s in (0, 1, 2)
                if not (h == 8 and s == 2) and not (n == 128 and s == 0)]
    assert sorted(kept) == sorted(expected) and len(kept) == 8  # 12 - 2 - 2


def test_stage_ids_ignore_key_order_defaults_and_nonsemantic(tmp_path):
    a = load_plan(str(write(tmp_path, {"base": {"toy": {"lr": 0.01, "hidden": 16}}}, "a.yaml")))
    b = load_plan(str(write(tmp_path, {"base": {"toy": {"hidden": 16, "lr": 0.01, "fail_at": -1}}}, "b.yaml")))
    c = load_plan(str(write(tmp_path, {"base": {"toy": {"hidden": 16, "lr": 0.01, "step_sleep_s": 0.5}},
                                       "launcher": {"backend": "slurm"}, "resources": {"toy_train": {"gpus": 1}}},
                            "c.yaml")))
    assert list(a.stages) == list(b.stages) == list(c.stages)


@pytest.mark.parametrize("change", ["toy.lr=0.02", "toy.train.steps=41", "data.noise=0.2", "eval.n=100", "seed=3"])
def test_any_semantic_change_changes_the_id_and_downstream(tmp_path, change):
    path = write(tmp_path, {})
    base = load_plan(str(path)).cells[0].stages
    changed = load_plan(str(path), ["seeds=[3]" if change.startswith("seed") else f"base.{change}"]).cells[0].stages
    section = change.split(".")[0].split("=")[0]
    first = {"data": "toy_data", "toy": "toy_train", "seed": "toy_train", "eval": "toy_eval"}[section]
    order = ["toy_data", "toy_train", "toy_eval"]
    for kind in order:
        same = base[kind].id == changed[kind].id
        assert same == (order.index(kind) < order.index(first)), (kind, change)


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "study.sweep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


MALFORMED = {
    "yaml_syntax": ("name: t\nstages: [toy_data\n", "YAML syntax error"),
    "duplicate_key": ("name: t\nstages: [toy_data]\nname: u\n", "name: duplicate key 'name' at line 3 (first at line 1"),
    "unknown_key": ({"launcher": {"backnd": "local"}}, "launcher.backnd: unknown key 'backnd' (did you mean 'backend'?)"),
    "wrong_type": ({"axes": {"grid": {"toy.lr": [0.1, "fast"]}}}, "axes.grid.toy.lr: expected a number"),
    "unknown_stage": ({"stages": ["toy_data", "toy_trian"]}, "stages[1]: unknown stage kind 'toy_trian' (did you mean 'toy_train'?)"),
    "validate_hook": ({"base": {"toy": {"hidden": 0}}}, "base.toy.hidden: must be >= 1"),
    "zip_mismatch": ({"axes": {"zip": {"toy.lr": [0.1, 0.2], "toy.hidden": [4]}}}, "axes.zip: zipped lists must have equal lengths"),
    "unknown_axis_key": ({"axes": {"grid": {"toy.lrr": [0.1]}}}, "axes.grid.toy.lrr: unknown key 'lrr' in toy (did you mean 'toy.lr'?)"),
    "unknown_section": ({"base": {"tokenzier": {}}}, "base.tokenzier: no stage reads section 'tokenzier'"),
    "missing_file": (None, "file not found"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_spec_is_one_line_exit_2_and_no_side_effects(tmp_path, case):
    content, expected = MALFORMED[case]
    study = tmp_path / "study"
    if content is None:
        path = tmp_path / "missing.yaml"
    elif isinstance(content, str):
        path = tmp_path / "s.yaml"
        path.write_text(content + f"study_dir: {study}\n")
    else:
        path = write(tmp_path, content)
    # in-process for most, one real subprocess for the exit code contract
    if case in ("unknown_key", "missing_file"):
        proc = _cli(tmp_path, str(path))
        code, err = proc.returncode, proc.stderr
    else:
        import contextlib, io
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            code = main([str(path)])
        err = buf.getvalue()
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert expected in lines[0] and str(path) in lines[0], lines[0]
    assert not study.exists()


def test_bad_override_and_filter_typo_name_their_key(tmp_path):
    path = write(tmp_path, {"include": [{"toy.hiden": 4}]})
    with pytest.raises(ConfigError, match=r"include\[0\]\.toy\.hiden: .*did you mean 'toy.hidden'"):
        load_plan(str(path))
    with pytest.raises(ConfigError, match=r"seeds\[0\]: expected an integer"):
        load_plan(str(write(tmp_path, {})), ["seeds=[x]"])


def test_example_sweep_loads():
    plan = load_plan(str(REPO / "sweeps" / "toy.yaml"))
    assert len(plan.cells) == 8 and sum(s.kind == "toy_data" for s in plan.stages.values()) == 1


def test_exponent_floats_in_axes_and_filters_match(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: t\nstages: [toy_data, toy_train, toy_eval]\nstudy_dir: {tmp_path / 'study'}\n"
                    "axes: {grid: {toy.lr: [1e-2, 3e-3]}}\ninclude: [{toy.lr: 3e-3}]\n")
    plan = load_plan(str(path))
    assert [c.values["toy.lr"] for c in plan.cells] == [3e-3]


def _main_in_process(*args) -> tuple[int, list[str]]:
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, [line for line in buf.getvalue().splitlines() if line.strip()]


OUT_OF_RANGE = {
    "base.toy.train.steps=-5": "base.toy.train.steps: -5 is out of range (must be >= 1)",
    "resources.toy_train.gpus=-1": "resources.toy_train.gpus: -1 is out of range (must be >= 0)",
    "resources.toy_train.mem_gb=-4": "resources.toy_train.mem_gb: -4.0 is out of range (must be > 0)",
    "resources.toy_train.cpus=0": "resources.toy_train.cpus: 0 is out of range (must be >= 1)",
    "launcher.poll_s=-1": "launcher.poll_s: -1.0 is out of range (must be > 0)",
    "launcher.retries=-1": "launcher.retries: -1 is out of range (must be >= 0)",
    "launcher.gpus=[0,-2]": "launcher.gpus[1]: -2 is out of range (must be >= 0)",
    "base.toy.train.ema_decay=1.5": "base.toy.train.ema_decay: 1.5 is out of range (must be in [0, 1))",
    "base.toy.train.ema_decay=.nan": "base.toy.train.ema_decay: nan is out of range (must be in [0, 1))",
}


@pytest.mark.parametrize("override", sorted(OUT_OF_RANGE))
def test_numbers_out_of_range_are_one_line_exit_2_before_anything_exists(tmp_path, override):
    path = write(tmp_path, {})
    for command in ("run", "status"):
        code, lines = _main_in_process(command, str(path), "--set", override)
        assert code == 2 and lines == [f"error: {path}: {OUT_OF_RANGE[override]}"], lines
    assert not (tmp_path / "study").exists()


def test_pipeline_token_count_is_range_checked_at_dry_run(tmp_path):
    study = tmp_path / "study"
    code, lines = _main_in_process("run", str(REPO / "sweeps" / "quickstart.yaml"), "--dry-run",
                                   "--set", f"study_dir={study}",
                                   "--set", "axes.lists=[{tokenizer.model.kind: vfmtok, tokenizer.model.num_queries: 0}]")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].endswith("axes.lists[0].tokenizer.model.num_queries: 0 is out of range (must be >= 1)"), lines[0]
    assert not study.exists()


SEARCH = {"n_trials": 2, "metric": "toy_train/val_mse", "stages": ["toy_data", "toy_train"]}
UP_FRONT = {
    "name_leaves_folder": ({"name": "../../x"}, [], "name: '../../x' must be a plain name"),
    "study_dir_placeholder": ({"study_dir": "/x/{user}"}, [],
                              "study_dir: '/x/{user}': unknown placeholder {user} (only {name} is filled in)"),
    "study_dir_brace": ({"study_dir": "/x/{name"}, [], "study_dir: '/x/{name': "),
    "plugin_typo": ({"plugins": ["tests.toy_stagez"]}, [],
                    "plugins[0]: no module named 'tests.toy_stagez' (did you mean 'tests.toy_stages'?)"),
    "plugin_package_typo": ({"plugins": ["studdy.pipeline"]}, [], "plugins[0]: no module named 'studdy.pipeline'"),
    "tracking_uri": ({"tracking": {"uri": "sqlit:///x.db"}}, [], "tracking.uri: 'sqlit:///x.db' is not an MLflow"),
    "tracking_sqlite": ({"tracking": {"uri": "sqlite://x.db"}}, [], "tracking.uri: 'sqlite://x.db': a sqlite URI is"),
    "set_on_axis": ({"axes": {"grid": {"toy.lr": [0.1, 0.2]}}}, ["base.toy.lr=0.5"],
                    "--set: 'base.toy.lr' is also set per cell by axes.grid.toy.lr"),
    "set_on_seed_key": ({}, ["base.seed=4"], "--set: 'base.seed' is also set per cell by seed_keys[0]"),
    "categorical_type": ({"search": {**SEARCH, "space": {"toy.hidden": {"type": "categorical", "choices": [4, "big"]}}}},
                         [], "search.space.toy.hidden: expected an integer, got str 'big'"),
    "categorical_range": ({"search": {**SEARCH, "space": {"toy.train.steps": {"type": "categorical", "choices": [4, 0]}}}},
                          [], "search.space.toy.train.steps: 0 is out of range (must be >= 1)"),
    "categorical_list": ({"search": {**SEARCH, "space": {"toy.hidden": {"type": "categorical", "choices": [[4]]}}}},
                         [], "search.space.toy.hidden.choices[0]: [4] is a list"),
    "log_low_zero": ({"search": {**SEARCH, "space": {"toy.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}},
                     [], "search.space.toy.lr.low: a log scale needs low > 0, got 0.0"),
    "metric_kind": ({"search": {**SEARCH, "metric": "toy_eval/mse", "space": {"toy.lr": {"type": "float", "low": 0.1,
                                                                                   "high": 1}}}},
                    [], "search.metric: 'toy_eval/mse' must be '<stage kind>/<key>' with a kind of this sweep"),
    "prune_on_form": ({"search": {**SEARCH, "pruner": "median", "prune_on": "val_mse",
                                  "space": {"toy.lr": {"type": "float", "low": 0.1, "high": 1}}}},
                      [], "search.prune_on: 'val_mse' must be '<stage kind>/<key>'"),
    "int_bounds": ({"search": {**SEARCH, "space": {"toy.hidden": {"type": "int", "low": 1.5, "high": 8}}}},
                   [], "search.space.toy.hidden.low: an int dimension needs an integer, got 1.5"),
}


@pytest.mark.parametrize("case", sorted(UP_FRONT))
def test_spec_problems_are_found_before_anything_is_created(tmp_path, case):
    content, overrides, expected = UP_FRONT[case]
    content = {**content, "stages": content.get("search", {}).pop("stages", None) or ["toy_data", "toy_train", "toy_eval"]}
    path = write(tmp_path, content)
    args = [x for o in overrides for x in ("--set", o)]
    for command in (["run", "--dry-run"], ["run"], ["status"], ["collect"]):
        code, lines = _main_in_process(command[0], str(path), *command[1:], *args)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"error: {path}: ") and expected in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
