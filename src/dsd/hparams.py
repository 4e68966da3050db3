"""Typed hyper-parameters: frozen dataclasses read from YAML, with errors that name the key path.

Every config section is a dataclass whose fields carry their default and a help text (`option`). `parse(cls,
raw, where)` checks keys, types and ranges and returns the instance. Numbers written as strings are read as
numbers where a field wants one: PyYAML follows YAML 1.1, which reads `1e-3` as a string, and Snakemake hands
nested `--config` values over as strings. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from dsd.errors import ConfigError

_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(
    r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)


def option(default=dataclasses.MISSING, help: str = "", *, factory=None, added=False, **checks):
    """A field with its help text and checks: min / max (inclusive), gt / lt (exclusive), nonempty, unique.

    added: a key added after runs were named; at its default it is left out of `as_dict`, so of every run's
    fingerprint, and adding it renames no existing run. Its default must never change (a test pins them)."""
    metadata = {"help": help, "added": added, **checks}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def key_path(where: str, key: str | int) -> str:
    return f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}"


# ------------------------------------------------------------------------------------------- parsing


@cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse(cls, raw: Mapping | None, where: str):
    """`cls(**raw)` with every key and value checked; the error names the key path, e.g. config.seeds[1]."""
    if raw is None:
        raw = {}
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{key_path(where, key)}: {_unknown(cls, key, fields)}")
    values = {}
    for name, value in raw.items():
        path = key_path(where, name)
        values[name] = _check(convert(value, _hints(cls)[name], path), fields[name].metadata, path)
    missing = [n for n, f in fields.items() if n not in values and _required(f)]
    if missing:
        raise ConfigError(f"{key_path(where, missing[0])}: required key is missing")
    return cls(**values)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _unknown(cls, key, fields) -> str:
    moved = getattr(cls, "MOVED", {}).get(key)
    if moved:
        return f"this key moved to {moved}"
    close = difflib.get_close_matches(str(key), list(fields), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed: {', '.join(fields)})"


def convert(value, hint, where: str):
    """`value` as type `hint` (int, float, bool, str, Literal, X | None, tuple[X, ...], dict, a dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option_type in options:
            try:
                return convert(value, option_type, where)
            except ConfigError as err:
                errors.append(str(err).split(": ", 1)[-1])
        raise ConfigError(f"{where}: {' or '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    if origin is tuple or hint is tuple:
        return _tuple(value, args, where)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kind = args[1] if args else Any
        return {k: convert(v, kind, key_path(where, k)) for k, v in value.items()}
    return _scalar(value, hint, where)


def _tuple(value, args, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(v, args[0], key_path(where, i)) for i, v in enumerate(value))
    if args and len(args) != len(value):
        raise ConfigError(f"{where}: expected a list of {len(args)} items, got {value!r}")
    kinds = args or (Any,) * len(value)
    return tuple(convert(v, k, key_path(where, i)) for i, (v, k) in enumerate(zip(value, kinds, strict=True)))


def _scalar(value, hint, where: str):
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {hint!r}")


def _check(value, checks: Mapping, where: str):
    if value is None:
        return value
    if checks.get("nonempty") and not value:
        raise ConfigError(f"{where}: must not be empty")
    if checks.get("unique") and len(set(value)) != len(value):
        duplicate = next(v for i, v in enumerate(value) if v in value[:i])
        raise ConfigError(f"{where}: {duplicate!r} is listed twice (entries must be unique)")
    items = value if isinstance(value, tuple) else (value,)
    for i, item in enumerate(items):
        at = key_path(where, i) if isinstance(value, tuple) else where
        for name, ok, text in (
            ("min", lambda v, b: v >= b, ">="),
            ("max", lambda v, b: v <= b, "<="),
            ("gt", lambda v, b: v > b, ">"),
            ("lt", lambda v, b: v < b, "<"),
        ):
            bound = checks.get(name)
            if bound is not None and isinstance(item, (int, float)) and not ok(item, bound):
                raise ConfigError(f"{at}: must be {text} {bound:g}, got {item!r}")
    return value


def as_dict(obj) -> Any:
    """A dataclass as plain JSON-able data (tuples as lists), for hashing and for the command line."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: as_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("added") and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): as_dict(v) for k, v in obj.items()}
    return obj


def describe(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every field, nested sections flattened: the generated key reference."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        rows.append((key, type_name(hint), repr(default), f.metadata.get("help", "")))
    return rows


def type_name(hint) -> str:
    """`int`, `number`, `one of a, b`, `list of string`, `string or null`: for people, not for Python."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple or hint is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)}"
    if origin is dict or hint is dict:
        return "mapping"
    names = {int: "integer", float: "number", bool: "true/false", str: "string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# ---------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """YAML as people write it: `1e-3` is a number (YAML 1.2), not the string YAML 1.1 makes of it; a key given
    twice in one mapping is an error (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the keys as written (a `<<:` merge's may be overridden, by design)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} given twice in one mapping", key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _plain(value):
    """A fresh copy of every mapping and list: a YAML anchor used twice becomes two independent values."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_yaml_text(text: str, name: str):
    try:
        return _plain(yaml.load(text, Loader=_Loader))
    except RecursionError:
        raise ConfigError(f"{name}: YAML error: an alias refers to itself") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ConfigError(f"{where}: YAML syntax error: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: YAML error: {str(err).splitlines()[0]}") from None


def load_yaml(path: str | Path):
    path = Path(path)
    if path.is_dir():  # `dsd check-config configs/`: there, but not a file
        raise ConfigError(f"{path}: a folder, not a config file (e.g. {path / 'default.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return load_yaml_text(text, str(path))


def yaml_value(text: str, name: str = "value"):
    """A command-line value as YAML would read it (`8` an int, `1e-3` a float, `[0, 1]` a list); `name` says
    where it came from in an error."""
    return load_yaml_text(text, name)
