"""Optuna search: a `search:` block turns the sweep into a study whose trials are cells.

Pull workers: each job opens the shared study, asks ONE trial, builds that cell (base + sampled
params, validated like any cell), runs its stage chain through the same content-addressed cache
(a stage two trials share runs once), reports intermediate values from the training stage
(pruning) and tells the result.  No batch barrier: a free slot starts the next trial at once
(the Hydra sweeper's idle-GPU complaint).  `ask` is serialised by a file lock so that samplers
see every running trial: the exhaustive `grid` sampler then never hands a point out twice.

Storage: JournalFileBackend with JournalFileOpenLock (O_EXCL: NFSv3+, no symlink races) at
`<study_dir>/optuna.journal`, or any RDB URL.  Trials link to MLflow runs by tags
(`optuna.trial_number` on the run, `mlflow_run_id` user attr on the trial), not by the
deprecated optuna-integration MLflowCallback.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Optional

import optuna
import submitit

from study import ledger, schema, tracking
from study.backends import make_backend
from study.config import ConfigError
from study.controller import controller_lock, controller_running, open_cell_run, open_sweep_run
from study.spec import CellDraft, Resources, SearchSpec, SweepSpec, set_path
from study.stages import Plan, build_plan, load_providers
from study.training import Callback
from study.worker import StageRun, job_id, run_stage

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def storage_of(spec: SweepSpec):
    s = spec.search
    if s.storage:
        return s.storage
    path = spec.root / "optuna.journal"
    backend = optuna.storages.journal.JournalFileBackend(
        str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def _sampler(s: SearchSpec):
    if s.sampler == "grid":
        return optuna.samplers.BruteForceSampler()  # no seed: discouraged with several workers
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
    """Reports a training metric to the trial at each log step; raises TrialPruned when told."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric

    def _report(self, step: int, metrics: dict[str, float]) -> None:
        if self.metric in metrics:
            self.trial.report(metrics[self.metric], step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"{self.metric}={metrics[self.metric]:.4g} at step {step}")

    def on_step(self, step, metrics):
        self._report(step, metrics)

    def on_eval(self, step, metrics):
        self._report(step, metrics)


