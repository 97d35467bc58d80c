"""`edgesmith import-hf`: a Llama, Mistral, Qwen2 or Qwen3 directory saved by transformers becomes a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import EdgesmithError
from models.hf import import_hf


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
    print(f"imported {args.src} -> {import_hf(args.src, out)}")


def register(sub) -> None:
    i = sub.add_parser("import-hf", help="import a Llama, Mistral, SmolLM, Qwen2 or Qwen3 directory saved by transformers")
    i.add_argument("src", help="the transformers directory (config.json + safetensors)")
    i.add_argument("--out", required=True, help="the checkpoint directory to write")
    i.add_argument("--force", action="store_true", help="replace --out if it exists")
    i.set_defaults(func=run)
