"""The `edgesmith` command: thin argparse sugar over the library.

Each subcommand builds a config, calls one library function and prints the result. Bad input is
an `EdgesmithError`: printed as one line, exit status 2. No logic lives here that a test of the
library could not reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from models.errors import EdgesmithError
from models.version import edgesmith_version
from toolchain.train.simple import TrainConfig

TRAIN_DEFAULTS = TrainConfig()


def cmd_run(args: argparse.Namespace) -> None:
    from toolchain.demo import DemoConfig, run_demo

    cfg = DemoConfig(model=args.model, data=args.data, vocab_size=args.vocab_size, out=args.out,
                     train=TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                       lr=args.lr, seed=args.seed))
    print("edgesmith run:", {k: v for k, v in vars(args).items() if k not in ("func", "command")})
    s = run_demo(cfg)
    print()
    print(f"checkpoint            {s['checkpoint']}")
    print(f"validation perplexity {s['val_perplexity']:.2f}")
    print(f"unigram baseline      {s['unigram_perplexity']:.2f}  "
          f"(model is {s['unigram_perplexity'] / s['val_perplexity']:.1f}x lower)")
    print(f"train tokens/s        {s['train_tokens_per_s']:,.0f} (median step)")
    print(f"wall time             {s['wall_s']:.0f} s")
    print("sample:")
    print(s["sample"])


def stream_text(tokenizer, ids):
    """Decode a stream of token ids into text pieces, holding back a split UTF-8 character."""
    out, printed = [], ""
    for i in ids:
        out.append(i)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(printed):]
            printed = text
    text = tokenizer.decode(out)
    if len(text) > len(printed):
        yield text[len(printed):]


def cmd_generate(args: argparse.Namespace) -> None:
    from models.checkpoint import load_checkpoint
    from runtimes.generate import generate
    from runtimes.sampling import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    ckpt = load_checkpoint(args.checkpoint)
    tok = ckpt.tokenizer
    cfg = dataclasses.replace(cfg, stop_tokens=(tok.eos_id,))
    ids = (t for t in generate(ckpt.model, [tok.bos_id, *tok.encode(args.prompt)], cfg) if t != tok.eos_id)
    sys.stdout.write(args.prompt)
    for piece in stream_text(tok, ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval(args: argparse.Namespace) -> None:
    from models.checkpoint import load_checkpoint
    from toolchain.data import load_corpus, tokenize_corpus
    from toolchain.evaluate import perplexity

    ckpt = load_checkpoint(args.checkpoint)
    seq_len = min(args.seq_len, ckpt.config.max_seq_len)
    tokens = tokenize_corpus(load_corpus(args.data), ckpt.tokenizer)
    ppl = perplexity(ckpt.model, tokens.val, seq_len, max_tokens=args.max_tokens)
    n = min(len(tokens.val) - 1, args.max_tokens) // seq_len * seq_len
    print(f"validation perplexity {ppl:.3f}  ({n:,} tokens of {args.data}, windows of {seq_len})")


def cmd_import_hf(args: argparse.Namespace) -> None:
    from models.hf import import_hf

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
    print(f"imported {args.src} -> {import_hf(args.src, out)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesmith", description="From training to a measured device benchmark.")
    p.add_argument("--version", action="version", version=f"edgesmith {edgesmith_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="train a tokenizer and a model on the embedded corpus, save and evaluate it")
    # Model
    r.add_argument("--model", default="nano", help="named size: nano, micro, small (default nano)")
    r.add_argument("--vocab-size", type=int, default=None, help="tokenizer/model vocabulary (default: the size's)")
    # Data
    r.add_argument("--data", default="stdlib", help="'stdlib' (embedded default), a text file or a folder")
    # Optimization
    r.add_argument("--steps", type=int, default=TRAIN_DEFAULTS.steps)
    r.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS.batch_size)
    r.add_argument("--seq-len", type=int, default=TRAIN_DEFAULTS.seq_len)
    r.add_argument("--lr", type=float, default=TRAIN_DEFAULTS.lr)
    r.add_argument("--seed", type=int, default=0)
    # Output
    r.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("generate", help="stream a completion from a checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="validation perplexity of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--data", default="stdlib", help="corpus whose validation split is scored (default stdlib)")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--max-tokens", type=int, default=64 * 1024)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("import-hf", help="import a Llama directory saved by transformers")
    i.add_argument("src")
    i.add_argument("--out", required=True)
    i.add_argument("--force", action="store_true", help="replace --out if it exists")
    i.set_defaults(func=cmd_import_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EdgesmithError as e:
        print(f"edgesmith: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesmith: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
