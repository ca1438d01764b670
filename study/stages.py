"""Stage kinds, stage ids and the plan of a sweep (cells -> chains of content-addressed stages).

A stage kind is registered once, next to the code it runs:

    @dataclass
    class TokenizerStage:            # fields = the top-level config sections it reads
        data: DataConfig
        vfm: VFMSpec
        tokenizer: TokenizerSection

    @register_stage("tokenizer", TokenizerStage, needs=("vfm",), validate=check_tokenizer)
    def run_tokenizer(ctx: StageContext) -> StageResult:
        ...  # train into ctx.dir with ctx.callbacks, read ctx.inputs["vfm"].dir
        return StageResult(metrics={"loss": ...}, outputs={"codes": "codes.pt"}, tags={"sampler": ...})

A stage's id is `config_hash(its typed config, kind, version, *upstream ids)`: a stage that many
cells share has one id, one folder `<study_dir>/stages/<kind>/<id>/`, and runs once.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, get_args, get_origin

from study import ledger, schema
from study.config import ConfigError, from_dict, hash_semantic, semantic_json
from study.spec import CellDraft, Resources, SweepSpec, axis_keys, expand
from study.training import Callback

# the study's own chain: its kinds are known by name (study.schema), its module is imported
# only by sweeps that use it, so that engine processes of other chains stay torch-light
BUILTIN_PROVIDER = "study.pipeline.stages"


@dataclass
class StageResult:
    """What a finished stage leaves behind (result.json), JSON-able.

    metrics:   final numbers, logged to MLflow as `<kind>/<key>`
    outputs:   what later stages read (paths relative to the stage folder, specs, ...)
    tags:      MLflow tags describing the cell (backbone, family, ...)
    artifacts: MLflow artifact folder -> files relative to the stage folder"""
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        for key, value in self.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric '{key}' must be a number, got {value!r} (put it in outputs or tags)")
        self.metrics = {k: float(v) for k, v in self.metrics.items()}
        self.tags = {k: str(v) for k, v in self.tags.items()}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Optional[dict]) -> Optional["StageResult"]:
        """None for an absent result or one written in another layout (the stage runs again)."""
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            return None
        return cls(**data)


def read_stage_result(stage_dir: Path) -> Optional[StageResult]:
    return StageResult.from_json(ledger.read_result(stage_dir))


@dataclass
class Upstream:
    """A finished upstream stage as seen by a downstream one."""
    dir: Path
    result: StageResult


@dataclass
class StageContext:
    """Everything a stage's run function gets: its typed config, its folder (write checkpoints
    and outputs there: a rerun after preemption finds them), its upstream outputs by kind, and
    the callbacks to hand to `study.training.Trainer` (MLflow curves, Optuna pruning, status)."""
    config: Any
    dir: Path
    inputs: dict[str, Upstream]
    callbacks: list[Callback] = field(default_factory=list)


@dataclass(frozen=True)
class StageKind:
    name: str
    config: type
    run: Callable[[StageContext], StageResult]
    needs: tuple[str, ...] = ()
    validate: Optional[Callable[[Any], None]] = None  # raise ConfigError(msg, key="section.field")
    version: str = "1"  # bump to invalidate every cached result of this kind
    missing: Optional[Callable[[Any], Optional[str]]] = None  # an absent input file (weights), or None

    @property
    def sections(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]


_KINDS: dict[str, StageKind] = {}


def register_stage(name: str, config: type, *, needs: tuple[str, ...] = (),
                   validate: Optional[Callable[[Any], None]] = None, version: str = "1",
                   missing: Optional[Callable[[Any], Optional[str]]] = None):
    """Decorator registering `run(ctx: StageContext) -> StageResult` as stage kind `name`.

    `config` is a dataclass whose fields are the top-level sections of the cell config this
    stage reads (anything it does not read cannot change its id). `needs` are upstream kinds.
    `missing(cfg)` names an input file a run would lack (e.g. pretrained weights): the dry run
    lists every one, and a real run refuses to start while any is missing."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"stage '{name}': config must be a dataclass, got {config!r}")

    def deco(run: Callable[[StageContext], StageResult]):
        _KINDS[name] = StageKind(name, config, run, tuple(needs), validate, version, missing)
        return run
    return deco


