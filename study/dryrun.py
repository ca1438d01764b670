"""The dry run's summary of a sweep without its plan: cells, distinct stages per kind, what a run
would submit, missing input files, the first cell's configs; a million cells cost the configs of
their distinct points per kind, in memory that does not grow with the cells.

Without include / exclude the cells are the product of the spec's factors (study.spec.factors),
and a kind's typed config depends only on the factors that set a key in a section it reads: each
kind builds (and validates) one config per point of those factors. A stage id hashes the kind's
config with its upstream ids, so two cells share a stage of kind K exactly when they agree on the
configs of K and of every kind upstream of K. Kinds that read disjoint factors vary independently,
so the distinct stages of K are a product over groups of kinds linked by shared factors; a group
is enumerated only when one of its kinds gives two points one config (else its count is the size
of its factors' product). Cells likewise, over every kind.

With include / exclude (a subset of the product) every cell is streamed and its distinct stage
ids counted. Either way the ledger is read only for stage folders that exist, each once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from study.config import ConfigError, semantic_json
from study.ledger import StageStates, State, runs
from study.spec import Factor, SweepSpec, draft_of, factors
from study.stages import StageKind, check_spec, get_kind, iter_cells, cell_id, typed_config


@dataclass
class KindCount:
    total: int  # distinct stages of the kind
    to_run: int  # those a run would submit


@dataclass
class DrySummary:
    drafts: int  # cells before duplicates are merged
    cells: int
    kinds: dict[str, KindCount]
    first: dict[str, Any]  # kind -> the first cell's typed config (the GPU-hour estimate reads it)
    missing: list[str]  # distinct 'input file absent' messages of stages not completed

    @property
    def stages(self) -> int:
        return sum(k.total for k in self.kinds.values())


def summarize(spec: SweepSpec, source: str, states: StageStates, force: bool, retry_failed: bool) -> DrySummary:
    """The summary, every cell's configs validated (the ConfigError a plan would raise first)."""
    kinds, origins = check_spec(spec, source)
    facs = factors(spec)
    if spec.include or spec.exclude or not all(f.points for f in facs):
        return _streamed(spec, source, states, force, retry_failed, counted=None)
    counted = _Product(spec, source, kinds, origins, facs)
    if not any(states.on_disk.values()):
        return counted.summary()
    return _streamed(spec, source, states, force, retry_failed, counted=counted.summary())


# --------------------------------------------------------------------------- the product of factors
@dataclass
class _Projection:
    """A kind's configs over the points of the factors it reads (mixed radix, the first factor
    slowest, as itertools.product): labels[i] numbers the distinct semantic config of point i."""
    reads: tuple[int, ...]
    labels: list[int]
    distinct: int

    @property
    def injective(self) -> bool:
        return self.distinct == len(self.labels)

    def label(self, point: dict[int, int], sizes: list[int]) -> int:
        index = 0
        for i in self.reads:
            index = index * sizes[i] + point[i]
        return self.labels[index]


class _InvalidPoint(Exception):
    def __init__(self, first_cell: int, error: ConfigError):
        self.first_cell, self.error = first_cell, error


