"""Optuna search: a `search:` block turns the sweep into a study whose trials are cells.

The controller asks Optuna for a trial's parameters, turns them into a cell (base + sampled
params, validated like any cell) and schedules its stages exactly like a grid cell's: the same
Scheduler, backends, content-addressed cache (a stage two trials share runs once), ledger and
MLflow cell runs under the sweep run. When the cell's metric stages complete it tells Optuna
the values; every other ending is told too: a stage that failed, a metric the stage never
returned, parameters that could not be drawn or built into a cell are FAIL with their reason
(trial attr, `trials/<n>/trial.json` in the study folder, the run's error tag), and a pruned
stage is PRUNED. So no trial stays RUNNING once the controller has returned, and `wait` ends
with it. A trial still RUNNING when a controller starts was left by a killed one: it is taken
over and its stages followed or resumed, like a grid cell's. A preempted stage job is requeued
by submitit and resumes from its checkpoint inside the same trial.

Storage: JournalFileBackend with JournalFileOpenLock (O_EXCL: NFSv3+, no symlink races) at
`<study_dir>/optuna.journal`, or any RDB URL.  Trials link to MLflow runs by tags
(`optuna.trial_number` on the run, `mlflow_run_id` user attr on the trial), not by the
deprecated optuna-integration MLflowCallback.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import optuna

from study import ledger, schema, tracking
from study.backends import Backend, make_backend
from study.controller import (CellRuns, Scheduler, controller_lock, controller_running, end_sweep_run,
                              first_failure, open_sweep_run, record_failure, record_start)
from study.config import ConfigError
from study.ledger import State
from study.spec import CellDraft, SearchSpec, SweepSpec, set_path
from study.stages import Plan, build_plan, read_stage_result
from study.training import Callback

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUNNING = (optuna.trial.TrialState.RUNNING,)
RUN_ATTR = "mlflow_run_id"  # trial user attrs
PRUNED_ATTR = "pruned"
FAIL_ATTR = "fail_reason"


def storage_of(spec: SweepSpec):
    s = spec.search
    if s.storage:
        return s.storage
    path = spec.root / "optuna.journal"
    backend = optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


class GridSampler(optuna.samplers.BruteForceSampler):
    """Every point of the space once. The parent class calls `study.stop()` after the last point,
    which raises outside `study.optimize` (the sweep tells trials itself); the controller stops
    after n_trials instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def _sampler(s: SearchSpec):
    if s.sampler == "grid":
        return GridSampler()  # no seed: a grid's order does not matter
    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "nsga2": optuna.samplers.NSGAIISampler}[s.sampler](seed=s.seed)


def _pruner(s: SearchSpec):
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials)
    return {"none": optuna.pruners.NopPruner, "hyperband": optuna.pruners.HyperbandPruner}[s.pruner]()


def open_study(spec: SweepSpec) -> optuna.Study:
    s = spec.search
    return optuna.create_study(storage=storage_of(spec), study_name=s.study_name or spec.name,
                               directions=s.directions, sampler=_sampler(s), pruner=_pruner(s),
                               load_if_exists=True)


def _suggest(trial: optuna.Trial, key: str, p) -> object:
    if p.type == "categorical":
        return trial.suggest_categorical(key, p.choices)
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)