def load_providers(stages: list[str], extra: list[str] = ()) -> None:
    """Import the modules registering the kinds a sweep uses: the study's chain when it names
    one of its kinds, and the spec's `plugins` (user extensions, test chains)."""
    builtin = [BUILTIN_PROVIDER] if set(stages) & set(schema.CHAIN) else []
    for module in [*builtin, *extra]:
        importlib.import_module(module)


def get_kind(name: str) -> StageKind:
    if name not in _KINDS:
        hint = difflib.get_close_matches(name, list(_KINDS), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"known kinds: {', '.join(sorted(_KINDS))}"
        raise ConfigError(f"unknown stage kind '{name}' ({fix})")
    return _KINDS[name]


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True, slots=True)
class Stage:
    kind: str
    id: str
    config: Any
    upstream: tuple[str, ...]  # keys of upstream stages ("kind/id")
    resources: Resources

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.id}"

    def dir(self, root: Path) -> Path:
        return Path(root) / "stages" / self.kind / self.id


@dataclass(slots=True)
class Cell:
    index: int
    id: str  # hash of its stage keys
    draft: CellDraft  # its values and (built on demand) its config
    stages: dict[str, Stage]  # kind -> stage, in dependency order

    @property
    def values(self) -> dict[str, Any]:  # axis key -> value
        return self.draft.values

    @property
    def config(self) -> dict[str, Any]:
        return self.draft.config


@dataclass
class Plan:
    spec: SweepSpec
    source: str
    cells: list[Cell]
    stages: dict[str, Stage]  # key -> stage, each once, in dependency order
    merged_duplicates: int = 0

    @property
    def root(self) -> Path:
        return self.spec.root


