"""The `edgesmith` entry point: global options, the packages' commands, and how errors are shown.

It knows no command. Each package that owns commands has a `commands` module whose `register(sub)`
adds them to the subparsers (huggingface_hub's `commands/`, optimum-cli): toolchain (run, recipes, train,
finetune, compress, export, eval, import-hf), runtimes (generate), devices (devices, bench), gui (gui).
This module sits above all of them, so no package imports another's CLI.

Bad input is an `EdgesmithError` (or an `OSError` naming its file): printed as one line, exit status 2.
Anything else is a bug of ours: one line too, exit status 1. The traceback is printed only with `--debug`
(anywhere on the command line, or EDGESMITH_DEBUG=1, which the processes we start inherit).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

from models.errors import EdgesmithError
from models.version import edgesmith_version

# The packages that own commands, in the order `--help` lists them; each has `<package>.commands`.
PACKAGES = ("toolchain", "runtimes", "devices", "gui")
DEBUG_FLAG = "--debug"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesmith", description="From training to a measured device benchmark.")
    p.add_argument("--version", action="version", version=f"edgesmith {edgesmith_version()}")
    p.add_argument(DEBUG_FLAG, action="store_true", help="print the traceback of an error (anywhere on the command "
                   "line; or set EDGESMITH_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for package in PACKAGES:
        importlib.import_module(f"{package}.commands").register(sub)
    return p


def debugging() -> bool:
    return os.environ.get("EDGESMITH_DEBUG", "").lower() in ("1", "true", "yes", "on")


def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`--debug` is taken wherever it stands before `--` (before or after the command)."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != DEBUG_FLAG] + argv[end:]
    return rest, len(rest) != len(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, flag = split_debug(argv)
    debug = flag or debugging()
    if debug:
        os.environ["EDGESMITH_DEBUG"] = "1"  # torchrun ranks, jobs and bench agents print theirs too
    else:
        quiet_library_warnings()
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("edgesmith: interrupted", file=sys.stderr)
        return 130
    except (EdgesmithError, OSError) as e:  # bad input, a missing or unreadable file: the user's to fix
        if debug:
            traceback.print_exc()
        print(f"edgesmith: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, and how to get the rest
        if debug:
            traceback.print_exc()
        print(f"edgesmith: internal error: {type(e).__name__}: {one_line(e)}"
              + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1
    return 0


# Library log lines that say nothing to a user of this CLI: torchao's CUDA-only extensions that do not
# load on a CPU machine, and a pytree deprecation raised by torchao's own import. Shown with --debug.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
# Libraries whose UserWarnings are notes to their own developers (ExecuTorch's "Mutation on a buffer",
# torch.export's), not to a user of edgesmith; ours (e.g. a --rule that matches nothing) stay visible.
QUIET_WARNING_MODULES = r"(torch|torchao|executorch|onnx|onnxscript|onnxruntime|transformers|optimum|gradio|copyreg)(\.|$)"


def quiet_library_warnings() -> None:
    """Filter library noise from the user's terminal (every warning is shown again with --debug): deprecation
    notices (FutureWarning, DeprecationWarning) of the libraries we pin, and their internal UserWarnings.
    ExecuTorch's native start-up lines are held back by runtimes.native_stderr."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=QUIET_WARNING_MODULES)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


if __name__ == "__main__":
    sys.exit(main())
