"""The sweep CLI.

    python -m study.sweep SWEEP.yaml [--set key=value ...] [--dry-run [--list]] [--detach] [--force] [--retry-failed]
    python -m study.sweep status  SWEEP.yaml [--wide | --json]  # one table from the ledger (100 columns)
    python -m study.sweep wait    SWEEP.yaml [--set ...]     # reattach and follow until done
    python -m study.sweep collect SWEEP.yaml [--out results.csv]

`run` validates the whole spec (every cell, every stage config) before anything happens,
submits what is not cached, and follows with a status table; re-running it is always safe:
completed stages are skipped, live jobs are followed, lost jobs are resubmitted and resume.
Exit codes: 0 all cells completed, 1 some failed, 2 the spec is invalid, 3 another controller
holds the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from study import ledger, provenance, schema, tracking
from study.backends import check_resources, make_backend, scale_summary
from study.config import ConfigError, dump_yaml, user_error
from study.fsio import atomic_write_text
from study.controller import (ControllerBusy, Scheduler, cell_name, controller_lock, controller_running,
                              end_sweep_run, open_tracking, record_start, recorded_runs)
from study.dryrun import DrySummary, summarize
from study.ledger import ACTIVE, StageStates, State
from study.spec import SweepSpec, load_spec, search_probes
from study.stages import Cell, Plan, StageResult, build_plan, cell_id, get_kind, iter_cells, read_stage_result

COMMANDS = ("run", "status", "wait", "collect")


# --------------------------------------------------------------------------- loading
def load_checked_spec(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """The spec, its resources checked per backend and (a search) every value a trial can draw."""
    spec = load_spec(path, overrides)
    check_resources(spec, str(path))
    if spec.search:  # every value a trial can draw, typed like a cell
        build_plan(spec, str(path), drafts=search_probes(spec))
    return spec


def load_plan(path: str, overrides: list[str] | None = None) -> Plan:
    """Spec + expansion + per-cell stage validation: raises ConfigError, touches nothing."""
    return build_plan(load_checked_spec(path, overrides), str(path))


def _status(plan: Plan, key: str) -> dict:
    return ledger.read_status(plan.stages[key].dir(plan.root))


def cell_state(plan: Plan, cell: Cell, snap: Optional[dict[str, dict]] = None) -> State:
    states = [(snap[s.key] if snap else _status(plan, s.key))["state"] for s in cell.stages.values()]
    if all(s == State.COMPLETED for s in states):
        return State.COMPLETED
    if any(s == State.FAILED for s in states):
        return State.FAILED
    if any(s in ACTIVE for s in states):
        return State.RUNNING
    return State.PENDING


# --------------------------------------------------------------------------- manifest
def write_manifest(plan: Plan, manifest: dict, overrides: list[str]) -> None:
    """The ledger's manifest, and `sweep.yaml`: the resolved spec (overrides applied), which
    lets `python -m analysis.report STUDY_DIR` find the sweep from its folder alone."""
    resolved = dataclasses.replace(plan.spec, study_dir=str(plan.root.resolve()))
    dump_yaml(resolved, plan.root / "sweep.yaml")
    manifest.update(
        name=plan.spec.name, spec=str(Path(plan.source).resolve()), overrides=overrides,
        backend=plan.spec.launcher.backend, updated=time.time(),
        cells=[{"index": c.index, "id": c.id, "values": c.values, "run_id": manifest.get("run_ids", {}).get(c.id),
                "stages": {k: s.key for k, s in c.stages.items()}} for c in plan.cells])
    ledger.write_json(ledger.manifest_path(plan.root, plan.spec.name), manifest)


# --------------------------------------------------------------------------- dry run / table
def _fmt_s(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def _median_runtime(root: Path, kind: str) -> Optional[float]:
    kind_dir = root / "stages" / kind
    times = [ledger.read_status(d).get("runtime_s") for d in kind_dir.iterdir()] if kind_dir.exists() else []
    times = [t for t in times if t]
    return statistics.median(times) if times else None


def stage_states(plan: Plan) -> dict[str, State]:
    """Every stage's state (only the stages that have a folder are read)."""
    states = StageStates(plan.root, plan.spec.stages)
    return {key: states(st.kind, st.id) for key, st in plan.stages.items()}


