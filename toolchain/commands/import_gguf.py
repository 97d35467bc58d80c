"""`edgesmith import-gguf`: a GGUF file (F32/F16/Q8_0/Q4_0) becomes a checkpoint, its codes kept exactly."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import EdgesmithError
from toolchain.gguf_import import import_gguf


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
    print(f"imported {args.src} -> {import_gguf(args.src, out)}")


def register(sub) -> None:
    i = sub.add_parser("import-gguf", help="import a GGUF file (llama, qwen2, qwen3; F32/F16/Q8_0/Q4_0) as a "
                                           "checkpoint, quantized codes kept exactly")
    i.add_argument("src", help="the .gguf file")
    i.add_argument("--out", required=True, help="the checkpoint directory to write")
    i.add_argument("--force", action="store_true", help="replace --out if it exists")
    i.set_defaults(func=run)
