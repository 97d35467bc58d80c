"""`edgesmith eval`: perplexity of a checkpoint or an artifact through its own runtime.

It lives in the toolchain, not in runtimes, because it scores a corpus (toolchain.data) and, with
--reference, runs the compression quality analysis: the KLD statistics of llama-perplexity's
`--kl-divergence` (mean, median and 99th-percentile KLD, same top p, RMS Δp) with PATH through its own
runtime (so a GGUF is judged as llama.cpp runs it), and for a checkpoint the per-layer SQNR too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import runtimes
from models.errors import EdgesmithError
from runtimes.options import add_runtime_options, check_flags, describe, runtime_options
from runtimes.artifact import MANIFEST
from runtimes.text import session_tokenizer
from toolchain.compress.driver import evaluate
from toolchain.compress.quality import compare_sessions, format_kld, format_table
from toolchain.data import load_corpus, tokenize_corpus


def run(args: argparse.Namespace) -> None:
    if args.reference is not None and (Path(args.checkpoint) / MANIFEST).is_file():
        return _eval_artifact_reference(args)
    if args.reference is not None:
        if runtime_options(args):
            raise EdgesmithError("--reference: a checkpoint PATH runs in torch; the runtime flags (--threads, "
                                 "--accuracy-level, --kv-cache, --flash-attn) apply to an exported artifact")
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
          f"{r['tokens']:,} tokens of {args.data}, windows of {r['seq_len']}, both in torch)")
    print(format_kld(r))
    print("per-layer output SQNR against the reference (calibration tokens, train split):")
    print(format_table(r["layer_sqnr_db"]))


def _eval_artifact_reference(args: argparse.Namespace) -> None:
    """An artifact through its own runtime against the reference checkpoint in torch, on the same windows."""
    options = runtime_options(args)
    check_flags(args.checkpoint, options)
    session = runtimes.load(args.checkpoint, **options)
    reference = runtimes.load(args.reference, backend="torch")
    if session.vocab_size != reference.vocab_size:
        raise EdgesmithError(f"--reference {args.reference}: vocab_size {reference.vocab_size} differs from "
                             f"{args.checkpoint}'s {session.vocab_size}")
    tok = session_tokenizer(reference, args.reference)
    mine = session.tokenizer
    if mine is not None and mine.fingerprint != tok.fingerprint:
        raise EdgesmithError(f"--reference {args.reference}: tokenizer differs from {args.checkpoint}'s")
    seq_len = min(args.seq_len, session.max_seq_len, reference.max_seq_len)
    tokens = tokenize_corpus(load_corpus(args.data), tok)
    r = compare_sessions(session, reference, tokens.val, seq_len, args.max_tokens, progress=True)
    print(f"validation perplexity {r['perplexity']:.3f}  (reference {r['reference_perplexity']:.3f}; "
          f"{r['tokens']:,} tokens of {args.data}, windows of {seq_len}, through {session.backend}, "
          f"{describe(session.run_options)}; reference in torch)")
    print(format_kld(r))


def register(sub) -> None:
    e = sub.add_parser("eval", help="validation perplexity of a checkpoint or an artifact, through its runtime")
    e.add_argument("checkpoint", metavar="PATH", help="checkpoint or artifact directory")
    e.add_argument("--data", default="stdlib", help="corpus whose validation split is scored (default stdlib)")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per scored window (default 256)")
    e.add_argument("--max-tokens", type=int, default=64 * 1024, help="validation tokens scored (default 65536)")
    e.add_argument("--reference", default=None, metavar="CKPT", help="unquantized checkpoint: adds the KLD "
                   "statistics (mean, median, 99%% KLD, same top p, RMS Δp; PATH through its own runtime) and, for a "
                   "checkpoint PATH, per-layer SQNR")
    add_runtime_options(e)  # default: the configuration the artifact's export verified (its manifest)
    e.set_defaults(func=run)