def missing_inputs(plan: Plan, states: Optional[dict[str, State]] = None) -> list[str]:
    """Distinct 'input file absent' messages of the stages still to run."""
    states = states if states is not None else stage_states(plan)
    found: dict[str, None] = {}
    for key, st in plan.stages.items():
        check = get_kind(st.kind).missing
        if check is None or states[key] == State.COMPLETED:
            continue
        message = check(st.config)
        if message:
            found.setdefault(message)
    return list(found)


def dry_run(spec: SweepSpec, source: str, force: bool, retry_failed: bool, cells: bool = False) -> Iterator[str]:
    """The summary's lines (cells, distinct stages, resources, estimate), computed before the first
    line is returned (an invalid cell raises here); `cells`: also every cell with its stage ids and
    what a run would do with each, streamed."""
    states = StageStates(spec.root, spec.stages)
    summary = summarize(spec, source, states, force, retry_failed)
    head = [f"sweep '{spec.name}': {summary.cells} cells, {summary.stages} distinct stages "
            f"(study dir {spec.root}; backend {spec.launcher.backend})"]
    if summary.drafts != summary.cells:
        head.append(f"  ({summary.drafts - summary.cells} duplicate cells merged)")
    listed = _cell_lines(spec, source, states, force, retry_failed, merge=summary.drafts != summary.cells) \
        if cells else ["  (the cells, their stage ids and what a run does with each: add --list)"]
    return itertools.chain(head, listed, _summary_lines(spec, summary))


def _summary_lines(spec: SweepSpec, summary: DrySummary) -> Iterator[str]:
    yield "stage kind        total  to-run  gpus cpus mem_gb timeout  est/job   est GPU-h"
    gpu_h = cpu_h = 0.0
    for kind, count in summary.kinds.items():
        res = spec.resources_for(kind)
        median = _median_runtime(spec.root, kind)
        per_job_h = (median if median is not None else res.timeout_min * 60) / 3600
        gpu_h += count.to_run * res.gpus * res.nodes * per_job_h
        cpu_h += count.to_run * res.cpus * res.ranks * per_job_h
        est = f"{_fmt_s(median)} med" if median is not None else f"<={res.timeout_min}min"
        yield (f"  {kind:15s} {count.total:5d} {count.to_run:7d} {res.gpus:5d} {res.cpus:4d} {res.mem_gb:6g} "
               f"{res.timeout_min:6d}m  {est:>9s} {count.to_run * res.gpus * res.nodes * per_job_h:10.2f}")
    yield (f"estimate: {gpu_h:.2f} GPU-h, {cpu_h:.2f} CPU-h (median runtime of finished stages of a kind, "
           "else the timeout as an upper bound). Nothing was run.")
    yield from scale_summary(spec, summary.first)
    if summary.missing:
        yield f"missing input files ({len(summary.missing)}; a run would refuse to start):"
        yield from (f"  - {m}" for m in summary.missing)


def _cell_lines(spec: SweepSpec, source: str, states: StageStates, force: bool, retry_failed: bool,
                merge: bool) -> Iterator[str]:
    """A line pair per cell; `merge`: skip a cell whose stages an earlier one has (its ids are kept)."""
    marks = {State.COMPLETED: "cached", State.FAILED: "FAILED", State.PENDING: "run"}
    seen: set[str] = set()
    index = 0
    for draft, stages in iter_cells(spec, source):
        cid = cell_id(stages)
        if merge:
            if cid in seen:
                continue
            seen.add(cid)
        parts = []
        for kind, st in stages.items():
            state = states(kind, st.id)
            mark = "run" if force else marks.get(state, state.value.lower())
            if state == State.FAILED and retry_failed:
                mark = "retry"
            parts.append(f"{kind}:{st.id}[{mark}]")
        values = " ".join(f"{k}={v}" for k, v in draft.values.items())
        yield f"  cell {index:3d} {cid}  {values}\n      " + "  ".join(parts)
        index += 1


WIDTH = 100  # `status` and the live view fit a terminal of this many columns
MARKS = {"PENDING": ".", "SUBMITTED": "s", "RUNNING": "R", "PREEMPTED": "p", "COMPLETED": "C", "FAILED": "F",
         "BLOCKED": "b"}


def snapshot(plan: Plan, waiting: set[str] = frozenset()) -> dict[str, dict]:
    """Every stage's status, read once, with `label`: its state, or BLOCKED for a waiting stage
    behind a FAILED upstream."""
    snap = {key: _status(plan, key) for key in plan.stages}
    for key, s in snap.items():
        blocked = s["state"] == State.PENDING and key in waiting and any(
            snap[u]["state"] == State.FAILED for u in plan.stages[key].upstream)
        s["label"] = "BLOCKED" if blocked else s["state"].value
    return snap


