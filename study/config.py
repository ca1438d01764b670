"""The one config system: typed dataclasses loaded from YAML, `--set key=value` overrides,
validated at load time with errors that name the file, the key path and a fix.

Every entry point (tokenizer/generator/pretraining trainers, the sweep engine, the report)
describes its configuration as a (nested) dataclass and calls `load(cls, path, overrides)`
or `parse_cli(cls, argv)`.  Supported field types: bool, int, float, str, `Literal[...]`,
`Optional[T]`, `list[T]`, `tuple[T, ...]`, `dict[str, T]`, nested dataclasses and `Any`.

Fields whose metadata says `semantic=False` (paths, logging cadence, worker counts) do not
change a result and are left out of `config_hash`, in the manner of exca's uids.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin

import yaml

from study.fsio import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used. The message is one line: `file: key.path: problem (fix)`."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source, self.key, self.detail = source, key, message
        where = ": ".join(p for p in (source, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: lower bound `ge` (>=) or `gt` (>), upper bound `le`
    (<=) or `lt` (<); None leaves that side open. NaN is never in range."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {low[1:]}"
        return f"{'<=' if high[-1] == ']' else '<'} {high[:-1]}"


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, semantic: bool = True, **kwargs) -> Any:
    """A numeric dataclass field with its allowed range, checked when a config is parsed
    (`from_dict`); for a list or tuple field the range applies to every item."""
    metadata: dict[str, Any] = {} if semantic else {"semantic": False}
    if any(b is not None for b in (ge, gt, le, lt)):
        metadata["range"] = Range(ge=ge, gt=gt, le=le, lt=lt)
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(metadata=metadata, **kwargs)


def nonsemantic(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field that does not affect results (excluded from `config_hash`); takes the
    range arguments of `bounded`."""
    return bounded(default, semantic=False, **kwargs)


