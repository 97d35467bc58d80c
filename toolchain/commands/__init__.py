"""The toolchain's commands, one module each with `register(sub)` and the function it runs.

Collected by the `edgesmith` entry point (edgesmith/cli.py) through `register(sub)` below; the order
here is the order `edgesmith --help` lists them.
"""

from __future__ import annotations

from toolchain.commands import compress, evaluate, export, import_gguf, import_hf, run, train, tune

COMMANDS = (run, train, compress, export, evaluate, tune, import_hf, import_gguf)


def register(sub) -> None:
    for command in COMMANDS:
        command.register(sub)
