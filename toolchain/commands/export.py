"""`edgesmith export`: a checkpoint to one format, parity-checked in its runtime."""

from __future__ import annotations

import argparse

from devices.planner import target_verdict
from models.registry import FORMATS
from toolchain.export import ExportConfig, export
from toolchain.export.spec import PRECISIONS


def run(args: argparse.Namespace) -> None:
    cfg = ExportConfig(format=args.format, precision=args.precision, max_seq_len=args.max_seq_len,
                       fuse=not args.no_fuse, exact=args.exact,
                       portable_embedding=args.portable_embedding, force=args.force, target=args.target)
    m = export(args.checkpoint, args.out, cfg)
    total = sum(f["bytes"] for f in m["files"].values())
    print(f"exported {args.checkpoint} -> {args.out} ({m['format']}, {m['precision']}, {total / 1e6:.2f} MB, "
          f"{m['export_s']:.1f} s)")
    p = m["parity"]
    if "skipped" in p:
        print(f"parity                skipped: {p['skipped']}")
    else:
        print(f"parity ({p['runtime']})  max |logit diff| {p['max_abs_logit_diff']:.3g}, argmax agreement "
              f"{p['argmax_agreement']:.3f} over {p['positions']} positions, greedy {p['greedy_matched']}/"
              f"{p['greedy_steps']}")
    if cfg.target:
        print(target_verdict(cfg.target, args.out, m["format"]))


def register(sub) -> None:
    formats = FORMATS.names()
    x = sub.add_parser("export", help=f"export a checkpoint to {', '.join(formats)} (parity-checked)")
    x.add_argument("checkpoint", help="the checkpoint directory (or a transformers directory of another decoder)")
    x.add_argument("--format", required=True, help=", ".join(formats))
    x.add_argument("--out", required=True, help="artifact directory (files + manifest.json)")
    x.add_argument("--precision", default="fp32", help=f"{' or '.join(PRECISIONS)} (quantized checkpoints keep "
                   "their codes)")
    x.add_argument("--max-seq-len", type=int, default=None, metavar="N", help="KV cache length (default: the model's)")
    x.add_argument("--no-fuse", action="store_true", help="onnx: plain standard-op graph instead of contrib ops")
    x.add_argument("--exact", action="store_true", help="executorch: keep codes XNNPACK's int4 kernel cannot hold "
                   "with one more plane per Linear (slower) instead of clamping them")
    x.add_argument("--portable-embedding", action="store_true", help="executorch: a quantized token embedding as a "
                   "lookup in portable ops, for a runtime built without ExecuTorch's quantized kernels")
    x.add_argument("--target", default=None, metavar="DEVICE", help="device profile the artifact is for: recorded "
                   "in the manifest, and the planner says whether it fits (see `edgesmith devices list`)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=run)