def counts_line(plan: Plan, snap: dict[str, dict]) -> str:
    counts: dict[str, int] = {}
    for s in snap.values():
        counts[s["label"]] = counts.get(s["label"], 0) + 1
    head = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    return f"[{time.strftime('%H:%M:%S')}] {plan.spec.name}: {len(plan.cells)} cells; stages {head}"


def _runtime(s: dict, now: float) -> Optional[float]:
    return s.get("runtime_s") or (now - s["started"] if s["state"] == State.RUNNING and s.get("started") else None)


def progress_bar(key: str, s: dict, now: float, width: int = 20) -> str:
    """`toy_train/ab12 [#######.....]  12/40  0:05 eta 0:10 loss=0.31` from the step fields
    that the worker keeps in status.json (a stage without a training loop shows no bar)."""
    step, total = s.get("step"), s.get("total_steps")
    metric = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in (s.get("last_metric") or {}).items())
    if not (total and step is not None) or s["state"] != State.RUNNING:
        return f"{key} {s['label']} {_fmt_s(_runtime(s, now))} {metric}".rstrip()
    filled = int(width * min(step, total) / total)
    done_here = step - s.get("start_step", 0)
    elapsed = now - s.get("train_started", now)
    eta = elapsed * (total - step) / done_here if done_here > 0 else None
    return (f"{key} [{'#' * filled}{'.' * (width - filled)}] {step:>{len(str(total))}}/{total} "
            f"{_fmt_s(elapsed)} eta {_fmt_s(eta)} {metric}").rstrip()


def _clip(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 1] + "~"


def table(plan: Plan, waiting: set[str] = frozenset(), snap: Optional[dict[str, dict]] = None) -> str:
    """One row per cell in WIDTH columns: its stages as one mark each (legend in the header)
    and the stage that holds it up (running, failed or blocked)."""
    snap, now = snap or snapshot(plan, waiting), time.time()
    legend = " ".join(f"{m}={label.lower()}" for label, m in MARKS.items())
    lines = [counts_line(plan, snap), f"one mark per stage: {' > '.join(plan.spec.stages)}", f"marks: {legend}"]
    for cell in plan.cells:
        marks = "".join(MARKS[snap[st.key]["label"]] for st in cell.stages.values())
        front = next((st.key for st in cell.stages.values() if snap[st.key]["state"] != State.COMPLETED), None)
        detail = ""
        if front is not None:
            s = snap[front]
            detail = progress_bar(front, s, now, width=10) if s["state"] == State.RUNNING else f"{front} {s['label']}"
            if s["state"] == State.FAILED and s.get("errors"):
                detail += f": {s['errors'][-1]['error']}"
        lines.append(_clip(f"{cell.index:4d} {cell_name(cell)[:36]:36s} {marks} {detail}".rstrip()))
    return "\n".join(_clip(line) for line in lines)


def wide_table(plan: Plan, waiting: set[str] = frozenset()) -> str:
    """The long form: every stage of every cell with attempt, job, runtime and metrics."""
    snap, now = snapshot(plan, waiting), time.time()
    rows = []
    for cell in plan.cells:
        cols = []
        for kind, st in cell.stages.items():
            s = snap[st.key]
            metric = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in (s.get("last_metric") or {}).items())
            if s["state"] == State.COMPLETED:
                res = read_stage_result(st.dir(plan.root)) or StageResult()
                metric = " ".join(f"{k}={v:.4g}" for k, v in list(res.metrics.items())[:2])
            job = f"j{s['job_id']}" if s.get("job_id") and s["job_id"] != "inline" else ""
            cols.append(f"{kind}:{s['label']}#{s.get('attempt', 0)} {job} {_fmt_s(_runtime(s, now))} {metric}".strip())
        rows.append(f"{cell.index:3d} {cell_name(cell)[:40]:40s} | " + " | ".join(cols))
    return counts_line(plan, snap) + "\n" + "\n".join(rows)


