"""Robustness at the edges: concurrent writers, corrupt ledgers, untrusted files, malformed sweeps."""
import json
import multiprocessing
import threading

import numpy as np
import pytest

from study.fsio import atomic_write, atomic_write_text
from study.metrics.fid import ReferenceStats


# --------------------------------------------------------------------------- atomic writes
def _payload(writer: int) -> str:
    # large enough that a write takes many syscalls, so a torn file would show
    return f"{writer}:" + str(writer) * 200_000


def _write_many(path: str, writer: int, times: int) -> None:
    for _ in range(times):
        atomic_write_text(path, _payload(writer))


def _check_complete(text: str) -> None:
    writer = int(text.split(":", 1)[0])
    assert text == _payload(writer), f"torn file: {len(text)} characters from writer {writer}"


def test_concurrent_processes_and_threads_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "shared.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(path), w, 20)) for w in range(4)]
    threads = [threading.Thread(target=_write_many, args=(str(path), w, 20)) for w in range(4, 8)]
    for worker in (*procs, *threads):
        worker.start()
    reads = 0
    while any(p.is_alive() for p in procs) or any(t.is_alive() for t in threads):
        if path.exists():
            _check_complete(path.read_text())
            reads += 1
    for worker in (*procs, *threads):
        worker.join()
    assert all(p.exitcode == 0 for p in procs)
    _check_complete(path.read_text())
    assert reads > 0
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]  # no temp file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def boom(handle):
        handle.write(b"half")
        raise OSError("disk full")

    try:
        atomic_write(path, boom)
    except OSError:
        pass
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_reference_stats_saved_by_concurrent_writers_stay_loadable(tmp_path):
    # the FID statistics cache is shared by every job of a sweep
    path = tmp_path / "stats.npz"
    stats = [ReferenceStats(np.full(64, float(i)), np.eye(64) * i, np.full((256, 64), float(i)), f"id{i}")
             for i in range(6)]
    errors = []

    def save(s):
        try:
            for _ in range(10):
                s.save(path)
        except Exception as err:  # noqa: BLE001 - the assertion below reports it
            errors.append(err)

    threads = [threading.Thread(target=save, args=(s,)) for s in stats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    loaded = ReferenceStats.load(path)
    i = int(loaded.identity[2:])
    np.testing.assert_array_equal(loaded.mu, stats[i].mu)
    np.testing.assert_array_equal(loaded.features, stats[i].features.astype(np.float32))


# --------------------------------------------------------------------------- untrusted files
class _RunsOnLoad:
    """A pickle that would create `marker` when unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_codes_file_with_code_in_it_is_refused_without_running_it(tmp_path):
    import pickle

    import pytest
    import torch

    from generators.train import GeneratorRunConfig, load_codes
    from study.config import load

    marker, codes = tmp_path / "pwned", tmp_path / "codes.pt"
    torch.save({"labels": torch.zeros(4), "grid": (2, 2), "evil": _RunsOnLoad(marker)}, codes)
    cfg = load(GeneratorRunConfig, data={"data": {"source": "cache", "path": str(codes)}})
    with pytest.raises(pickle.UnpicklingError):
        load_codes(cfg)
    assert not marker.exists()


def test_trainer_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    import random

    import torch

    from study.training import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# --------------------------------------------------------------------------- corrupt ledgers, NaN results
def _sweep(tmp_path, **extra):
    import yaml
    fast = {"steps": 10, "batch_size": 16, "ema_decay": 0.0, "precision": "fp32", "ckpt_every": 5, "log_every": 5}
    spec = {"name": "t", "plugins": ["tests.toy_stages"], "stages": ["toy_data", "toy_train", "toy_eval"],
            "study_dir": str(tmp_path / "study"),
            "base": {"toy": {"train": fast}}, "axes": {"grid": {"toy.hidden": [4, 8]}},
            "launcher": {"backend": "debug"}, "tracking": {"enabled": False}, "report": False, **extra}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _cli(*args) -> tuple[int, str, str]:
    import contextlib
    import io

    from study.sweep import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("done")
    path = _sweep(tmp)
    assert _cli(path, "--quiet")[0] == 0
    return tmp


def _copy(finished, tmp_path):
    import shutil
    shutil.copytree(finished / "study", tmp_path / "study")
    return _sweep(tmp_path)


@pytest.mark.parametrize("victim", ["status.json", "result.json"])
def test_a_truncated_ledger_file_fails_its_stage_by_path_and_the_rest_stays_readable(finished_sweep, tmp_path, victim):
    from study.sweep import collect, load_plan
    path = _copy(finished_sweep, tmp_path)
    plan = load_plan(path)
    train = next(s for s in plan.stages.values() if s.kind == "toy_train")  # the first cell's
    corrupt = train.dir(plan.root) / victim
    corrupt.write_text(corrupt.read_text()[:25])

    code, out, err = _cli("status", path, "--wide")
    assert code == 1 and "Traceback" not in err
    assert out.count("toy_train:FAILED") == 1 and out.count("toy_train:COMPLETED") == 1, out
    code, out, _ = _cli("run", path, "--dry-run")
    assert code == 0
    frame = collect(plan)
    assert sorted(frame["state"]) == ["COMPLETED", "FAILED"]
    assert frame["toy_eval/mse"].notna().sum() == 2  # the eval results themselves are intact

    code, out, err = _cli("run", path)
    assert code == 1 and "Traceback" not in err
    assert f"FAILED {train.key}: {corrupt}: " in out  # the reason names the file
    code, _, err = _cli("run", path, "--quiet", "--retry-failed")
    assert code == 0, err
    assert json.loads(corrupt.read_text())  # written again


def test_a_corrupt_manifest_is_reported_and_rewritten(finished_sweep, tmp_path):
    path = _copy(finished_sweep, tmp_path)
    manifest = tmp_path / "study" / "sweeps" / "t.json"
    manifest.write_text("{\"cells\": [")
    code, _, err = _cli("run", path, "--quiet")
    assert code == 0 and f"warning: {manifest}: not valid JSON" in err
    assert json.loads(manifest.read_text())


def test_a_nan_result_fails_the_stage_with_the_reason(tmp_path):
    from study import ledger
    from study.sweep import load_plan
    path = _sweep(tmp_path)
    code, out, err = _cli("run", path, "--set", "base.data.noise=.inf")
    assert code == 1
    plan = load_plan(path, ["base.data.noise=.inf"])
    data = next(s for s in plan.stages.values() if s.kind == "toy_data")
    status = ledger.read_status(data.dir(plan.root))
    assert status["state"] == ledger.State.FAILED and ledger.read_result(data.dir(plan.root)) is None
    assert "result 'metrics.y_var' is nan" in status["errors"][-1]["error"]
    assert "result 'metrics.y_var' is nan" in out + err


def test_result_paths_cannot_leave_the_study_folder(tmp_path):
    from study import ledger
    stage = tmp_path / "study" / "stages" / "tokenizer" / "abc"
    stage.mkdir(parents=True)
    assert ledger.result_path(stage, "codes.pt") == (stage / "codes.pt").resolve()
    assert ledger.result_path(stage, "../../vfm/x/weights.pt") == (tmp_path / "study/stages/vfm/x/weights.pt").resolve()
    for bad in ("../../../../secret", "/etc/passwd"):
        with pytest.raises(ledger.LedgerError, match="points outside the study folder"):
            ledger.result_path(stage, bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_check_result_refuses_non_finite_numbers_anywhere(value):
    from study import ledger
    assert ledger.check_result({"a": 1.0, "tags": {"x": "y"}}) == {"a": 1.0, "tags": {"x": "y"}}
    with pytest.raises(ValueError, match=r"result 'curve\[1\]' is"):
        ledger.check_result({"a": 1.0, "curve": [0.5, value]})


# --------------------------------------------------------------------------- fuzzing the shipped sweeps
STRANGE = [None, "x", "", -1, 0, -5, 1.5, -0.5, 10 ** 12, float("nan"), float("inf"), True, [], {}, [1, "a"],
           {"k": 1}, "1e-3", "../../x", "{user}"]


def _paths(node, prefix=()):
    """Every (container path, key) in a parsed YAML tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _mutate(spec: dict, text: str, rng) -> tuple[str, str]:
    """(mutated YAML text, what was done) for one random mutation."""
    import copy

    import yaml
    spec = copy.deepcopy(spec)
    paths = [p for p in _paths(spec) if p[0] != "study_dir"]
    path = rng.choice(paths)
    parent, key = _get(spec, path[:-1]), path[-1]
    kind = rng.choice(["delete", "strange", "number", "typo", "unknown", "wrap", "duplicate", "syntax"])
    if kind == "delete":
        del parent[key]
    elif kind == "strange":
        parent[key] = rng.choice(STRANGE)
    elif kind == "number":
        old = parent[key]
        parent[key] = rng.choice([-5, -1, 0, 0.5, 2 ** 40, float("nan")]) if not isinstance(old, (int, float)) \
            else rng.choice([-old - 1, 0, old * 1000, -0.5, float("nan"), float("inf")])
    elif kind == "typo" and isinstance(parent, dict):
        i = rng.randrange(len(str(key)))
        parent[str(key)[:i] + str(key)[i + 1:] + "x"] = parent.pop(key)
    elif kind == "unknown" and isinstance(parent, dict):
        parent[f"{key}_extra"] = 1
    elif kind == "wrap":
        parent[key] = [parent[key]] if rng.random() < 0.5 or not isinstance(parent[key], list) else parent[key][0:1][0:0]
    elif kind in ("duplicate", "syntax"):
        lines = text.splitlines()
        candidates = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith(("#", "-"))]
        i = rng.choice(candidates)
        if kind == "duplicate":
            lines.insert(i + 1, lines[i])
        else:
            lines[i] = lines[i].replace(":", rng.choice([" :: ", ": [", ": {", ":\t"]), 1)
        return "\n".join(lines) + "\n", f"{kind} line {i + 1}: {lines[i].strip()!r}"
    return yaml.safe_dump(spec, sort_keys=False), f"{kind} {'.'.join(map(str, path))}"


def test_fuzzed_shipped_sweeps_dry_run_or_fail_in_one_line(tmp_path):
    import random
    from pathlib import Path

    from study.config import read_yaml
    repo = Path(__file__).resolve().parents[1]
    rng = random.Random(16)
    study = tmp_path / "study"
    sweeps = sorted((repo / "sweeps").glob("*.yaml"))
    codes = []
    for n in range(200):
        source = sweeps[n % len(sweeps)]
        text, what = _mutate(read_yaml(source), source.read_text(), rng)
        text += f"\nstudy_dir: {study}/{{name}}\n"  # the shipped sweeps leave it to the default
        path = tmp_path / f"{n:03d}-{source.name}"
        path.write_text(text)
        try:
            code, out, err = _cli("run", str(path), "--dry-run")
        except BaseException as exc:  # noqa: BLE001 - a traceback is the defect being hunted
            pytest.fail(f"{path.name} ({what}): {type(exc).__name__}: {exc}")
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 0:
            assert "Nothing was run" in out, (what, out[-300:])
        else:
            assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}"), (path.name, what, err)
        assert not study.exists(), (path.name, what)
        codes.append(code)
    assert 20 < codes.count(2) < 180  # the mutations exercise both outcomes
