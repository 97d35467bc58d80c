"""The entry point: every package's commands, help on every option, `--debug` anywhere, and a quiet terminal."""

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from edgesmith.cli import PACKAGES, build_parser, split_debug
from runtimes.native_stderr import captured

COMMANDS = {"run", "recipes", "train", "finetune", "compress", "export", "eval", "tune", "import-hf", "import-gguf", "generate", "verify", "devices",
            "bench", "gui"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:  # noqa: SLF001 (walking argparse's own tree is the only way to list options)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            found.update(action.choices)
    return found


def test_every_package_registers_its_commands():
    # execute
    commands = _subparsers(build_parser())
    # assert
    assert set(commands) == COMMANDS
    assert PACKAGES == ("toolchain", "runtimes", "devices", "gui")


def test_every_option_of_every_command_has_help():
    # setup
    missing, stack = [], [("edgesmith", build_parser())]
    # execute
    while stack:
        name, parser = stack.pop()
        for action in parser._actions:  # noqa: SLF001
            if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
                helped = {a.dest for a in action._choices_actions if a.help}  # noqa: SLF001
                missing += [f"{name} {c}" for c in action.choices if c not in helped]
                stack += [(f"{name} {c}", p) for c, p in action.choices.items()]
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    # assert
    assert not missing, f"no help text: {missing}"


@pytest.mark.parametrize("argv, rest, debug", [
    (["--debug", "bench", "a"], ["bench", "a"], True),
    (["bench", "a", "--debug"], ["bench", "a"], True),
    (["bench", "a"], ["bench", "a"], False),
    (["generate", "p", "--", "--debug"], ["generate", "p", "--", "--debug"], False),
])
def test_debug_is_taken_before_or_after_the_command(argv, rest, debug):
    assert split_debug(argv) == (rest, debug)


LIBRARY_NOISE = """
import warnings
from edgesmith.cli import quiet_library_warnings
quiet_library_warnings()
warnings.warn_explicit("pytree deprecated", FutureWarning, "copyreg.py", 105, module="copyreg")
warnings.warn_explicit("deprecated here", DeprecationWarning, "x.py", 1, module="torch.export")
warnings.warn_explicit("Mutation on a buffer", UserWarning, "_emitter.py", 1, module="executorch.exir.emit._emitter")
warnings.warn_explicit("rule 'lm_head=8' matches no layer", UserWarning, "rules.py", 56, module="toolchain.compress.rules")
"""


def test_library_warnings_are_filtered_and_ours_stay():
    # execute
    r = subprocess.run([sys.executable, "-c", LIBRARY_NOISE], capture_output=True, text=True, timeout=120)
    # assert
    assert r.returncode == 0, r.stderr
    assert "matches no layer" in r.stderr
    for noise in ("pytree deprecated", "deprecated here", "Mutation on a buffer"):
        assert noise not in r.stderr, r.stderr


def test_executorch_start_up_lines_are_held_back_and_other_output_is_not(capfd, monkeypatch):
    # setup
    monkeypatch.delenv("EDGESMITH_DEBUG", raising=False)
    # execute
    with captured():
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file /sys/devices/soc0/image_version\n")
        os.write(2, b"a line a user should see\n")
    # assert
    err = capfd.readouterr().err
    assert "cpuinfo_utils" not in err and "a line a user should see" in err


def test_generate_on_an_executorch_artifact_prints_only_the_completion(artifact):
    """Through the console script, on the real stderr: no ExecuTorch start-up lines, no library warnings."""
    # setup
    script = shutil.which("edgesmith") or pytest.fail("the edgesmith console script is not installed")
    # execute
    r = subprocess.run([script, "generate", str(artifact("executorch")), "--prompt", "def add(",
                        "--max-new-tokens", "4", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    # assert
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def add(") and r.stderr == "", r.stderr
