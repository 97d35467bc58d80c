"""The one registry: quantization methods, pass kinds, export formats and runtime backends.

Each kind is a package, and each module in it is one entry, named by its file: adding a format is
one new file in `toolchain/export/formats/` whose module registers itself with `@FORMATS.register(...)`
(tinygrad's `ops_{x}` modules; Olive's `module_path`). Names are listed from the package's files
without importing them, so the CLI's choices, recipe validation and the GUI's dropdowns never load
ExecuTorch or llama.cpp; `get(name)` imports that one module. Modules whose name starts with `_` are
helpers, not entries.

This module lives in `models` because every other package reads it (runtimes never import toolchain);
it names the packages by string and imports none of them until an entry is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from models.errors import EdgesmithError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any  # what the module registered: a function, a class, a spec
    config: type | None = None  # the pass's frozen config dataclass, where the entry has one
    meta: dict = field(default_factory=dict)  # e.g. a backend's formats, a method's time estimate


class Registry:
    """name -> Entry for one kind, filled by the modules of `package`, each imported on first use."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._entries: dict[str, Entry] = {}

    def names(self) -> list[str]:
        """The entries' names, from the package's module files (nothing imported but the package)."""
        pkg = importlib.import_module(self.package)
        return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))

    def register(self, name: str, obj: Any = None, *, config: type | None = None, **meta) -> Any:
        """Register `obj` under `name` (its module's file name); used as a decorator when `obj` is omitted."""
        def deco(o: Any) -> Any:
            if name in self._entries:
                raise EdgesmithError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, o, config, dict(meta))
            return o
        return deco(obj) if obj is not None else deco

    def get(self, name: str, what: str | None = None) -> Entry:
        """The entry called `name`, importing its module; unknown names are refused in one line that
        lists the allowed ones (`what` names the option or field the name came from)."""
        if name not in self._entries:
            allowed = self.names()
            if name not in allowed:
                where = f"{what}: " if what else ""
                raise EdgesmithError(f"{where}unknown {self.kind} {name!r}; allowed: {', '.join(allowed)}")
            importlib.import_module(f"{self.package}.{name}")
            if name not in self._entries:
                raise EdgesmithError(f"{self.package}.{name} does not register a {self.kind}")
        return self._entries[name]

    def entries(self) -> list[Entry]:
        """Every entry (imports every module of the kind)."""
        return [self.get(n) for n in self.names()]

    def for_config(self, cfg: Any) -> Entry:
        """The entry whose config class is `cfg`'s type."""
        for entry in self.entries():
            if entry.config is type(cfg):
                return entry
        raise EdgesmithError(f"no {self.kind} registered for config {type(cfg).__name__}")


METHODS = Registry("quantize method", "toolchain.compress.methods")
PASSES = Registry("pass kind", "toolchain.compress.passes")  # besides "quantize", whose configs are METHODS
FORMATS = Registry("export format", "toolchain.export.formats")
BACKENDS = Registry("runtime backend", "runtimes.backends")
