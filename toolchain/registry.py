"""Registries: a dict plus a decorator, keyed by short lowercase names.

`Registry("pass")` maps a name to (config class, function). Adding a method is one file with one
decorator; nothing else changes. This module does not import the methods: the package that owns a
registry does (toolchain/compress/__init__.py for the compression passes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from models.errors import EdgesmithError


@dataclass(frozen=True)
class Entry:
    name: str
    config: type
    fn: Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type) -> Callable:
        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise EdgesmithError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, config, fn)
            return fn
        return deco

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise EdgesmithError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def for_config(self, cfg) -> Entry:
        for entry in self._entries.values():
            if type(cfg) is entry.config:
                return entry
        raise EdgesmithError(f"no {self.kind} registered for config {type(cfg).__name__}")

    def names(self) -> list[str]:
        return sorted(self._entries)