def status_json(plan: Plan) -> list[dict]:
    """`status --json`: per cell, its values and every stage's ledger fields and metrics."""
    snap = snapshot(plan)
    keep = ("attempt", "job_id", "started", "ended", "runtime_s", "step", "total_steps", "last_metric")
    cells = []
    for cell in plan.cells:
        stages = {}
        for kind, st in cell.stages.items():
            s = snap[st.key]
            result = read_stage_result(st.dir(plan.root)) if s["state"] == State.COMPLETED else None
            stages[kind] = {"key": st.key, "state": s["label"], **{k: s[k] for k in keep if k in s},
                            "metrics": result.metrics if result else {},
                            "error": s["errors"][-1]["error"] if s["state"] == State.FAILED and s.get("errors") else None}
        cells.append({"index": cell.index, "id": cell.id, "name": cell_name(cell), "values": cell.values,
                      "state": cell_state(plan, cell).value, "stages": stages})
    return cells


class Follower:
    """The live view. On a terminal: the counts per state and a progress bar per running stage,
    redrawn in place. Piped to a log: a line per state change (a stage first seen PENDING is not
    news) and the counts after each batch of changes."""

    def __init__(self, plan: Plan, quiet: bool = False, tty: Optional[bool] = None):
        self.plan, self.quiet = plan, quiet
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.last: dict[str, str] = {}

    def show(self, waiting: set[str] = frozenset()) -> None:
        if self.quiet:
            return
        snap = snapshot(self.plan, waiting)
        print(self.frame(snap) if self.tty else self.changes(snap), end="", flush=True)

    def frame(self, snap: dict[str, dict], max_bars: int = 30) -> str:
        now = time.time()
        active = [k for k, s in snap.items() if s["state"] in ACTIVE]
        lines = [counts_line(self.plan, snap), *(progress_bar(k, snap[k], now) for k in active[:max_bars])]
        if len(active) > max_bars:
            lines.append(f"... and {len(active) - max_bars} more active stages")
        return "\x1b[H\x1b[J" + "\n".join(_clip(line) for line in lines) + "\n"

    def changes(self, snap: dict[str, dict]) -> str:
        stamp = time.strftime('%H:%M:%S')
        lines = [f"[{stamp}] {key} {s['label']}" for key, s in snap.items()
                 if s["label"] != self.last.get(key, State.PENDING.value)]
        self.last = {key: s["label"] for key, s in snap.items()}
        if lines:
            lines.append(counts_line(self.plan, snap))
        return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------- commands
def run(plan: Plan, overrides: list[str], *, command: str, force=False, retry_failed=False, detach=False,
        quiet=False) -> int:
    """`command`: the command line that started this run, recorded in the manifest when it starts work."""
    spec = plan.spec
    if detach and (spec.launcher.backend == "local" or spec.search):  # both need a live controller
        return _detach_local(plan, overrides, force, retry_failed)
    if spec.search:
        from study import search
        return search.run(plan, overrides, command=command, quiet=quiet)
    missing = missing_inputs(plan)
    if missing:
        print("error: missing input files, nothing was started:\n" + "\n".join(f"  - {m}" for m in missing),
              file=sys.stderr)
        return 2
    lock = controller_lock(plan)
    manifest = ledger.read_manifest(plan.root, spec.name)
    # a finished sweep whose cell runs exist needs no tracking store (opening one costs seconds)
    finished = not (force or retry_failed) and _all_completed(plan) and _tracked(plan, manifest)
    tracker, runs = (None, None) if finished else open_tracking(plan, manifest, fresh=force)
    write_manifest(plan, manifest, overrides)
    if finished:
        if not quiet:
            print(f"{spec.name}: {len(plan.cells)} cells, {len(plan.stages)} stages, all completed: 0 to submit",
                  flush=True)
        lock.close()
        code = summary(plan, quiet)
        if spec.report and spec.tracking.enabled:
            write_report(plan)
        return code
    backend = make_backend(spec.launcher, plan.root)
    sched = Scheduler(plan.stages, runs, backend, spec.plugins, tracker, spec.launcher.retries)
    todo = sched.prepare(force, retry_failed)
    blocked = _blocked(plan, todo)
    if not quiet:
        print(f"{spec.name}: {len(plan.cells)} cells, {len(plan.stages)} stages, "
              f"{len(plan.stages) - len(todo)} cached or running, {len(todo) - len(blocked)} to submit, "
              f"{len(blocked)} blocked by failed stages ({backend.name})", flush=True)
    if len(todo) > len(blocked):
        record_start(plan, manifest, command)
    try:
        sched.start(todo)
        if detach:
            if tracker:
                tracker.flush()
            print(f"detached. follow with: python -m study.sweep wait {plan.source}")
            lock.close()
            return 0
        code = follow(plan, sched, quiet)
    except BaseException:  # Ctrl-C, or a crash: the sweep run says so, and what is held is written
        end_sweep_run(tracker, "KILLED")
        raise
    if runs:
        runs.close()
    end_sweep_run(tracker, "FINISHED" if code == 0 else "FAILED")
    lock.close()
    if spec.report and spec.tracking.enabled:
        write_report(plan)
    return code


