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
