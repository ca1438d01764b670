"""Robustness at the edges: concurrent writers, corrupt ledgers, untrusted files, malformed sweeps."""
import multiprocessing
import threading

import numpy as np

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