def _all_completed(plan: Plan) -> bool:
    return all(_status(plan, key)["state"] == State.COMPLETED and read_stage_result(st.dir(plan.root))
               for key, st in plan.stages.items())


def _tracked(plan: Plan, manifest: dict) -> bool:
    """Tracking is off, or the manifest already holds this store's run for every cell."""
    if not plan.spec.tracking.enabled:
        return True
    uri = plan.spec.tracking.uri or tracking.default_uri(plan.root)
    run_ids = recorded_runs(plan, manifest)
    return manifest.get("tracking", {}).get("uri") == uri and all(run_ids.get(c.id) for c in plan.cells)


def results_digest(plan: Plan) -> str:
    """What the report reads from the ledger: each cell's stages, their states and results. The
    report is rebuilt only when this changes."""
    digest = hashlib.sha256()
    for cell in plan.cells:
        digest.update(f"{cell.id}:{cell.values}\n".encode())
    for key, st in plan.stages.items():
        result = st.dir(plan.root) / "result.json"
        digest.update(f"{key}:{_status(plan, key)['state'].value}:".encode())
        digest.update(result.read_bytes() if result.is_file() else b"-")
    return digest.hexdigest()


def write_report(plan: Plan) -> None:
    """The sweep's report (with a screenshot of the MLflow comparison page), in subprocesses:
    analysis reads MLflow, the engine does not import it, and a failing report never fails the
    sweep. A screenshot that cannot be taken (no Chromium, a remote store) is named in the report
    and in the last lines printed here."""
    out = plan.root / schema.REPORT_DIR
    digest, digest_file = results_digest(plan), out / "results.sha256"
    if (out / "report.html").is_file() and digest_file.is_file() and digest_file.read_text() == digest:
        print(f"report (no result changed): {(out / 'report.html').resolve()}", flush=True)
        return
    shot = [sys.executable, "-m", "analysis.mlflow_ui", str(plan.root), "--out", str(out / schema.MLFLOW_SCREENSHOT)]
    steps = [[sys.executable, "-m", "analysis.report", str(plan.root), "--out", str(out)]]
    if plan.spec.tracking.uri is None:
        steps.insert(0, shot)
    else:
        print(f"MLflow UI screenshot skipped: the sweep tracks to {plan.spec.tracking.uri} "
              f"(take it by hand: python -m analysis.mlflow_ui ...)", flush=True)
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip()[-2000:]
            print(tail if cmd is shot else f"{' '.join(cmd[1:3])} failed:\n{tail}", flush=True)
    if (out / "report.html").is_file():
        atomic_write_text(digest_file, digest)
        print(f"report: {(out / 'report.html').resolve()}", flush=True)


def _blocked(plan: Plan, todo: list[str]) -> set[str]:
    """Stages waiting on a FAILED upstream that is not being retried (directly or transitively)."""
    blocked: set[str] = set()
    for key in todo:  # dependency order
        for up in plan.stages[key].upstream:
            if up in blocked or (up not in todo and _status(plan, up)["state"] == State.FAILED):
                blocked.add(key)
    return blocked


def follow(plan: Plan, sched: Scheduler, quiet: bool = False, controller_elsewhere: bool = False) -> int:
    """Poll the ledger until nothing can change. `controller_elsewhere`: a reattached `wait`,
    which also waits while a (detached) controller still holds the sweep."""
    view = Follower(plan, quiet)
    while True:
        sched.step()
        sched.check_jobs()
        view.show(set(sched.progress.waiting))
        if not sched.pending() and not (controller_elsewhere and controller_running(plan)):
            break
        sched.backend.wait(plan.spec.launcher.poll_s)
    return summary(plan, quiet)