class TrialJob(submitit.helpers.Checkpointable):
    """One trial = one job.  The trial number lives on the job object, which submitit pickles when
    it checkpoints a preempted or timed-out job: the requeued job continues the same trial (same
    params, stages resumed from their checkpoints) instead of asking a new one and leaving the
    first RUNNING forever (a requeued Slurm job keeps its id, so it never looks stale)."""

    def __init__(self):
        self.trial_number: Optional[int] = None

    def _trial(self, study: optuna.Study, s: SearchSpec, root: Path) -> tuple[optuna.Trial, dict]:
        running = {t.number: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        if self.trial_number in running:  # requeued: suggest() returns the params already drawn
            trial = optuna.Trial(study, running[self.trial_number]._trial_id)
            return trial, {key: _suggest(trial, key, p) for key, p in s.space.items()}
        with ledger.file_lock(root / ".optuna-ask.lock"):
            if s.seed is not None:
                # every worker builds its own sampler: the same seed in each would draw the
                # same point in each, so the seed moves with the number of trials asked so far
                study.sampler = _sampler(dataclasses.replace(s, seed=s.seed + len(study.get_trials(deepcopy=False))))
            trial = study.ask()
            params = {key: _suggest(trial, key, p) for key, p in s.space.items()}
        self.trial_number = trial.number
        return trial, params

    def __call__(self, spec: SweepSpec, source: str, tracker: Optional[tracking.Tracker]) -> list[float]:
        load_providers(spec.stages, spec.plugins)
        s, root = spec.search, spec.root
        study = open_study(spec)
        trial, params = self._trial(study, s, root)
        trial.set_user_attr("job_id", job_id())
        trial.set_user_attr("host", ledger.here()["host"])
        trial.set_user_attr("pid", ledger.here()["pid"])
        try:
            draft = CellDraft({}, copy.deepcopy(spec.base))
            for key in spec.seed_keys:
                set_path(draft.config, key, spec.seeds[0])
            for key, value in params.items():
                set_path(draft.config, key, value)
                draft.values[key] = value
            plan = build_plan(spec, source, drafts=[draft])
        except ConfigError as err:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise RuntimeError(f"trial {trial.number}: {err}") from None
        cell = plan.cells[0]
        run_ids = []
        if tracker:  # a requeued trial keeps reporting to its run
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id is None:
                run_id = open_cell_run(plan, tracker, cell, f"trial-{trial.number}", {
                    schema.TRIAL_NUMBER: str(trial.number), schema.OPTUNA_STUDY: study.study_name})
                trial.set_user_attr("mlflow_run_id", run_id)
            run_ids = [run_id]
        trial.set_user_attr(schema.CELL_ID, cell.id)
        prune_kind, _, prune_metric = (s.prune_on or "").partition("/")
        results = {}
        try:
            stages = list(cell.stages.values())
            for st in stages:
                cbs = [PruningCallback(trial, prune_metric)] if st.kind == prune_kind else []
                item = StageRun(st, run_ids, run_ids if st is stages[-1] else [])
                results[st.kind] = run_stage(item, root, tracker, spec.launcher.retries, cbs, job_id())
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            if tracker:
                tracking.end_runs(tracker, run_ids, "KILLED")
            return []
        except Exception:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        values = [results[m.split("/")[0]].metrics[m.split("/", 1)[1]] for m in s.metrics]
        study.tell(trial, values)
        return values


def _check_metrics(plan: Plan) -> None:
    s = plan.spec.search
    for i, name in enumerate([*s.metrics, *([s.prune_on] if s.prune_on else [])]):
        kind = name.split("/")[0]
        if "/" not in name or kind not in plan.spec.stages:
            key = "search.prune_on" if i >= len(s.metrics) else "search.metric"
            raise ConfigError(f"'{name}' must be '<stage kind>/<key>' with a kind of this sweep "
                              f"({', '.join(plan.spec.stages)})", source=plan.source, key=key)


def _fail_stale(study: optuna.Study, backend) -> int:
    """RUNNING trials whose job is gone (killed controller, lost node) become FAIL, so that
    they are neither lost nor counted as running forever (the journal has no heartbeat)."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        status = {"job_id": t.user_attrs.get("job_id"), "pid": t.user_attrs.get("pid"), "host": t.user_attrs.get("host")}
        if status["job_id"] and not backend.alive(str(status["job_id"]), status):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            n += 1
    return n


def run(plan: Plan, overrides: list[str], detach: bool = False, quiet: bool = False) -> int:
    _check_metrics(plan)
    spec, s = plan.spec, plan.spec.search
    lock = controller_lock(plan)
    manifest = ledger.read_manifest(plan.root, spec.name)
    tracker = open_sweep_run(plan, manifest)
    manifest.update(name=spec.name, spec=str(Path(plan.source).resolve()), overrides=overrides, search=True)
    ledger.write_json(ledger.manifest_path(plan.root, spec.name), manifest)
    study = open_study(spec)
    backend = make_backend(spec.launcher, plan.root)
    _fail_stale(study, backend)
    res = _job_resources(plan)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    todo = max(0, s.n_trials - done - running)
    if not quiet:
        print(f"{spec.name}: search {s.sampler}, {done}/{s.n_trials} trials finished, {running} running, "
              f"{todo} to submit ({backend.name})", flush=True)
    args = (spec, plan.source, tracker)
    jobs = []
    if backend.streams:
        waiting, shown = todo, ""
        while waiting or any(not j.handle.done() for j in jobs):
            while waiting and backend.free(res):
                jobs += backend.submit(TrialJob(), [args], res, name=f"{spec.name}-trial")
                waiting -= 1
            time.sleep(min(1.0, spec.launcher.poll_s))
            line = _progress(study)
            if not quiet and line.split("] ")[1] != shown:  # only changes, not one line a second
                print(line, flush=True)
                shown = line.split("] ")[1]
    else:
        jobs = backend.submit(TrialJob(), [args] * todo, res, name=f"{spec.name}-trial") if todo else []
        if detach:
            lock.close()
            print(f"detached: {len(jobs)} trial jobs. follow with: python -m study.sweep wait {plan.source}")
            return 0
        while any(j.handle is not None and not j.handle.done() for j in jobs):
            time.sleep(spec.launcher.poll_s)
    lock.close()
    return report(plan, "status")


def _job_resources(plan: Plan) -> Resources:
    """A trial runs its whole chain in one job: the largest request of its stages."""
    rs = [plan.spec.resources_for(k) for k in plan.spec.stages]
    return Resources(gpus=max(r.gpus for r in rs), cpus=max(r.cpus for r in rs), mem_gb=max(r.mem_gb for r in rs),
                     timeout_min=sum(r.timeout_min for r in rs), partition=next((r.partition for r in rs if r.partition), None))


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
        while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) or \
                len(study.get_trials(deepcopy=False, states=FINISHED)) < spec.search.n_trials and controller_running(plan):
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
