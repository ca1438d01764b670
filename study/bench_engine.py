"""The engine's own overhead: `python -m study.bench engine [--cells 1000] [--out FILE.json]`.

A sweep of trivial cells (one stage kind that returns a number) through the real CLI path
in-process: spec validation, expansion, stage ids, ledger, the debug backend, MLflow tracking
to a sqlite store (a sweep run, a run per cell, each stage's result logged), the live view
piped. Then the same sweep again, which must find everything done. What is timed is the
engine, not the work: the figure to compare with other launchers' per-job overhead.

With tracking, importing MLflow (`mlflow_import`, once per process) and creating the study's
store (`store_creation`, once per study folder: a copy of the cached empty store, or MLflow's
migrations the first time on a machine) are timed apart, before the run; and `store_floor`
adds what the MLflow store alone costs per run, in a loop without the engine: the least a run
per cell can cost (create + terminate; create + one log_batch + terminate) beside the calls a
trivial cell makes through study.tracking, written at once and held as the controller holds them.

The run creates a few files per stage; on a file system where creating files is slow (a
network study folder, a disk that churned) that, not the engine, sets the figure: compare with
TMPDIR on a tmpfs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from study.stages import StageContext, StageResult, register_stage


@dataclass
class Noop:
    index: int = 0


@dataclass
class NoopStage:
    noop: Noop = field(default_factory=Noop)


@register_stage("bench_noop", NoopStage)
def run_noop(ctx: StageContext) -> StageResult:
    return StageResult(metrics={"index": ctx.config.noop.index})


def _timed(fn: Callable[[], None]) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}


def _timed_run(path: Path) -> dict:
    from study.sweep import main
    def sweep() -> None:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main([str(path)])
        if code != 0:
            raise RuntimeError(f"the benchmark sweep exited {code}:\n{out.getvalue()[-2000:]}")
    return _timed(sweep)


def store_floor(runs: int = 200) -> dict:
    """Milliseconds per run (wall, CPU) of MLflow calls alone on a fresh sqlite store: `bare`
    create_run + set_terminated; `one_batch` the same with one log_batch (params, metrics, tags);
    `cell` the calls a trivial cell makes through study.tracking (run with params, the stage's
    start tags, its result and config artifact, the end); `cell_held` the same calls with the
    writes held and written together, as the controller does."""
    from mlflow.entities import Metric, Param, RunTag

    from study import schema, tracking
    with tempfile.TemporaryDirectory() as tmp:
        uri = tracking.default_uri(Path(tmp))
        sweep = tracking.start_sweep(uri, tracking.init_store(uri, "floor", Path(tmp) / "art"), "floor", {})
        client, exp = sweep.client, sweep.experiment_id
        (Path(tmp) / schema.STAGE_CONFIG).write_text("noop:\n  index: 0\n")
        result = StageResult(metrics={"index": 0})

        def bare() -> None:
            for i in range(runs):
                client.set_terminated(client.create_run(exp, run_name=f"bare-{i}").info.run_id, "FINISHED")

        def one_batch() -> None:
            for i in range(runs):
                run_id = client.create_run(exp, run_name=f"batch-{i}").info.run_id
                client.log_batch(run_id, metrics=[Metric("bench_noop/index", 0.0, 0, 0)],
                                 params=[Param("noop.index", "0")], tags=[RunTag("stage.bench_noop", "x")])
                client.set_terminated(run_id, "FINISHED")

        def cell(tracker: tracking.Tracker = sweep) -> None:
            for i in range(runs):
                run = tracking.start_run(tracker, f"cell-{i}", {schema.CELL_ID: str(i)}, params={"noop": {"index": i}})
                tracking.log_batch(tracker, [run.run_id], tags={schema.stage_tag("bench_noop"): "x",
                                                                schema.stage_job_tag("bench_noop"): "inline"})
                tracking.log_stage_result(tracker, [run.run_id], "bench_noop", Path(tmp), result,
                                          artifact_uris={run.run_id: run.artifact_uri})
                tracking.end_runs(tracker, [run.run_id], "FINISHED")

        def cell_held() -> None:
            held = tracking.Tracker(sweep.uri, exp, sweep.parent_run_id).hold_writes()
            cell(held)
            held.flush()

        bare()  # warm: the store's first writes and the client's imports are not the per-run cost
        report = {"runs": runs}
        for name, fn in (("bare", bare), ("one_batch", one_batch), ("cell", cell), ("cell_held", cell_held)):
            took = _timed(fn)
            report[name] = {"wall_ms": round(1000 * took["wall_s"] / runs, 2),
                            "cpu_ms": round(1000 * took["cpu_s"] / runs, 2)}
    return report


def engine_overhead(cells: int = 1000, tracking: bool = True) -> dict:
    """Seconds for `cells` trivial cells end to end, and for the re-run that finds them done."""
    import study.sweep  # noqa: F401 -- imports (torch, MLflow) are not the engine's per-cell cost
    from study import tracking as mlflow_tracking
    report: dict = {"cells": cells, "tracking": "sqlite MLflow" if tracking else "off"}
    with tempfile.TemporaryDirectory() as tmp:
        if tracking:
            root = Path(tmp) / "study"
            report["mlflow_import"] = _timed(lambda: importlib.import_module("mlflow.tracking"))
            report["store_creation"] = _timed(lambda: mlflow_tracking.init_store(
                mlflow_tracking.default_uri(root), "bench", root / "mlartifacts"))
        spec = {"name": "bench", "plugins": [__name__], "stages": ["bench_noop"], "study_dir": f"{tmp}/study",
                "axes": {"grid": {"noop.index": list(range(cells))}}, "seeds": [0], "seed_keys": [],
                "tracking": {"enabled": tracking}, "report": False, "launcher": {"backend": "debug", "poll_s": 0.01}}
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(spec))
        first, rerun = _timed_run(path), _timed_run(path)
    report.update(run=first, rerun=rerun, per_cell_ms=round(1000 * first["wall_s"] / cells, 2))
    if tracking:
        report["store_floor"] = store_floor(min(cells, 200))
    return report