def _check_key_path(key: str, kinds: list[StageKind]) -> Optional[str]:
    """None if some stage kind's schema has `key`; else a problem with a did-you-mean fix."""
    section, *rest = key.split(".")
    readers = [k for k in kinds if section in k.sections]
    if not readers:
        names = sorted({s for k in kinds for s in k.sections})
        hint = difflib.get_close_matches(section, names, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"sections read: {', '.join(names)}"
        return f"no stage reads section '{section}' ({fix})"
    tp: Any = typing.get_type_hints(readers[0].config)[section]
    walked = section
    for part in rest:
        while get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            return None  # dict / Any: free-form below here
        hints = typing.get_type_hints(tp)
        if part not in hints:
            hint = difflib.get_close_matches(part, list(hints), n=1)
            fix = f"did you mean '{walked}.{hint[0]}'?" if hint else f"known keys: {', '.join(sorted(hints))}"
            return f"unknown key '{part}' in {walked} ({fix})"
        tp, walked = hints[part], f"{walked}.{part}"
    return None


def check_spec(spec: SweepSpec, source: str) -> tuple[list[StageKind], dict[str, str]]:
    """The sweep's stage kinds (in order) and its axis keys, every key path checked against the
    kinds' dataclasses; cells are not looked at. Raises a one-line ConfigError."""
    def fail(msg: str, key: str):
        raise ConfigError(msg, source=source, key=key)

    load_providers(spec.stages, spec.plugins)
    kinds: list[StageKind] = []
    for i, name in enumerate(spec.stages):
        try:
            kind = get_kind(name)
        except ConfigError as err:
            fail(err.detail, f"stages[{i}]")
        for need in kind.needs:
            if need not in spec.stages[:i]:
                fail(f"stage '{name}' needs '{need}' listed before it", f"stages[{i}]")
        kinds.append(kind)
    for name in spec.resources:
        if name not in spec.stages:
            hint = difflib.get_close_matches(name, spec.stages, n=1)
            fail(f"no stage '{name}' in this sweep" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                 f"resources.{name}")
    origins = axis_keys(spec)
    for key, where in origins.items():
        problem = _check_key_path(key, kinds)
        if problem:
            fail(problem, where)
    for name, conds in (("include", spec.include), ("exclude", spec.exclude)):
        for i, cond in enumerate(conds):
            for key in cond:
                problem = None if key in origins else _check_key_path(key, kinds)
                if problem:
                    fail(problem, f"{name}[{i}].{key}")
    for section in spec.base:
        problem = _check_key_path(section, kinds)
        if problem:
            fail(problem, f"base.{section}")
    return kinds, origins


def iter_cells(spec: SweepSpec, source: str, drafts: Iterable[CellDraft] | None = None
               ) -> Iterator[tuple[CellDraft, dict[str, Stage]]]:
    """Every draft (duplicates included) with its stages, kind -> stage in dependency order, one
    at a time: each cell's config validated by the kinds' dataclasses (a one-line ConfigError)."""
    kinds, origins = check_spec(spec, source)
    typed = _TypedConfigs(spec, origins, source, shared={need for kind in kinds for need in kind.needs})
    for draft in (drafts if drafts is not None else expand(spec, source)):
        cell_stages: dict[str, Stage] = {}
        for kind in kinds:
            ups = tuple(cell_stages[n].key for n in kind.needs)
            cell_stages[kind.name] = typed.stage(kind, draft, ups)
        yield draft, cell_stages


def cell_id(stages: dict[str, Stage]) -> str:
    """A cell is its stages: two drafts with the same stages are one cell."""
    return hash_semantic("{}", *sorted(s.key for s in stages.values()))


def build_plan(spec: SweepSpec, source: str, drafts: list[CellDraft] | None = None) -> Plan:
    """Validate every cell against the stage kinds' dataclasses and attach stage ids.
    Raises a one-line ConfigError naming the spec file and the key path."""
    stages: dict[str, Stage] = {}
    cells: list[Cell] = []
    seen: set[str] = set()
    n_drafts = 0
    for draft, cell_stages in iter_cells(spec, source, drafts):
        n_drafts += 1
        cell_stages = {kind: stages.setdefault(stage.key, stage) for kind, stage in cell_stages.items()}
        cid = cell_id(cell_stages)
        if cid in seen:
            continue
        seen.add(cid)
        cells.append(Cell(len(cells), cid, draft, cell_stages))
    return Plan(spec, source, cells, stages, merged_duplicates=n_drafts - len(cells))


class _TypedConfigs:
    """Each stage kind's typed config of a draft and its stage. For grid cells a typed config and
    its semantic JSON (the costly part of a stage id) are shared by every cell with the same
    values in the sections the kind reads, and a stage by every cell that also has the same
    upstream stages: a million cells build only their distinct configs and hash only their
    distinct stages."""

    def __init__(self, spec: SweepSpec, origins: dict[str, str], source: str, shared: set[str]):
        self.origins, self.source, self.shared = origins, source, shared  # shared: kinds others need
        self.resources = {name: spec.resources_for(name) for name in spec.stages}
        self.configs: dict[tuple, tuple[Any, str]] = {}
        self.stages: dict[tuple, Stage] = {}
        self.relevant: dict[tuple, tuple[str, ...]] = {}  # (kind, the draft's axis keys) -> keys the kind reads

    def stage(self, kind: StageKind, draft: CellDraft, ups: tuple[str, ...]) -> Stage:
        if not draft.derived:
            cfg = typed_config(kind, draft, self.origins, self.source)
            return self._new(kind, cfg, semantic_json(cfg), ups)
        axes = (kind.name, tuple(draft.values))
        keys = self.relevant.get(axes)
        if keys is None:
            sections = set(kind.sections)
            keys = self.relevant[axes] = tuple(k for k in draft.values if k.partition(".")[0] in sections)
        config_key = (kind.name, keys, repr(tuple(draft.values[k] for k in keys)))
        stage = self.stages.get((config_key, ups))
        if stage is None:
            found = self.configs.get(config_key)
            if found is None:
                cfg = typed_config(kind, draft, self.origins, self.source)
                found = self.configs[config_key] = (cfg, semantic_json(cfg))
            stage = self._new(kind, *found, ups)
            if kind.name in self.shared:  # a last stage is mostly one per cell: not worth keeping here
                self.stages[(config_key, ups)] = stage
        return stage

    def _new(self, kind: StageKind, cfg: Any, semantic: str, ups: tuple[str, ...]) -> Stage:
        sid = hash_semantic(semantic, kind.name, kind.version, *ups)
        return Stage(kind.name, sid, cfg, ups, self.resources[kind.name])


def typed_config(kind: StageKind, draft: CellDraft, origins: dict[str, str], source: str) -> Any:
    data = {s: draft.config[s] for s in kind.sections if s in draft.config}
    try:
        cfg = from_dict(kind.config, data, source=source, prefix="base")
        if kind.validate:
            kind.validate(cfg)
        return cfg
    except ConfigError as err:
        key = (err.key or "").removeprefix("base.")
        origin = next((where for k, where in origins.items() if key == k or key.startswith(k + ".")), None)
        raise ConfigError(err.detail, source=source, key=origin or f"base.{key}") from None
