"""Runtime options a user can set on the command line and in the GUI, as `runtimes.load` keyword arguments.

| flag | option | backends |
|---|---|---|
| `--threads N` | `n_threads` | torch, onnxruntime, executorch, llamacpp |
| `--accuracy-level 0-4` | `accuracy_level` | onnxruntime (MatMulNBits: 0 as stored, 4 int8 activations) |
| `--kv-cache fp32|fp16` | `kv_cache` | llamacpp |
| `--flash-attn on|off` | `flash_attn` | llamacpp |

Unset flags are left out, so the artifact's manifest `runtime_options` (the configuration its parity was checked
in at export) apply; a flag the artifact's backend does not have is refused by `runtimes.load` in one line.
This module only parses; the backends validate values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import EdgesmithError
from runtimes.artifact import MANIFEST, read_manifest
from runtimes.loader import backend_class, backends_for, option_names

FLASH = {"on": True, "off": False}
KV_CACHE = {"fp32": "f32", "fp16": "f16", "f32": "f32", "f16": "f16"}  # our precision names, and llama.cpp's
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # ONNX Runtime MatMulNBits: as stored, fp32, fp16, bf16, int8 activations
FLAGS = {"n_threads": "--threads", "accuracy_level": "--accuracy-level", "kv_cache": "--kv-cache",
         "flash_attn": "--flash-attn"}


def _flash(text: str) -> bool:
    if text not in FLASH:
        raise argparse.ArgumentTypeError(f"{text!r}; allowed: on, off")
    return FLASH[text]


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """The four runtime flags, each defaulting to the artifact's own verified configuration."""
    p.add_argument("--threads", type=int, default=None, metavar="N", help="compute threads (default: the artifact's "
                   "policy: one for tiny models, else one per core)")
    p.add_argument("--accuracy-level", type=int, default=None, choices=ACCURACY_LEVELS, metavar="L", help="onnx MatMulNBits: 0 float "
                   "activations (exact), 4 int8 activations (fast; default for quantized artifacts, as verified at export)")
    p.add_argument("--kv-cache", default=None, choices=sorted(KV_CACHE), metavar="TYPE", help="gguf: KV cache type "
                   "fp32 or fp16 (default: fp32 for an fp32 artifact, else fp16)")
    p.add_argument("--flash-attn", type=_flash, default=None, metavar="on|off", help="gguf: llama.cpp flash attention "
                   "(default: as the manifest says, on for our exports)")


def runtime_options(args: argparse.Namespace) -> dict:
    """The flags the user gave, as `runtimes.load` keyword arguments (unset ones left out)."""
    if args.threads is not None and args.threads < 1:
        raise EdgesmithError(f"--threads: {args.threads} must be >= 1")
    given = {"n_threads": args.threads, "accuracy_level": args.accuracy_level,
             "kv_cache": KV_CACHE.get(args.kv_cache), "flash_attn": args.flash_attn}
    return {k: v for k, v in given.items() if v is not None}


def check_flags(path: str | Path, options: dict) -> None:
    """Refuse, in one line naming the flag, a runtime flag the backend that runs `path` does not have
    (before anything is loaded)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        fmt = read_manifest(path, verify=False).get("format")
        names = backends_for(fmt) if isinstance(fmt, str) else []
        if not names:
            return  # runtimes.load names the bad format
        backend, factory = names[0], backend_class(names[0]).__init__
        what = f"an artifact of format {fmt}, run by {backend}"
    else:
        backend, factory, what = "torch", backend_class("torch").from_path, "a checkpoint (torch)"
    takes = option_names(factory)
    for option in options:
        if option not in takes:
            has = ", ".join(FLAGS[o] for o in FLAGS if o in takes) or "none of them"
            raise EdgesmithError(f"{FLAGS.get(option, option)}: {path} is {what}, which has no such option "
                                 f"(its runtime flags: {has})")


def describe(options: dict) -> str:
    """`threads=2 accuracy_level=4`: what a session ran with, for tables and logs."""
    names = {"n_threads": "threads"}
    return " ".join(f"{names.get(k, k)}={'on' if v is True else 'off' if v is False else v}"
                    for k, v in sorted(options.items())) or "-"