class _Product:
    """The counts of a sweep whose cells are the full product of its factors."""

    def __init__(self, spec: SweepSpec, source: str, kinds: list[StageKind], origins: dict[str, str],
                 facs: list[Factor]):
        self.spec, self.source, self.origins, self.facs, self.kinds = spec, source, origins, facs, kinds
        self.sizes = [len(f.points) for f in facs]
        self.strides = [math.prod(self.sizes[i + 1:]) for i in range(len(facs))]
        self.first: dict[str, Any] = {}
        self.messages: list[tuple[int, int, str]] = []  # (first cell, kind position, message)
        self.projections: dict[str, _Projection] = {}
        invalid: list[tuple[int, int, ConfigError]] = []
        for position, kind in enumerate(kinds):
            try:
                self.projections[kind.name] = self._project(position, kind)
            except _InvalidPoint as bad:
                invalid.append((bad.first_cell, position, bad.error))
        if invalid:  # the one a plan built cell by cell, kind by kind, meets first
            raise min(invalid, key=lambda found: found[:2])[2]

    def _project(self, position: int, kind: StageKind) -> _Projection:
        sections = set(kind.sections)
        reads = tuple(i for i, f in enumerate(self.facs) if f.sections & sections)
        configs: dict[str, int] = {}
        labels: list[int] = []
        for point in itertools.product(*(range(self.sizes[i]) for i in reads)):
            first_cell = sum(self.strides[i] * j for i, j in zip(reads, point))
            draft = draft_of(self.spec, (self.facs[i].points[j] for i, j in zip(reads, point)))
            try:
                cfg = typed_config(kind, draft, self.origins, self.source)
            except ConfigError as err:
                raise _InvalidPoint(first_cell, err) from None
            label = configs.setdefault(semantic_json(cfg), len(configs))
            labels.append(label)
            if label == len(configs) - 1:  # a new config
                self._found(position, kind, first_cell, cfg)
        return _Projection(reads, labels, len(configs))

    def _found(self, position: int, kind: StageKind, first_cell: int, cfg: Any) -> None:
        if first_cell == 0:
            self.first[kind.name] = cfg
        message = kind.missing(cfg) if kind.missing else None
        if message:
            self.messages.append((first_cell, position, message))

    def distinct(self, names: Iterable[str]) -> int:
        """Distinct tuples of these kinds' configs over the cells."""
        total = 1
        for reads, group in _linked([self.projections[n] for n in names]):
            if len(group) == 1:
                total *= group[0].distinct
            elif all(p.injective for p in group):  # the labels give back every factor's point
                total *= math.prod(self.sizes[i] for i in reads)
            else:
                order = sorted(reads)
                seen = {tuple(p.label(dict(zip(order, point)), self.sizes) for p in group)
                        for point in itertools.product(*(range(self.sizes[i]) for i in order))}
                total *= len(seen)
        return total

    def summary(self) -> DrySummary:
        by_name = {k.name: k for k in self.kinds}
        counts = {}
        for kind in self.kinds:
            total = self.distinct(_upstream(kind, by_name))
            counts[kind.name] = KindCount(total, total)  # no stage folder exists: every stage is PENDING
        missing = list(dict.fromkeys(m for _, _, m in sorted(self.messages, key=lambda found: found[:2])))
        return DrySummary(math.prod(self.sizes), self.distinct(by_name), counts, self.first, missing)


def _linked(projections: list[_Projection]) -> list[tuple[set[int], list[_Projection]]]:
    """Projections grouped by shared factors (connected components)."""
    groups: list[tuple[set[int], list[_Projection]]] = []
    for p in projections:
        reads, members = set(p.reads), [p]
        for group in [g for g in groups if g[0] & reads]:
            groups.remove(group)
            reads |= group[0]
            members += group[1]
        groups.append((reads, members))
    return groups


def _upstream(kind: StageKind, by_name: dict[str, StageKind]) -> set[str]:
    """The kind and every kind it needs, transitively."""
    return {kind.name}.union(*(_upstream(by_name[n], by_name) for n in kind.needs))


# --------------------------------------------------------------------------- streaming
def _streamed(spec: SweepSpec, source: str, states: StageStates, force: bool, retry_failed: bool,
              counted: Optional[DrySummary]) -> DrySummary:
    """Every cell, one at a time. With `counted` (the product's counts) only the stages that have a
    folder or an input check are remembered (by id, each once); without, every distinct id and
    cell id is, to count them."""
    checks: dict[str, Optional[Callable[[Any], Optional[str]]]] = {k: get_kind(k).missing for k in spec.stages}
    seen: dict[str, set[int]] = {k: set() for k in spec.stages}
    not_run = dict.fromkeys(spec.stages, 0)
    missing: dict[str, None] = {}
    cells: set[int] = set()
    drafts, first = 0, None
    for _, stages in iter_cells(spec, source):
        drafts += 1
        if counted is None:
            cells.add(int(cell_id(stages), 16))
            first = first or {kind: st.config for kind, st in stages.items()}
        for kind, st in stages.items():
            if counted is not None and st.id not in states.on_disk[kind] and checks[kind] is None:
                continue
            sid = int(st.id, 16)
            if sid in seen[kind]:
                continue
            seen[kind].add(sid)
            state = states(kind, st.id)
            not_run[kind] += not runs(state, force, retry_failed)
            message = checks[kind](st.config) if checks[kind] and state != State.COMPLETED else None
            if message:
                missing.setdefault(message)
    totals = {k: c.total for k, c in counted.kinds.items()} if counted else {k: len(s) for k, s in seen.items()}
    kinds = {k: KindCount(totals[k], totals[k] - not_run[k]) for k in spec.stages}
    if counted:
        return DrySummary(counted.drafts, counted.cells, kinds, counted.first, list(missing))
    return DrySummary(drafts, len(cells), kinds, first, list(missing))
