"""`edgesmith eval`: perplexity of a checkpoint or an artifact through its own runtime.

It lives in the toolchain, not in runtimes, because it scores a corpus (toolchain.data) and, with
--reference, runs the compression quality analysis (KL, top-1, per-layer SQNR).
"""

from __future__ import annotations

import argparse

import runtimes
from models.errors import EdgesmithError
from runtimes.options import add_runtime_options, check_flags, describe, runtime_options
from runtimes.text import session_tokenizer
from toolchain.compress.driver import evaluate
from toolchain.compress.quality import format_table
from toolchain.data import load_corpus, tokenize_corpus


def run(args: argparse.Namespace) -> None:
    if args.reference is not None:
        if runtime_options(args):
            raise EdgesmithError("--reference: compares two checkpoints in torch; the runtime flags (--threads, "
                                 "--accuracy-level, --kv-cache, --flash-attn) apply to an artifact without it")
        return _eval_reference(args)
    options = runtime_options(args)
    check_flags(args.checkpoint, options)
    session = runtimes.load(args.checkpoint, **options)  # a checkpoint (torch) or any exported artifact
    seq_len = min(args.seq_len, session.max_seq_len - 1)
    tokens = tokenize_corpus(load_corpus(args.data), session_tokenizer(session, args.checkpoint))
    n = min(len(tokens.val) - 1, args.max_tokens) // seq_len * seq_len
    if n == 0:
        raise EdgesmithError(f"--data {args.data}: evaluation needs more than {seq_len} validation tokens, "
                             f"got {len(tokens.val)}")
    # windows of seq_len + 1 tokens sharing their boundary token: seq_len predictions each
    ppl = session.perplexity(tokens.val[: n + 1], window=seq_len + 1, progress=True)
    print(f"validation perplexity {ppl:.3f}  ({n:,} tokens of {args.data}, windows of {seq_len}, "
          f"through {session.backend}, {describe(session.run_options)})")


def _eval_reference(args: argparse.Namespace) -> None:
    r = evaluate(args.checkpoint, args.reference, args.data, args.seq_len, args.max_tokens)
    print(f"validation perplexity {r['perplexity']:.3f}  (reference {r['reference_perplexity']:.3f}; "
          f"{r['tokens']:,} tokens of {args.data}, windows of {r['seq_len']})")
    print(f"mean KL vs reference  {r['kl']:.3g} nats/token")
    print(f"top-1 agreement       {r['top1']:.4f}")
    print("per-layer output SQNR against the reference (calibration tokens, train split):")
    print(format_table(r["layer_sqnr_db"]))


def register(sub) -> None:
    e = sub.add_parser("eval", help="validation perplexity of a checkpoint or an artifact, through its runtime")
    e.add_argument("checkpoint", metavar="PATH", help="checkpoint or artifact directory")
    e.add_argument("--data", default="stdlib", help="corpus whose validation split is scored (default stdlib)")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per scored window (default 256)")
    e.add_argument("--max-tokens", type=int, default=64 * 1024, help="validation tokens scored (default 65536)")
    e.add_argument("--reference", default=None, metavar="CKPT", help="unquantized checkpoint: adds KL, top-1 "
                   "agreement and per-layer SQNR")
    add_runtime_options(e)  # default: the configuration the artifact's export verified (its manifest)
    e.set_defaults(func=run)