# --------------------------------------------------------------------------- YAML reading
class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        self.key, self.line = key, line
        super().__init__(f"duplicate key '{key}' at line {line} (first at line {first_line}; keep one)")


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the last one would silently win) and reads
    exponent-form numbers such as `3e-3` as floats (YAML 1.1 wants `3.0e-3`, so a plain
    SafeLoader returns the string '3e-3', which an include filter or an axis never matches)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader reports unhashable keys itself
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` with StrictLoader's rules (duplicate keys, exponent floats)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a syntax error becomes a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found (check the path; cwd is {Path.cwd()})", source=str(path))
    try:
        data = parse_yaml(path.read_text())
    except DuplicateKeyError as err:
        raise ConfigError(str(err), source=str(path), key=str(err.key)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"YAML syntax error at {line}{problem}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping, got {type(data).__name__}", source=str(path))
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value", source="--set")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Set dotted keys in a nested dict (creating intermediate mappings)."""
    data = json.loads(json.dumps(data, default=str)) if data else {}
    for text in overrides or []:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


# --------------------------------------------------------------------------- building
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _convert(value: Any, tp: Any, key: str, source: str | None) -> Any:
    def fail(msg: str):
        raise ConfigError(msg, source=source, key=key)

    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]  # Optional[X]: X's own error, with its full key path
        fail(f"expected {_type_name(tp)}, got {value!r}")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            fix = f" (did you mean {hint[0]!r}?)" if hint else ""
            fail(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}{fix}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail(f"expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        args = get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            fail(f"expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                fail(f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {type(value).__name__} {value!r}")
        val_tp = get_args(tp)[1] if get_args(tp) else Any
        return {str(k): _convert(v, val_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail(f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        fail(f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail(f"expected a string, got {type(value).__name__} {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    fail(f"expected {_type_name(tp)}, got {value!r}")


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _merge_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a dataclass-valued field updates the field's default instead of
    replacing it (so `optim: {lr: 1e-3}` keeps a preset's betas and warmup)."""
    if not isinstance(value, dict):
        return value
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return value
    if not (dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return value
    return _deep_update(to_dict(default), value)


def _check_range(f: dataclasses.Field, value: Any, path: str, source: str | None) -> None:
    allowed = f.metadata.get("range")
    if allowed is None:
        return
    items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
    for i, item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and item not in allowed:
            raise ConfigError(f"{item!r} is out of range (must be {allowed})", source=source,
                              key=path if i is None else f"{path}[{i}]")


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """Resolved type hints and init fields of a config class (resolving hints dominates the
    cost of building a cell's configs, and a class never changes)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: dict, *, source: str | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    hints, fields = _schema(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown key '{key}' ({fix})", source=source, key=path)
        kwargs[key] = _convert(_merge_default(fields[key], value), hints[key], path, source)
        _check_range(fields[key], kwargs[key], path, source)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            path = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"required key is missing (add '{name}: <{_type_name(hints[name])}>')",
                              source=source, key=path)
    try:
        obj = cls(**kwargs)
    except ConfigError as err:
        if err.source is None:  # __post_init__ validation: attach the file and key path
            key = f"{prefix}.{err.key}" if prefix and err.key else (err.key or prefix or None)
            raise ConfigError(err.detail, source=source, key=key) from None
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err), source=source, key=prefix or None) from None
    return obj


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         data: dict | None = None) -> T:
    """Load `cls` from a YAML file (or `data`), then apply `--set` overrides, then validate."""
    source = str(path) if path is not None else "<config>"
    raw = read_yaml(path) if path is not None else dict(data or {})
    try:
        merged = apply_overrides(raw, overrides)
    except ConfigError as err:
        raise ConfigError(err.detail, source=source, key="--set") from None
    return from_dict(cls, merged, source=source)


# --------------------------------------------------------------------------- output
def to_dict(cfg: Any, *, semantic_only: bool = False) -> Any:
    """Plain (JSON-able) dict of a config; `semantic_only` drops `nonsemantic` fields."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        out = {}
        for f in dataclasses.fields(cfg):
            if semantic_only and not f.metadata.get("semantic", True):
                continue
            out[f.name] = to_dict(getattr(cfg, f.name), semantic_only=semantic_only)
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v, semantic_only=semantic_only) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v, semantic_only=semantic_only) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def config_hash(cfg: Any, *extra: str, length: int = 12) -> str:
    """Stable hash of the semantic content (key order and defaults written out do not matter)."""
    return hash_semantic(semantic_json(cfg), *extra, length=length)


def semantic_json(cfg: Any) -> str:
    """The part of config_hash that depends on the config alone: computed once, it can be
    cached by callers that hash one config with many `extra`s (a stage under many upstreams)."""
    return json.dumps(to_dict(cfg, semantic_only=True), sort_keys=True, default=str)


def hash_semantic(semantic: str, *extra: str, length: int = 12) -> str:
    """config_hash from a semantic_json: the same text as json.dumps([config, extra])."""
    payload = f"[{semantic}, {_encode_sorted(list(extra))}]"
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


# json.dumps(..., sort_keys=True, default=str) with the encoder built once, not per call
_encode_sorted = json.JSONEncoder(sort_keys=True, default=str).encode


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists kept as values): for logging typed params."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


# libyaml's emitter writes the same text as the pure-Python one, several times faster (a stage's
# config.yaml is written per stage, in the controller process under the debug backend)
_SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_yaml(cfg: Any, path: str | Path, durable: bool = True) -> None:
    atomic_write_text(path, yaml.dump(to_dict(cfg), Dumper=_SAFE_DUMPER, sort_keys=False), durable)


# --------------------------------------------------------------------------- CLI
def parse_cli(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """`prog CONFIG.yaml [--set key=value ...]` -> cls; on a bad config print one line, exit 2."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train.steps=100")
    args = parser.parse_args(argv)
    return load_or_exit(cls, args.config, args.overrides)


def load_or_exit(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    try:
        return load(cls, path, overrides)
    except ConfigError as err:
        raise SystemExit(user_error(err)) from None


def user_error(err: Exception, status: int = 2) -> int:
    """An error the user can act on (a bad config, a missing file, a busy controller) as one
    `error:` line on stderr, not a traceback; returns the CLI's exit status for it."""
    print(f"error: {err}", file=sys.stderr)
    return status


def cli_errors(*errors: type[Exception]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator of a CLI's `main`: one of `errors` ends it as a `user_error` (exit status 2),
    not as a traceback."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except errors as err:
                return user_error(err)
        return run
    return wrap
