"""Typed, self-describing configuration: one way to declare a setting and to parse it strictly.

Every recipe key and every registered component's options are dataclass fields made with
`setting(...)`: the field carries its help text, bounds, and whether it may change when a run
resumes. `build(cls, raw)` turns a YAML mapping into the dataclass, refusing unknown keys (with
the closest valid one), wrong types, non-finite numbers and out-of-range values, always naming
the dotted key. `Literal[...]` types are the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING
from typing import Any, Literal


class ConfigError(ValueError):
    """A setting that cannot be used as written; the message names the key and what to change."""


def setting(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            resumable: bool = False, registry: str | None = None, toy: bool = False, path: bool = False) -> Any:
    """A dataclass field that documents and bounds itself.

    `resumable`: the key may differ between a run and its resumption without changing what is
    trained. `registry`: the value names an entry of that registry kind (checked live, so a
    user-registered entry is accepted). `toy`: the key only concerns the toy world. `path`: an
    input path, resolved against the folder of the file that gave it.
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "resumable": resumable,
            "registry": registry, "toy": toy, "path": path}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def flatten(value, prefix: str = "") -> dict:
    """Dotted keys of nested mappings (`optim.lr`), a list of mappings item by item
    (`teachers[0].path`); anything else is one value under `prefix`."""
    if isinstance(value, dict):
        items = [(join(prefix, k), v) for k, v in value.items()]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(value)]
    else:
        return {prefix: value}
    out = {}
    for key, v in items:
        out.update(flatten(v, key))
    return out


def closest(name: str, known: list[str], *, list_all: bool = True) -> str:
    """`; did you mean 'x'?`, else the list of valid names (or nothing, without `list_all`)."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid: {list(known)}" if list_all else ""


def _check_bounds(value, meta: dict, where: str) -> None:
    for key, ok, word in (("ge", lambda v, b: v >= b, "at least"), ("gt", lambda v, b: v > b, "greater than"),
                          ("le", lambda v, b: v <= b, "at most"), ("lt", lambda v, b: v < b, "less than")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where} must be {word} {bound}, got {value}")


def _scalar(cls, raw, where: str):
    if cls is Any:
        return raw
    if typing.get_origin(cls) is Literal:
        choices = typing.get_args(cls)
        if raw not in choices:
            raise ConfigError(f"{where}: {raw!r} is not one of {list(choices)}"
                              f"{closest(raw, list(choices), list_all=False)}")
        return raw
    if cls is float:
        if isinstance(raw, str):  # YAML 1.1 reads `1e-3` (no dot) as a string: accept what float() accepts
            try:
                raw = float(raw)
            except ValueError:
                pass
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {raw!r}")
        if not math.isfinite(raw):
            raise ConfigError(f"{where}: expected a finite number, got {raw!r}")
        return float(raw)
    if cls is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}: expected an integer, got {raw!r}")
        return raw
    if cls is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: expected true or false, got {raw!r}")
        return raw
    if cls is str:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {raw!r}")
        return str(raw)
    raise ConfigError(f"{where}: unsupported setting type {cls}")


def build(cls, raw, where: str = "", meta: dict | None = None):
    """Build `cls` (a dataclass, list, optional, dict or scalar type) from parsed YAML, strictly."""
    meta = meta or {}
    if dataclasses.is_dataclass(cls):
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where or 'the recipe'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        for key in raw:
            if key not in names:
                raise ConfigError(f"unknown key {join(where, key)!r}{closest(key, names)}")
        kwargs = {}
        for f in fields:
            if f.name in raw:
                kwargs[f.name] = build(hints[f.name], raw[f.name], join(where, f.name), dict(f.metadata))
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"missing the required key {join(where, f.name)!r}"
                                  + (f" ({f.metadata['help']})" if f.metadata.get("help") else ""))
        return cls(**kwargs)
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return build(inner[0], raw, where, meta)
    if origin is list:
        if not isinstance(raw, list):
            raise ConfigError(f"{where}: expected a list, got {raw!r}")
        return [build(args[0], item, f"{where}[{i}]", meta) for i, item in enumerate(raw)]
    if origin is dict:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
        return {str(k): build(args[1], v, join(where, k), meta) for k, v in raw.items()}
    value = _scalar(cls, raw, where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_bounds(value, meta, where)
    return value


def describe_type(cls) -> str:
    """A short readable type: `int`, `float`, `one of a|b`, `list[str]`, `section`."""
    if dataclasses.is_dataclass(cls):
        return "section"
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return describe_type(inner[0]) + " or null"
    if origin is list:
        return f"list[{describe_type(args[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(cls, "__name__", str(cls))


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One documented setting: what `--explain` prints and what resume compatibility reads."""

    key: str
    type: str
    default: Any
    help: str
    bounds: str
    resumable: bool
    registry: str | None
    toy: bool


def _default_of(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return "(required)"


def document(cls, prefix: str = "", toy: bool = False) -> list[KeyDoc]:
    """Every key of `cls`, depth first; a section's own line comes before its keys."""
    out: list[KeyDoc] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        key = join(prefix, f.name)
        typ = hints[f.name]
        inner = typ
        if typing.get_origin(typ) in (typing.Union, types.UnionType, list):
            inner = next(a for a in typing.get_args(typ) if a is not type(None))
        is_toy = toy or bool(meta.get("toy"))
        bounds = ", ".join(f"{w} {meta[k]}" for k, w in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                           if meta.get(k) is not None)
        default = "(section)" if dataclasses.is_dataclass(inner) and typing.get_origin(typ) is not list \
            else _default_of(f)
        out.append(KeyDoc(key, describe_type(typ), default, meta.get("help", ""), bounds,
                          bool(meta.get("resumable")), meta.get("registry"), is_toy))
        if dataclasses.is_dataclass(inner):
            sub = f"{key}[]" if typing.get_origin(typ) is list else key
            out.extend(document(inner, sub, is_toy))
    return out


__all__ = ["ConfigError", "KeyDoc", "build", "closest", "describe_type", "document", "flatten", "join",
           "setting"]
