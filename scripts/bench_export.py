"""Export benchmark: export time, artifact size and parity per format and precision.

For each model size (nano, micro) it trains a checkpoint briefly on the embedded stdlib corpus
(peaked logits, so parity is about the exporter and not near-ties), makes RTN 4-bit and 8-bit
group-32 children, exports every requested format/precision `--repeat` times and prints one
table: median export seconds (parity check included), artifact MB, size relative to the fp32
export of the same format, and the parity figures from the manifest.

    python scripts/bench_export.py                         # nano + micro, all formats, 3 repeats
    python scripts/bench_export.py --sizes nano --repeat 1 --formats gguf,onnx --steps 30
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from models.llama import Transformer, config_for
from models.quant import quantize_linear_
from models.tokenizer import train_tokenizer
from toolchain.data import load_corpus
from toolchain.export import ExportConfig, export

VARIANTS = {  # name -> (checkpoint kind, precision)
    "fp32": ("float", "fp32"), "fp16": ("float", "fp16"), "int8": ("q8", "fp32"), "int4": ("q4", "fp32"),
}
FORMATS = ("gguf", "onnx", "onnx-plain", "executorch", "tensorrt")


def make_checkpoints(size: str, root: Path, steps: int) -> dict[str, Path]:
    cfg = config_for(size)
    docs = load_corpus("stdlib").train
    text = "".join(d.read() for d in docs[:200])
    tok = train_tokenizer([text], vocab_size=cfg.vocab_size, show_progress=False)
    tokens = torch.tensor(tok.encode(text[:400_000]), dtype=torch.long)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - 129, (8,), generator=g).tolist()
        w = torch.stack([tokens[s:s + 129] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    paths = {"float": save_checkpoint(model, tok, root / f"{size}-float", {"parent": None, "passes": []})}
    for bits in (8, 4):
        ckpt = load_checkpoint(paths["float"])
        quantize_linear_(ckpt.model, bits, 32)
        paths[f"q{bits}"] = save_checkpoint(ckpt.model, ckpt.tokenizer, root / f"{size}-q{bits}",
                                            child_lineage(ckpt, {"kind": "quantize", "bits": bits, "group_size": 32}))
    return paths


def run(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes.split(","):
            t0 = time.perf_counter()
            ckpts = make_checkpoints(size, root, args.steps)
            print(f"{size}: checkpoints ready in {time.perf_counter() - t0:.0f} s", flush=True)
            for fmt_name, variant in itertools.product(args.formats.split(","), args.variants.split(",")):
                kind, precision = VARIANTS[variant]
                fmt, fuse = fmt_name.removesuffix("-plain"), not fmt_name.endswith("-plain")
                times, manifest, error = [], None, None
                for _ in range(args.repeat):
                    out = root / f"{size}-{fmt_name}-{variant}"
                    t0 = time.perf_counter()
                    try:
                        manifest = export(ckpts[kind], out, ExportConfig(format=fmt, precision=precision, fuse=fuse,
                                                                         max_seq_len=args.max_seq_len, force=True),
                                          log=lambda line: None)
                    except EdgesmithError as e:
                        error = str(e)
                        break
                    times.append(time.perf_counter() - t0)
                rows.append({"size": size, "format": fmt_name, "variant": variant, "times": times,
                             "manifest": manifest, "error": error})
                print(format_row(rows[-1], rows), flush=True)
    return rows


def format_row(r: dict, rows: list[dict]) -> str:
    head = f"{r['size']:<6} {r['format']:<11} {r['variant']:<5}"
    if r["error"]:
        return f"{head} refused: {r['error'][:90]}"
    m = r["manifest"]
    mb = sum(f["bytes"] for f in m["files"].values()) / 1e6
    base = next((x for x in rows if x["size"] == r["size"] and x["format"] == r["format"] and x["variant"] == "fp32"
                 and not x["error"]), None)
    ratio = mb / (sum(f["bytes"] for f in base["manifest"]["files"].values()) / 1e6) if base else float("nan")
    p = m["parity"]
    parity = (f"{p['max_abs_logit_diff']:9.2e} {p['argmax_agreement']:6.3f} {p['greedy_matched']:>3}/{p['greedy_steps']}"
              if "max_abs_logit_diff" in p else f"skipped: {p['skipped']}")
    return f"{head} {statistics.median(r['times']):8.2f} {mb:8.2f} {ratio:6.2f}  {parity}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="nano,micro")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--variants", default="fp32,fp16,int8,int4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="training steps that make each checkpoint")
    ap.add_argument("--max-seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'size':<6} {'format':<11} {'var':<5} {'export_s':>8} {'MB':>8} {'x fp32':>6}  "
          f"{'max|dlogit|':>9} {'argmax':>6} greedy")
    run(args)
    print("export_s: median over --repeat, parity check included; x fp32: size relative to the same format's fp32")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