class PruningCallback(Callback):
    """Reports a training metric to the trial at each log step. When Optuna says prune, it marks
    the trial and raises TrialPruned; the controller tells PRUNED. Picklable: it travels to the
    stage's job, which opens the study itself."""

    def __init__(self, spec: SweepSpec, trial_id: int, metric: str):
        self.spec, self.trial_id, self.metric = spec, trial_id, metric

    @functools.cached_property
    def trial(self) -> optuna.Trial:
        return optuna.Trial(open_study(self.spec), self.trial_id)

    def __getstate__(self):  # the study connection stays in the process that opened it
        return {"spec": self.spec, "trial_id": self.trial_id, "metric": self.metric}

    def _report(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric in metrics:
            self.trial.report(metrics[self.metric], step)
            if self.trial.should_prune():
                reason = f"{self.metric}={metrics[self.metric]:.4g} at step {step}"
                self.trial.set_user_attr(PRUNED_ATTR, reason)
                raise optuna.TrialPruned(reason)

    def on_step(self, step, metrics):
        self._report(step, metrics)

    def on_eval(self, step, metrics):
        self._report(step, metrics)


@dataclass
class LiveTrial:
    """A trial in flight: its one-cell plan, scheduled like a grid cell."""
    number: int
    trial_id: int
    plan: Plan
    sched: Scheduler
    runs: Optional[CellRuns]
    told: bool = False


def trial_draft(spec: SweepSpec, params: dict) -> CellDraft:
    draft = CellDraft({}, copy.deepcopy(spec.base))
    for key in spec.seed_keys:
        set_path(draft.config, key, spec.seeds[0])
    for key, value in params.items():
        set_path(draft.config, key, value)
        draft.values[key] = value
    return draft


def trial_dir(root: Path, number: int) -> Path:
    return Path(root) / "trials" / str(number)


class Search:
    """The controller's trial loop: ask, schedule, follow, tell."""

    def __init__(self, plan: Plan, study: optuna.Study, backend: Backend, tracker: Optional[tracking.Tracker]):
        self.plan, self.spec, self.s = plan, plan.spec, plan.spec.search
        self.study, self.backend, self.tracker = study, backend, tracker
        self.live: list[LiveTrial] = []
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        running = study.get_trials(deepcopy=False, states=RUNNING)
        self.todo = max(0, self.s.n_trials - done - len(running))
        self.parallel = getattr(backend, "max_parallel", None) or self.s.n_trials
        for t in running:  # left by a killed controller: follow or resume its stages
            self._schedule(t.number, t._trial_id, t.params, t.user_attrs.get(RUN_ATTR))

    def loop(self, quiet: bool) -> None:
        shown = ""
        while True:
            self.live = [t for t in self.live if not self._poll(t)]
            if self.todo and len(self.live) < self.parallel:
                self.todo -= 1
                self._ask()
                continue
            if not self.live:
                return
            line = _progress(self.study)
            if not quiet and line.split("] ")[1] != shown:  # only changes, not one line a second
                print(line, flush=True)
                shown = line.split("] ")[1]
            self.backend.wait(self.spec.launcher.poll_s)

    def _ask(self) -> None:
        if self.s.seed is not None:
            # a fresh sampler per ask: a re-started controller must not replay the draws of the last one
            self.study.sampler = _sampler(dataclasses.replace(
                self.s, seed=self.s.seed + len(self.study.get_trials(deepcopy=False))))
        trial = self.study.ask()
        try:
            params = {key: _suggest(trial, key, p) for key, p in self.s.space.items()}
        except Exception as err:  # noqa: BLE001 -- any error of a draw fails this trial, not the sweep
            self._fail(trial.number, trial._trial_id, None, f"drawing its parameters: {type(err).__name__}: {err}",
                       traceback.format_exc())
            return
        self._schedule(trial.number, trial._trial_id, params, None)

    def _schedule(self, number: int, trial_id: int, params: dict, run_id: Optional[str]) -> None:
        try:
            if set(params) != set(self.s.space):
                raise ValueError(f"only {sorted(params)} of {sorted(self.s.space)} were drawn")
            plan = build_plan(self.spec, self.plan.source, drafts=[trial_draft(self.spec, params)])
        except Exception as err:  # noqa: BLE001 -- e.g. a ConfigError of the drawn values
            self._fail(number, trial_id, None, f"building its cell: {type(err).__name__}: {err}",
                       traceback.format_exc())
            return
        runs = None
        if self.tracker:
            runs = CellRuns(plan, self.tracker, {plan.cells[0].id: run_id} if run_id else {},
                            lambda cell_id, rid: self._attr(trial_id, RUN_ATTR, rid),
                            name=lambda cell: f"trial-{number}",
                            extra_tags={schema.TRIAL_NUMBER: str(number), schema.OPTUNA_STUDY: self.study.study_name})
        kind, _, metric = (self.s.prune_on or "").partition("/")
        callbacks = {kind: [PruningCallback(self.spec, trial_id, metric)]} if self.s.prune_on else {}
        sched = Scheduler(plan.stages, runs, self.backend, self.spec.plugins, self.tracker,
                          self.spec.launcher.retries, callbacks)
        self._attr(trial_id, schema.CELL_ID, plan.cells[0].id)
        live = LiveTrial(number, trial_id, plan, sched, runs)
        self.live.append(live)
        sched.start(sched.prepare(force=False, retry_failed=False))

    def _attr(self, trial_id: int, key: str, value: str) -> None:
        optuna.Trial(self.study, trial_id).set_user_attr(key, value)

    def _poll(self, t: LiveTrial) -> bool:
        """Advance the trial's stages; tell Optuna once the outcome is known. True when done."""
        t.sched.step()
        t.sched.check_jobs()
        if not t.told:
            self._judge(t, finished=not t.sched.pending())
        return t.told and not t.sched.pending()

    def _judge(self, t: LiveTrial, finished: bool) -> None:
        cell = t.plan.cells[0]
        failed = first_failure(t.plan.root, cell)
        if failed is not None:
            reason, trace, _ = failed
            return self._fail(t.number, t.trial_id, t, f"stage {reason}", trace)
        results = {}
        for name in self.s.metrics:
            kind, key = name.split("/", 1)
            st = cell.stages[kind]
            if ledger.read_status(st.dir(t.plan.root))["state"] != State.COMPLETED:
                return self._stopped(t) if finished else None
            result = read_stage_result(st.dir(t.plan.root))
            if key not in result.metrics:
                return self._fail(t.number, t.trial_id, t, f"stage '{kind}' returned no metric '{key}' "
                                  f"(it returned: {', '.join(result.metrics) or 'none'})", "")
            results[name] = result.metrics[key]
        self.study.tell(t.number, [results[m] for m in self.s.metrics])
        self._record(t.number, "COMPLETE", values=[results[m] for m in self.s.metrics])
        t.told = True

    def _stopped(self, t: LiveTrial) -> None:
        """Nothing runs any more and the metric stage never completed: pruned, or lost."""
        attrs = next(ft.user_attrs for ft in self.study.get_trials(deepcopy=False) if ft.number == t.number)
        if PRUNED_ATTR in attrs:
            self.study.tell(t.number, state=optuna.trial.TrialState.PRUNED)
            self._record(t.number, "PRUNED", reason=attrs[PRUNED_ATTR])
            if t.runs:
                tracking.end_runs(self.tracker, [t.runs.run_id(t.plan.cells[0])], "KILLED")
            t.told = True
        else:
            self._fail(t.number, t.trial_id, t, "its stages stopped before the metric stage completed", "")

    def _fail(self, number: int, trial_id: int, t: Optional[LiveTrial], reason: str, trace: str) -> None:
        """FAIL with its reason: on the trial, in the study folder and on the trial's MLflow run."""
        self._attr(trial_id, FAIL_ATTR, reason)
        self.study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        folder = self._record(number, "FAIL", reason=reason, traceback=trace)
        if self.tracker:
            run_id = t.runs.run_id(t.plan.cells[0]) if t and t.runs else tracking.start_run(
                self.tracker, f"trial-{number}", {schema.SWEEP: self.spec.name, schema.TRIAL_NUMBER: str(number),
                                                  schema.OPTUNA_STUDY: self.study.study_name}).run_id
            record_failure(self.tracker, run_id, reason, trace, folder)
        if t is not None:
            t.told = True

    def _record(self, number: int, state: str, **fields) -> Path:
        folder = trial_dir(self.plan.root, number)
        ledger.write_json(folder / "trial.json", {"number": number, "state": state, "time": time.time(), **fields})
        return folder


def _check_metrics(plan: Plan) -> None:
    s = plan.spec.search
    for i, name in enumerate([*s.metrics, *([s.prune_on] if s.prune_on else [])]):
        kind = name.split("/")[0]
        if "/" not in name or kind not in plan.spec.stages:
            key = "search.prune_on" if i >= len(s.metrics) else "search.metric"
            raise ConfigError(f"'{name}' must be '<stage kind>/<key>' with a kind of this sweep "
                              f"({', '.join(plan.spec.stages)})", source=plan.source, key=key)


def run(plan: Plan, overrides: list[str], *, command: str, quiet: bool = False) -> int:
    """`command`: the command line that started this run (the manifest records it when trials are asked)."""
    _check_metrics(plan)
    spec, s = plan.spec, plan.spec.search
    lock = controller_lock(plan)
    manifest = ledger.read_manifest(plan.root, spec.name)
    tracker = open_sweep_run(plan, manifest)
    manifest.update(name=spec.name, spec=str(Path(plan.source).resolve()), overrides=overrides, search=True)
    ledger.write_json(ledger.manifest_path(plan.root, spec.name), manifest)
    study = open_study(spec)
    backend = make_backend(spec.launcher, plan.root)
    search = Search(plan, study, backend, tracker)
    if not quiet:
        print(f"{spec.name}: search {s.sampler}, {len(study.get_trials(deepcopy=False, states=FINISHED))}/"
              f"{s.n_trials} trials finished, {len(search.live)} taken over, {search.todo} to ask ({backend.name})",
              flush=True)
    if search.todo:
        record_start(plan, manifest, command)
    try:
        search.loop(quiet)
    except KeyboardInterrupt:
        end_sweep_run(tracker, "KILLED")
        raise
    lock.close()
    code = report(plan, "status")
    end_sweep_run(tracker, "FINISHED" if code == 0 else "FAILED")
    return code


def _progress(study: optuna.Study) -> str:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return f"[{time.strftime('%H:%M:%S')}] trials " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def report(plan: Plan, command: str) -> int:
    """status / wait / collect for a search sweep."""
    spec = plan.spec
    study = open_study(spec)
    if command == "wait":
        while controller_running(plan):  # the controller tells every trial it started before it exits
            time.sleep(spec.launcher.poll_s)
    if command == "collect":
        print(study.trials_dataframe().to_csv(index=False))
        return 0
    print(_progress(study))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = study.best_trials if len(spec.search.metrics) > 1 else [study.best_trial]
        label = "pareto front" if len(best) > 1 or len(spec.search.metrics) > 1 else "best"
        for t in best:
            print(f"{label}: trial {t.number} values={t.values} params={t.params}")
    storage = spec.search.storage or str(spec.root / "optuna.journal")
    print(f"dashboard: optuna-dashboard {storage}   (pip install optuna-dashboard)")
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    return 0 if finished >= spec.search.n_trials else 1
