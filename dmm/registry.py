"""One registry pattern for every extension point (engines, teacher formats, styles, metrics, ...).

An entry has a name, a one-line description, the object it registers (a class or a factory) and
the dataclass of its typed options (see `dmm.schema`). Registering a taken name is refused unless
`replace=True`; asking for an unknown name lists the registered ones and the closest match.

Registries are found by kind (`get_registry("engine")`), so a recipe can name a component
without the recipe module importing the layer that provides it: the registry imports the
provider of its built-in entries the first time it is asked (`builtins=`). User code registers
its own entries by importing its module first (a recipe's `plugins:` list does that).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from dmm.schema import ConfigError, build, closest, document

T = TypeVar("T")


class RegistryError(ConfigError):
    """An unknown or clashing registry name; the message lists what is registered."""


@dataclass(frozen=True)
class NoOptions:
    """An entry without options."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    description: str
    options: type = NoOptions

    def parse_options(self, raw: dict | None, where: str = "options"):
        """The entry's typed options from a mapping, strictly (unknown keys name the closest one)."""
        return build(self.options, raw or {}, where)

    def describe(self) -> str:
        lines = [f"{self.name}: {self.description}"]
        for doc in document(self.options):
            lines.append(f"    {doc.key} ({doc.type}, default {doc.default!r}): {doc.help}")
        return "\n".join(lines)


_BY_KIND: dict[str, Registry] = {}


class Registry(Generic[T]):
    def __init__(self, kind: str, *, builtins: str | tuple[str, ...] | None = None):
        if kind in _BY_KIND:
            raise RegistryError(f"a registry of kind {kind!r} already exists")
        self.kind = kind
        self._builtins = (builtins,) if isinstance(builtins, str) else builtins
        self._entries: dict[str, Entry[T]] = {}
        _BY_KIND[kind] = self

    def register(self, name: str, *, description: str, options: type = NoOptions,
                 replace: bool = False) -> Callable[[T], T]:
        """Decorator form of `add`."""
        def wrap(obj: T) -> T:
            self.add(name, obj, description=description, options=options, replace=replace)
            return obj

        return wrap

    def add(self, name: str, obj: T, *, description: str, options: type = NoOptions, replace: bool = False) -> None:
        if not name or not isinstance(name, str):
            raise RegistryError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if not description or "\n" in description.strip():
            raise RegistryError(f"{self.kind} {name!r}: give a one-line description")
        if not dataclasses.is_dataclass(options):
            raise RegistryError(f"{self.kind} {name!r}: options must be a dataclass type, got {options!r}")
        if name in self._entries and not replace:
            raise RegistryError(f"{self.kind} {name!r} is already registered "
                                f"({self._entries[name].description}); pass replace=True to replace it")
        self._entries[name] = Entry(name, obj, description.strip(), options)

    def remove(self, name: str) -> None:
        self.get(name)
        del self._entries[name]

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            modules, self._builtins = self._builtins, None
            for module in modules:
                importlib.import_module(module)

    def get(self, name: str) -> Entry[T]:
        self._load_builtins()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}{closest(name, self.names(), list_all=False)} "
                                f"(registered: {', '.join(self.names()) or 'none'})")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._entries

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def describe(self) -> str:
        return "\n".join(e.describe() for e in self.entries())


# Where the built-in entries of the core's registries live, so that a registry can be found by
# kind before its provider was imported (the recipe checks names without importing engines).
PROVIDERS = {
    "engine": "dmm.engines",
    "teacher format": "dmm.teachers.formats",
    "data source": "dmm.data.sources",
    "merge method": "dmm.merge",
    "cli verb": "dmm.cli",
    "toy style": "dmm.toyworld.styles",
    "objective": "dmm.objectives",
}


def get_registry(kind: str) -> Registry:
    if kind not in _BY_KIND and kind in PROVIDERS:
        importlib.import_module(PROVIDERS[kind])
    if kind not in _BY_KIND:
        raise RegistryError(f"no registry of kind {kind!r}{closest(kind, sorted(_BY_KIND))}")
    return _BY_KIND[kind]


def load_plugin(spec: str, base: Path | None = None) -> None:
    """Import a user module that registers entries: a dotted module name or a `.py` file path
    (relative paths against `base`, the recipe's folder)."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            raise ConfigError(f"plugins: {spec!r} is not a file (looked at {path})")
        name = f"dmm_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as err:
        raise ConfigError(f"plugins: cannot import {spec!r} ({err}); give a module on the Python path "
                          "or a path to a .py file") from None


__all__ = ["Entry", "NoOptions", "Registry", "RegistryError", "get_registry", "load_plugin"]
