"""The config system: typed loading, overrides, one-line errors, stable hashes."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from study.config import ConfigError, bounded, config_hash, flatten, load, nonsemantic, parse_cli


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    name: str
    kind: Literal["gpt", "dit"] = "gpt"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    weights: Optional[str] = None
    out_dir: str = nonsemantic("out")

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"must be > 0, got {self.steps}", key="steps")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_loads_nested_types_and_overrides(tmp_path):
    path = write(tmp_path, "name: a\noptim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\n")
    cfg = load(Run, path, ["steps=5", "optim.lr=2e-4", "tags=[x, y]", "weights=null"])
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.optim.betas == (0.8, 0.9)
    assert cfg.steps == 5 and cfg.tags == ["x", "y"] and cfg.weights is None


@pytest.mark.parametrize("text,overrides,needle", [
    ("name: a\nstesp: 3\n", [], "c.yaml: stesp: unknown key 'stesp' (did you mean 'steps'?)"),
    ("name: a\nsteps: many\n", [], "c.yaml: steps: expected an integer, got str 'many'"),
    ("name: a\nkind: gtp\n", [], "kind: 'gtp' is not one of 'gpt', 'dit' (did you mean 'gpt'?)"),
    ("name: a\noptim: {lr: fast}\n", [], "optim.lr: expected a number"),
    ("name: a\noptim: {betas: [1]}\n", [], "optim.betas: expected 2 items, got 1"),
    ("steps: 3\n", [], "name: required key is missing"),
    ("name: a\n", ["steps=0"], "c.yaml: steps: must be > 0, got 0"),
    ("name: [a\n", [], "YAML syntax error at line"),
    ("name: a\n", ["optim.lrr=1"], "optim.lrr: unknown key 'lrr' (did you mean 'lr'?)"),
])
def test_errors_are_one_line_and_name_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load(Run, write(tmp_path, text), overrides)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load(Run, tmp_path / "nope.yaml")


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, "name: a\nsteps: x\n")
    with pytest.raises(SystemExit) as exc:
        parse_cli(Run, [str(path), "--set", "optim.lr=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "steps" in err and len(err.splitlines()) == 1


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load(Run, write(tmp_path, "name: a\nsteps: 10\noptim: {lr: 1e-4}\n"))
    b = load(Run, data={"optim": {"betas": [0.9, 0.95], "lr": 0.0001}, "name": "a"})  # order, defaults
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load(Run, data={"name": "a", "optim": {"lr": 2e-4}}))
    assert config_hash(a) == config_hash(load(Run, data={"name": "a", "out_dir": "elsewhere"}))
    assert config_hash(a, "upstream1") != config_hash(a, "upstream2")


def test_flatten_gives_dotted_params():
    cfg = load(Run, data={"name": "a"})
    flat = flatten(cfg)
    assert flat["optim.lr"] == 1e-4 and flat["name"] == "a" and flat["steps"] == 10


@dataclass
class Preset:
    optim: Optim = field(default_factory=lambda: Optim(lr=5e-4, betas=(0.8, 0.9)))


def test_partial_mapping_updates_the_default_instead_of_replacing_it():
    cfg = load(Preset, data={"optim": {"lr": 1e-3}})
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.8, 0.9)


# --------------------------------------------------------------------------- strict YAML
def test_duplicate_key_is_an_error_naming_file_key_and_lines(tmp_path):
    path = write(tmp_path, "name: a\noptim:\n  lr: 1e-3\n  betas: [0.8, 0.9]\n  lr: 2e-3\n")
    with pytest.raises(ConfigError) as err:
        load(Run, path)
    assert str(err.value) == f"{path}: lr: duplicate key 'lr' at line 5 (first at line 3; keep one)"
    with pytest.raises(ConfigError, match="duplicate key 'name' at line 2"):
        load(Run, write(tmp_path, "name: a\nname: b\n"))


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = write(tmp_path, "defaults: &d {lr: 0.5}\nname: a\noptim:\n  <<: *d\n  lr: 0.25\n")
    from study.config import read_yaml
    assert read_yaml(path)["optim"] == {"lr": 0.25}


@pytest.mark.parametrize("text, value", [("3e-3", 3e-3), ("1E5", 1e5), ("-2.5e+2", -250.0), (".5e1", 5.0)])
def test_exponent_floats_are_floats_in_files_and_overrides(tmp_path, text, value):
    from study.config import parse_override, read_yaml
    data = read_yaml(write(tmp_path, f"x: {text}\nys: [{text}, 1, '3e-3']\n"))
    assert data == {"x": value, "ys": [value, 1, "3e-3"]} and isinstance(data["x"], float)
    assert parse_override(f"a.b=[{text}]") == ("a.b", [value])
    assert read_yaml(write(tmp_path, "n: 3\nv: 1.0.0\n")) == {"n": 3, "v": "1.0.0"}  # ints/versions unchanged


# --------------------------------------------------------------------------- ranges
@dataclass
class Ranged:
    steps: int = bounded(10, ge=1)
    dropout: float = bounded(0.1, ge=0, lt=1)
    temperature: float = bounded(1.0, gt=0)
    ids: list[int] = bounded(default_factory=list, ge=0)
    every: int = nonsemantic(5, ge=1)


@pytest.mark.parametrize("text, message", [
    ("steps: 0", "steps: 0 is out of range (must be >= 1)"),
    ("dropout: 1.0", "dropout: 1.0 is out of range (must be in [0, 1))"),
    ("dropout: -0.5", "dropout: -0.5 is out of range (must be in [0, 1))"),
    ("temperature: 0", "temperature: 0.0 is out of range (must be > 0)"),
    ("temperature: .inf", None),
    ("temperature: .nan", "temperature: nan is out of range (must be > 0)"),
    ("ids: [0, 3, -1]", "ids[2]: -1 is out of range (must be >= 0)"),
    ("every: 0", "every: 0 is out of range (must be >= 1)"),
])
def test_ranges_are_checked_at_parse_time_with_file_key_value_and_range(tmp_path, text, message):
    path = write(tmp_path, text + "\n")
    if message is None:
        assert load(Ranged, path).temperature == float("inf")
        return
    with pytest.raises(ConfigError) as err:
        load(Ranged, path)
    assert str(err.value) == f"{path}: {message}"


def test_range_metadata_keeps_defaults_and_hash_semantics():
    from study.config import Range
    assert Ranged() == Ranged(10, 0.1, 1.0, [], 5)
    assert config_hash(Ranged()) == config_hash(Ranged(every=7))  # nonsemantic stays out of the hash
    assert 0 in Range(ge=0) and 0 not in Range(gt=0) and 1 not in Range(ge=0, lt=1) and 1 in Range(gt=0, le=1)
    assert float("nan") not in Range(ge=0)
    assert [str(Range(ge=0)), str(Range(gt=0, le=1)), str(Range(lt=2))] == [">= 0", "in (0, 1]", "< 2"]
