"""The sweep spec: one YAML file describing a study, loaded through `study.config`.

    name: backbones
    stages: [reference, vfm, tokenizer, tok_eval]    # stage kinds (study.schema.CHAIN, or a plugin's)
    base: {data: {...}, vfm: {...}, tokenizer: {...}}   # free-form here; each stage kind types its sections
    axes:
      grid: {vfm.name: [dinov2_vits14_reg, siglip2_vitb16_256]}   # Cartesian product
      zip:  {tokenizer.optim.lr: [1e-4, 3e-4], tokenizer.train.batch_size: [64, 128]}   # paired, equal lengths
      lists: [{tokenizer.model.codebook_size: 4096}, {tokenizer.model.codebook_size: 16384, tokenizer.model.code_dim: 12}]
    seeds: [0, 1]                                    # written to every path in seed_keys
    seed_keys: [tokenizer.train.seed]
    include: [{vfm.name: dinov2_vits14_reg}]         # keep cells matching any of these
    exclude: [{vfm.name: siglip2_vitb16_256, tokenizer.train.seed: 1}]   # drop cells matching any of these
    resources: {tokenizer: {gpus: 1, timeout_min: 240}}
    launcher: {backend: slurm, retries: 1, submitit: {slurm_qos: high}}
    tracking: {uri: null, experiment: null}          # null: sqlite file in the study folder
    search: {...}                                    # Optuna instead of axes (study.search)

This module only knows the shape of the file and how axes expand into cells (plain nested
dicts).  What the sections *mean* is decided by the stage kinds (study.stages), which
validate every cell with their own dataclasses.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import itertools
import pkgutil
import re
import string
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional, Union

from study.config import ConfigError, bounded, load, nonsemantic

Backend = Literal["debug", "local", "slurm"]


@dataclass
class Resources:
    """What one job of a stage asks for; `timeout_min` also bounds the dry-run GPU-hour estimate.

    A job runs `ranks` = nodes x tasks_per_node processes (one torch.distributed rank each);
    `gpus` and `cpus` are per node and per task. tasks_per_node defaults to one per GPU, or 1."""
    gpus: int = bounded(0, ge=0)
    nodes: int = bounded(1, ge=1)
    tasks_per_node: Optional[int] = bounded(None, ge=1)
    cpus: int = bounded(1, ge=1)
    mem_gb: float = bounded(4.0, gt=0)
    timeout_min: int = bounded(60, ge=1)
    partition: Optional[str] = None

    @property
    def tasks(self) -> int:
        """Processes per node."""
        return self.tasks_per_node or max(1, self.gpus)

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks


@dataclass
class LauncherSpec:
    backend: Backend = "local"
    # local pool: GPU ids to hand out one job per GPU (None: all visible GPUs), and a cap on
    # concurrent jobs (None: one per GPU, or one per CPU core when no GPU is used)
    gpus: Optional[list[int]] = bounded(None, ge=0)
    max_parallel: Optional[int] = bounded(None, ge=1)
    # slurm: chunk arrays to this size (None: the site's MaxArraySize from `scontrol show config`)
    max_array_size: Optional[int] = bounded(None, ge=1)
    array_parallelism: int = bounded(256, ge=1)
    retries: int = bounded(0, ge=0)  # app-level retries inside a job (a Python exception), error kept in status.json
    submitit: dict[str, Any] = field(default_factory=dict)  # extra AutoExecutor params, e.g. slurm_qos
    poll_s: float = bounded(2.0, gt=0)


# MLflow tracking URI schemes (a scheme may carry a driver: postgresql+psycopg2://...)
TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


@dataclass
class TrackingSpec:
    enabled: bool = True
    uri: Optional[str] = None  # None: sqlite:///<study_dir>/mlflow.db; http://host:port for a server
    experiment: Optional[str] = None  # None: the sweep name

    def __post_init__(self):
        if self.uri is None:
            return
        scheme = urllib.parse.urlsplit(self.uri).scheme.split("+")[0]
        if not self.uri.strip() or (scheme and scheme not in TRACKING_SCHEMES):
            raise ConfigError(f"{self.uri!r} is not an MLflow tracking URI (use null for the study's sqlite "
                              f"file, a path, or {', '.join(s + '://' for s in TRACKING_SCHEMES)})", key="uri")
        if scheme == "sqlite" and not self.uri.startswith("sqlite:///"):
            raise ConfigError(f"{self.uri!r}: a sqlite URI is sqlite:///relative/path or sqlite:////absolute/path",
                              key="uri")


@dataclass
class ParamSpec:
    """One Optuna search dimension; `key` paths index the cell config like axes do."""
    type: Literal["float", "int", "categorical"]
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = bounded(None, gt=0)
    choices: Optional[list[Any]] = None

    def __post_init__(self):
        if self.type == "categorical":
            self._check_choices()
        elif self.low is None or self.high is None:
            raise ConfigError(f"{self.type} needs 'low' and 'high'", key="low")
        elif self.low > self.high:
            raise ConfigError(f"low={self.low} is above high={self.high}", key="low")
        elif self.log and self.low <= 0:
            raise ConfigError(f"a log scale needs low > 0, got {self.low}", key="low")
        elif self.log and self.step is not None and not (self.type == "int" and self.step == 1):
            raise ConfigError("a log scale takes no 'step' (Optuna samples it continuously)", key="step")
        elif self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and not float(value).is_integer():
                    raise ConfigError(f"an int dimension needs an integer, got {value}", key=name)

    def _check_choices(self) -> None:
        if not self.choices:
            raise ConfigError("categorical needs a non-empty 'choices' list", key="choices")
        for i, choice in enumerate(self.choices):
            # what Optuna can store; a list or mapping would only fail inside the first trial
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ConfigError(f"{choice!r} is a {type(choice).__name__}; choices must be numbers, strings, "
                                  "booleans or null", key=f"choices[{i}]")


@dataclass
class SearchSpec:
    n_trials: int = bounded(ge=1)
    metric: Union[str, list[str]]  # "<stage kind>/<result key>", a list for multi-objective
    direction: Union[Literal["minimize", "maximize"], list[Literal["minimize", "maximize"]]] = "minimize"
    space: dict[str, ParamSpec] = field(default_factory=dict)
    sampler: Literal["tpe", "random", "grid", "nsga2"] = "tpe"  # grid = exhaustive (BruteForceSampler)
    pruner: Literal["none", "median", "hyperband"] = "none"
    prune_on: Optional[str] = None  # "<stage kind>/<training metric>" reported at each log step
    startup_trials: int = bounded(5, ge=0)  # median pruner: prune nothing until this many trials finished
    storage: Optional[str] = None  # None: JournalFileBackend at <study_dir>/optuna.journal; or an RDB URL
    study_name: Optional[str] = None  # None: the sweep name
    seed: Optional[int] = None

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def directions(self) -> list[str]:
        d = self.direction
        return [d] * len(self.metrics) if isinstance(d, str) else list(d)

    def __post_init__(self):
        if not self.space:
            raise ConfigError("declare at least one dimension (key.path: {type: float, low: .., high: ..})",
                              key="space")
        if not isinstance(self.direction, str) and len(self.direction) != len(self.metrics):
            raise ConfigError(f"{len(self.direction)} directions for {len(self.metrics)} metrics", key="direction")
        if self.pruner != "none" and len(self.metrics) > 1:
            raise ConfigError("Optuna cannot prune multi-objective studies (set pruner: none)", key="pruner")
        if self.pruner != "none" and not self.prune_on:
            raise ConfigError("a pruner needs 'prune_on: <stage kind>/<metric>'", key="prune_on")
        if self.sampler == "grid":
            for key, p in self.space.items():
                if p.type == "float" and p.step is None:
                    raise ConfigError("the grid sampler needs a 'step' for floats", key=f"space.{key}.step")


@dataclass
class Axes:
    grid: dict[str, list[Any]] = field(default_factory=dict)
    # one zip group as a mapping, or several groups as a list of mappings
    zip: Union[dict[str, list[Any]], list[dict[str, list[Any]]]] = field(default_factory=dict)
    lists: list[dict[str, Any]] = field(default_factory=list)

    @property
    def zip_groups(self) -> list[dict[str, list[Any]]]:
        return [self.zip] if isinstance(self.zip, dict) else list(self.zip)

    def __post_init__(self):
        for i, group in enumerate(self.zip_groups):
            lengths = {k: len(v) for k, v in group.items()}
            if len(set(lengths.values())) > 1:
                where = "zip" if isinstance(self.zip, dict) else f"zip[{i}]"
                detail = ", ".join(f"{k}: {n}" for k, n in lengths.items())
                raise ConfigError(f"zipped lists must have equal lengths ({detail})", key=where)
        for key, values in self.grid.items():
            if not values:
                raise ConfigError("empty list: the sweep would have no cells", key=f"grid.{key}")


@dataclass
class SweepSpec:
    name: str
    stages: list[str]
    base: dict[str, Any] = field(default_factory=dict)
    axes: Axes = field(default_factory=Axes)
    seeds: list[int] = bounded(ge=0, default_factory=lambda: [0])
    seed_keys: list[str] = field(default_factory=lambda: ["seed"])
    include: list[dict[str, Any]] = field(default_factory=list)
    exclude: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, Resources] = field(default_factory=dict)
    launcher: LauncherSpec = field(default_factory=LauncherSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    search: Optional[SearchSpec] = None
    plugins: list[str] = field(default_factory=list)  # extra modules registering stage kinds (the chain is built in)
    report: bool = nonsemantic(True)  # write <study_dir>/report (python -m analysis.report) when a run ends
    study_dir: str = nonsemantic("studies/{name}")  # stage cache + ledger + mlflow db; {name} is filled in

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            # the name becomes file names inside the study folder (manifest, lock, experiment)
            raise ConfigError(f"{self.name!r} must be a plain name (letters, digits, '_', '-', '.'; "
                              "no '/', no leading '.')", key="name")
        _check_study_dir(self.study_dir)
        for i, module in enumerate(self.plugins):
            _check_plugin(module, f"plugins[{i}]")
        if not self.stages:
            raise ConfigError("list at least one stage kind", key="stages")
        if not self.seeds:
            raise ConfigError("list at least one seed", key="seeds")
        if self.search and (self.axes.grid or self.axes.zip_groups != [{}] or self.axes.lists):
            raise ConfigError("use either axes or search, not both", key="search")
        if self.search:
            self._check_search_metrics(self.search)

    def _check_search_metrics(self, s: SearchSpec) -> None:
        names = [(f"search.metric[{i}]" if isinstance(s.metric, list) else "search.metric", m)
                 for i, m in enumerate(s.metrics)]
        for key, name in names + ([("search.prune_on", s.prune_on)] if s.prune_on else []):
            kind, _, metric = name.partition("/")
            if kind not in self.stages or not metric:
                raise ConfigError(f"'{name}' must be '<stage kind>/<key>' with a kind of this sweep "
                                  f"({', '.join(self.stages)})", key=key)

    @property
    def root(self) -> Path:
        return Path(self.study_dir.format(name=self.name))

    def resources_for(self, kind: str) -> Resources:
        return self.resources.get(kind, Resources())


def _check_study_dir(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ConfigError(f"{template!r}: {err} (write a literal brace as '{{{{' or '}}}}')", key="study_dir") from None
    unknown = [f for f in fields if f != "name"]
    if unknown:
        raise ConfigError(f"{template!r}: unknown placeholder {{{unknown[0]}}} (only {{name}} is filled in)",
                          key="study_dir")


def _check_plugin(module: str, key: str) -> None:
    """The module exists (found without importing it); else a did-you-mean among its siblings."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # the parent package is missing, or an empty name
        found = False
    if found:
        return
    parent, _, _ = module.rpartition(".")
    siblings = []
    try:
        spec = importlib.util.find_spec(parent) if parent else None
        if spec and spec.submodule_search_locations:
            siblings = [f"{parent}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    except (ImportError, ValueError):
        pass
    hint = difflib.get_close_matches(module, siblings, n=1)
    fix = f"did you mean '{hint[0]}'?" if hint else "a module path importable from here, e.g. study.pipeline"
    raise ConfigError(f"no module named '{module}' ({fix})", key=key)


def axis_keys(spec: SweepSpec) -> dict[str, str]:
    """Key path set per cell -> where the spec sets it (axes, seed keys, search space)."""
    out = {k: f"axes.grid.{k}" for k in spec.axes.grid}
    for i, group in enumerate(spec.axes.zip_groups):
        out.update({k: (f"axes.zip[{i}].{k}" if isinstance(spec.axes.zip, list) else f"axes.zip.{k}")
                    for k in group})
    for i, item in enumerate(spec.axes.lists):
        out.update({k: f"axes.lists[{i}].{k}" for k in item})
    for i, k in enumerate(spec.seed_keys):
        out[k] = f"seed_keys[{i}]"
    if spec.search:
        out.update({k: f"search.space.{k}" for k in spec.search.space})
    return out


def _check_overrides(spec: SweepSpec, overrides: list[str], source: str) -> None:
    """`--set base.K=v` where K is also an axis would be overwritten in every cell."""
    axes = axis_keys(spec)
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not key.startswith("base."):
            continue
        path = key.removeprefix("base.")
        where = next((w for k, w in axes.items() if path == k or path.startswith(k + ".")), None)
        if where:
            raise ConfigError(f"'{key}' is also set per cell by {where}, which would override it "
                              f"(change {where} instead)", source=source, key="--set")


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Read and type-check the spec file (no side effects); errors are one-line ConfigErrors."""
    spec = load(SweepSpec, path, overrides)
    _check_overrides(spec, overrides or [], str(path))
    return spec


# --------------------------------------------------------------------------- dotted key paths
def get_path(data: dict, key: str, default: Any = KeyError) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is KeyError:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


# --------------------------------------------------------------------------- expansion
@dataclass(slots=True)
class CellDraft:
    """One point of the sweep before stages are attached: its values and its merged config.
    A grid point holds only its values and the spec's (shared) base, and builds its config when
    asked: a sweep of a million cells does not keep a million configs."""
    values: dict[str, Any]  # key path -> value chosen by axes/seed (what tells cells apart)
    own_config: Optional[dict[str, Any]] = None  # a config written by hand (search trials, probes)
    base: Optional[dict[str, Any]] = None  # grid points: config = base with `values` set

    @property
    def derived(self) -> bool:
        """The config is base + values, so the values decide every section of it."""
        return self.own_config is None

    @property
    def config(self) -> dict[str, Any]:
        if self.own_config is not None:
            return self.own_config
        config = copy.deepcopy(self.base)
        for key, value in self.values.items():
            set_path(config, key, value)
        return config


_MISSING = object()


def _matches(draft: CellDraft, cond: dict[str, Any]) -> bool:
    values = draft.values
    for key, want in cond.items():
        if key in values:
            have = values[key]
        elif any(key.startswith(k + ".") for k in values):  # inside a value that is a mapping
            have = get_path(draft.config, key, _MISSING)
        else:
            have = get_path(draft.base if draft.derived else draft.config, key, _MISSING)
        if have != want:
            return False
    return True


@dataclass(frozen=True)
class Factor:
    """One independent dimension of the expansion (a grid key, a zip group, the lists, the seeds):
    a cell takes one point of each, and its values are the points' keys in factor order."""
    points: list[dict[str, Any]]

    @property
    def sections(self) -> set[str]:
        """The top-level config sections some point sets a key in."""
        return {key.partition(".")[0] for point in self.points for key in point}


def factors(spec: SweepSpec) -> list[Factor]:
    """The spec's axes as independent factors: the cells before include / exclude are their product."""
    axes = spec.axes
    out = [Factor([{key: value} for value in values]) for key, values in axes.grid.items()]
    out += [Factor([{k: group[k][i] for k in group} for i in range(len(next(iter(group.values()))))])
            for group in axes.zip_groups if group]
    out.append(Factor(axes.lists or [{}]))
    out.append(Factor([{key: seed for key in spec.seed_keys} for seed in spec.seeds]))
    return out


def draft_of(spec: SweepSpec, points: Iterable[dict[str, Any]]) -> CellDraft:
    """The grid point taking these factor points (in factor order: a later key overrides)."""
    values: dict[str, Any] = {}
    for point in points:
        values.update(point)
    return CellDraft(values, base=spec.base)


def expand(spec: SweepSpec, source: str | None = None) -> Iterator[CellDraft]:
    """grid × zip groups × lists × seeds, then include / exclude filters, in a stable order;
    lazily, so that a dry run of a huge sweep holds one draft at a time."""
    kept = 0
    for points in itertools.product(*(f.points for f in factors(spec))):
        draft = draft_of(spec, points)
        if spec.include and not any(_matches(draft, c) for c in spec.include):
            continue
        if any(_matches(draft, c) for c in spec.exclude):
            continue
        kept += 1
        yield draft
    if not kept:
        raise ConfigError("include/exclude leave no cell to run", source=source, key="include")


def search_probes(spec: SweepSpec) -> list[CellDraft]:
    """One draft per categorical choice and per int/float bound of the search space, each on the
    base config: building them checks every value a trial can draw against its field's type and
    range before any trial runs."""
    if not spec.search:
        return []
    drafts = []
    for key, p in spec.search.space.items():
        values = p.choices if p.type == "categorical" else [p.low, p.high]
        for value in values:
            value = int(value) if p.type == "int" else value
            config = copy.deepcopy(spec.base)
            for seed_key in spec.seed_keys:
                set_path(config, seed_key, spec.seeds[0])
            set_path(config, key, value)
            drafts.append(CellDraft({key: value}, own_config=config))
    return drafts
