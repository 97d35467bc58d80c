"""`edgesmith compress`: a chain of passes (quantize, prune, lowrank, distill, qat) on a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import EdgesmithError
from models.registry import METHODS
from toolchain.compress import parse_pass, pass_kinds
from toolchain.compress.driver import REPORT, compress_checkpoint
from toolchain.compress.quality import format_table


def run(args: argparse.Namespace) -> None:
    rules = [_parse_rule(r) for r in args.rule]
    passes = [parse_pass(spec, rules) for spec in args.passes]
    r = compress_checkpoint(args.checkpoint, args.out, passes, data=args.data, calib_seq_len=args.seq_len,
                            eval_seq_len=args.seq_len, eval_tokens=args.max_tokens, seed=args.seed, force=args.force,
                            nproc=args.nproc, argv=args.argv)
    if r is None:  # --nproc: the launcher, or a rank other than 0 (rank 0 prints)
        return
    for w in (w for p in r["passes"] for w in p["report"].get("warnings", [])):
        print(f"warning: {w}")
    for p in r["passes"]:
        b, a = p["before"], p["after"]
        name = p["kind"] + (f" {p['config']['method']}" if "method" in p["config"] else "")
        print(f"{name:<18} params {b['params'] / 1e6:.3f} M -> {a['params'] / 1e6:.3f} M, size {b['size_mb']:.3f} -> "
              f"{a['size_mb']:.3f} MB, perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f}  ({p['seconds']:.1f} s)")
        if p["report"].get("note"):
            print(f"  note: {p['report']['note']}")
    q = r["quality"]
    print(f"compressed {args.checkpoint} -> {args.out} in {r['seconds']:.1f} s (report: {Path(args.out) / REPORT})")
    print(f"validation perplexity {q['perplexity']:.3f} (reference {q['reference_perplexity']:.3f}), mean KLD "
          f"{q['kl']:.3g}, 99% KLD {q.get('kld_p99', float('nan')):.3g}, same top p {100 * q['top1']:.2f} %")
    print(format_table({k: (float("inf") if v is None else v) for k, v in r["layer_sqnr_db"].items()}))


def _parse_rule(text: str) -> tuple[str, str]:
    pattern, eq, value = text.rpartition("=")
    if not eq or not pattern:
        raise EdgesmithError(f"--rule {text!r}: expected REGEX=VALUE with VALUE 4, 5, 8 or skip")
    return pattern, value


def register(sub) -> None:
    c = sub.add_parser("compress", help="prune, factorize, distill, QAT or quantize a checkpoint")
    c.add_argument("checkpoint", help="the checkpoint directory to compress")
    c.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help=f"KIND:key=value,...; KIND one of {', '.join(pass_kinds())} (quantize methods: "
                        f"{', '.join(METHODS.names())}); e.g. quantize:method=gptq,bits=4,group_size=32, "
                        "prune:method=heads,ratio=0.25, lowrank:energy=0.9, distill:steps=300, qat:bits=4,steps=200; "
                        "repeat to chain")
    c.add_argument("--rule", action="append", default=[], metavar="REGEX=VALUE",
                   help="per-layer rule, first match wins; VALUE 4, 5, 8 or skip (e.g. --rule lm_head=8)")
    c.add_argument("--out", required=True, help="the compressed checkpoint's directory")
    # Data
    c.add_argument("--data", default="stdlib", help="corpus: calibration from its train split, quality on validation")
    c.add_argument("--seq-len", type=int, default=128, help="calibration and evaluation window")
    c.add_argument("--max-tokens", type=int, default=32 * 1024, help="validation tokens scored")
    c.add_argument("--seed", type=int, default=0, help="calibration window choice")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.add_argument("--nproc", type=int, default=1, help="DDP ranks (torchrun) for the training passes: distill, qat")
    c.set_defaults(func=run)
