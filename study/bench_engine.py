"""The engine's own overhead: `python -m study.bench engine [--cells 1000] [--out FILE.json]`.

A sweep of trivial cells (one stage kind that returns a number) through the real CLI path
in-process: spec validation, expansion, stage ids, ledger, the debug backend, MLflow tracking
to a sqlite store (a sweep run, a run per cell, each stage's result logged), the live view
piped. Then the same sweep again, which must find everything done. What is timed is the
engine, not the work: the figure to compare with other launchers' per-job overhead.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def _timed_run(path: Path) -> dict:
    from study.sweep import main
    wall, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main([str(path)])
    if code != 0:
        raise RuntimeError(f"the benchmark sweep exited {code}:\n{out.getvalue()[-2000:]}")
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}


def engine_overhead(cells: int = 1000, tracking: bool = True) -> dict:
    """Seconds for `cells` trivial cells end to end, and for the re-run that finds them done."""
    import study.sweep  # noqa: F401 -- imports (torch, MLflow) are not the engine's per-cell cost
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"name": "bench", "plugins": [__name__], "stages": ["bench_noop"], "study_dir": f"{tmp}/study",
                "axes": {"grid": {"noop.index": list(range(cells))}}, "seeds": [0], "seed_keys": [],
                "tracking": {"enabled": tracking}, "report": False, "launcher": {"backend": "debug", "poll_s": 0.01}}
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(spec))
        first, rerun = _timed_run(path), _timed_run(path)
    return {"cells": cells, "tracking": "sqlite MLflow" if tracking else "off", "run": first, "rerun": rerun,
            "per_cell_ms": round(1000 * first["wall_s"] / cells, 2)}