def summary(plan: Plan, quiet: bool = False) -> int:
    snap = snapshot(plan)
    states = [cell_state(plan, c, snap) for c in plan.cells]
    done = sum(s == State.COMPLETED for s in states)
    failed = [c for c, s in zip(plan.cells, states) if s != State.COMPLETED]
    if not quiet:
        print(table(plan, snap=snap))
        print(f"{done}/{len(plan.cells)} cells completed, {len(failed)} not completed")
        for key, s in snap.items():
            if s["state"] == State.FAILED and s.get("errors"):
                print(f"  FAILED {key}: {s['errors'][-1]['error']}  ({plan.stages[key].dir(plan.root)}/status.json)")
        if failed:
            print(f"re-run with --retry-failed to retry failed stages: python -m study.sweep {plan.source} --retry-failed")
    return 0 if not failed else 1


def _detach_local(plan: Plan, overrides: list[str], force: bool, retry_failed: bool) -> int:
    """The local pool needs a live controller: start one in the background, in its own session."""
    log = plan.root / "sweeps" / f"{plan.spec.name}.controller.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "study.sweep", "run", plan.source, "--quiet"]
    cmd += [a for o in overrides for a in ("--set", o)]
    cmd += ["--force"] * force + ["--retry-failed"] * retry_failed
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"detached: controller pid {proc.pid}, log {log}\nfollow with: python -m study.sweep wait {plan.source}")
    return 0


def collect(plan: Plan):
    """One row per cell: axis values, stage states and ids, every stage metric (kind/key)."""
    import pandas as pd
    rows = []
    for cell in plan.cells:
        row = {"cell": cell.index, schema.CELL_ID: cell.id, "state": cell_state(plan, cell).value, **cell.values}
        for kind, st in cell.stages.items():
            row[f"{kind}.id"] = st.id
            result = read_stage_result(st.dir(plan.root)) or StageResult()
            row.update({schema.metric(kind, k): v for k, v in result.metrics.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    # a column with gaps (an axis that only some cells set) would turn 64 into 64.0
    for column in df.columns:
        values = [r[column] for r in rows if r.get(column) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            df[column] = df[column].astype("Int64")
    return df


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_line = provenance.sweep_command(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    parser = argparse.ArgumentParser(prog=f"python -m study.sweep {command}")
    parser.add_argument("spec", help="sweep YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    if command == "run":
        parser.add_argument("--dry-run", action="store_true", help="print the stages, resources and estimate")
        parser.add_argument("--list", action="store_true", help="with --dry-run: every cell, its stage ids, cached?")
        parser.add_argument("--detach", action="store_true", help="submit and return at once")
        parser.add_argument("--force", action="store_true", help="recompute every stage of the sweep")
        parser.add_argument("--retry-failed", action="store_true", help="resubmit FAILED stages")
        parser.add_argument("--quiet", action="store_true", help="no table (background controllers)")
    if command == "status":
        parser.add_argument("--wide", action="store_true", help="every stage of every cell, unclipped")
        parser.add_argument("--json", action="store_true", help="the status as JSON (one object per cell)")
    if command == "collect":
        parser.add_argument("--out", help="write .csv or .json here instead of printing")
    args = parser.parse_args(argv)
    try:
        if command == "run" and args.dry_run:
            lines = dry_run(load_checked_spec(args.spec, args.overrides), args.spec, args.force, args.retry_failed,
                            cells=args.list)
        else:
            plan = load_plan(args.spec, args.overrides)
    except ConfigError as err:
        return user_error(err)
    if command == "run" and args.dry_run:
        for line in lines:
            print(line)
        return 0
    if command == "run":
        try:
            return run(plan, args.overrides, command=command_line, force=args.force, retry_failed=args.retry_failed,
                       detach=args.detach, quiet=args.quiet)
        except ControllerBusy as err:
            return user_error(err, status=3)
    if plan.spec.search:
        from study import search
        return search.report(plan, command)
    if command == "status":
        if args.json:
            print(json.dumps(status_json(plan), indent=1, default=str))
        else:
            print(wide_table(plan) if args.wide else table(plan))
        return 0 if all(cell_state(plan, c) == State.COMPLETED for c in plan.cells) else 1
    if command == "wait":
        sched = Scheduler(plan.stages, None, make_backend(plan.spec.launcher, plan.root), plan.spec.plugins, None, 0)
        return follow(plan, sched, controller_elsewhere=True)
    df = collect(plan)
    if args.out:
        df.to_json(args.out, orient="records", indent=1) if args.out.endswith(".json") else df.to_csv(args.out, index=False)
        print(f"{len(df)} rows -> {args.out}")
    else:
        print(df.to_csv(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
