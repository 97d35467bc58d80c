"""`edgesmith generate` (a streamed completion from a checkpoint or any exported artifact) and `edgesmith verify`
(check artifacts and checkpoints without running them: a verdict per file, exit 0 or 2)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from kernels import MODES, check_mode
from models.errors import EdgesmithError
from runtimes.artifact import MANIFEST
from runtimes.loader import artifact_formats, load
from runtimes.options import add_runtime_options, check_flags, runtime_options
from runtimes.sampling import GenerationConfig
from runtimes.text import session_tokenizer, stream_text
from runtimes.verify import Verdict, verify


def generate(args: argparse.Namespace) -> None:
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.draft_tokens is not None and args.draft is None:
        raise EdgesmithError("--draft-tokens: needs --draft PATH (the draft model that proposes them)")
    options = runtime_options(args)
    check_flags(args.checkpoint, options)
    session = load(args.checkpoint, **options, **_kernel_options(args))
    tok = session_tokenizer(session, args.checkpoint)
    draft = load(args.draft) if args.draft is not None else None
    cfg = dataclasses.replace(cfg, stop_tokens=(tok.eos_id,))
    stream = session.generate([tok.bos_id, *tok.encode(args.prompt)], cfg, draft=draft,
                              draft_tokens=4 if args.draft_tokens is None else args.draft_tokens)
    ids = (t for t in stream if t != tok.eos_id)
    sys.stdout.write(args.prompt)
    for piece in stream_text(tok, ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if draft is not None:
        print(f"{session.backend} + draft {draft.backend}: {session.stats.summary()}", file=sys.stderr)


def _kernel_options(args: argparse.Namespace) -> dict:
    """`--kernels` for the torch backend (a checkpoint); an exported artifact runs its format's own kernels."""
    if args.kernels is None:
        return {}
    check_mode(args.kernels, "--kernels")
    if (Path(args.checkpoint) / MANIFEST).is_file():
        raise EdgesmithError(f"--kernels: applies to a checkpoint (torch backend); {args.checkpoint} is an exported "
                             "artifact, which runs its runtime's own kernels")
    return {"kernels": args.kernels}


def run_verify(args: argparse.Namespace) -> None:
    verdicts = [verify(p) for p in args.paths]
    if args.json:
        print(json.dumps([verdict_json(v) for v in verdicts], indent=2))
    else:
        for i, v in enumerate(verdicts):
            print(("\n" if i else "") + format_verdict(v))
    bad = [str(v.path) for v in verdicts if not v.ok]
    if bad:
        raise EdgesmithError(f"verify: {len(bad)} of {len(verdicts)} paths failed: {', '.join(bad)}")


def format_verdict(v: Verdict) -> str:
    """The verdict as a user reads it: one line per file, then the directory's verdict."""
    width = max((len(c.file) for c in v.checks), default=0)
    prefix = f"{v.path}/"
    lines = [f"{v.path} — {v.kind}"]
    for c in v.checks:
        detail = c.detail.replace(prefix, "") if not c.ok else c.detail
        lines.append(f"  {'ok' if c.ok else 'FAILED':<7} {c.file:<{width}}  {detail}")
    failed = v.failures()
    lines.append(f"verdict: ok ({len(v.checks)} checks)" if v.ok else
                 f"verdict: FAILED ({len(failed)} of {len(v.checks)}: {', '.join(c.file for c in failed)})")
    return "\n".join(lines)


def verdict_json(v: Verdict) -> dict:
    return {"path": str(v.path), "kind": v.kind, "ok": v.ok,
            "checks": [{"file": c.file, "ok": c.ok, "detail": c.detail} for c in v.checks]}


def register(sub) -> None:
    g = sub.add_parser("generate", help="stream a completion from a checkpoint or an exported artifact")
    g.add_argument("checkpoint", metavar="PATH", help=f"checkpoint or artifact directory "
                   f"({', '.join(artifact_formats())})")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample within the smallest set of probability P")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the logits of tokens already "
                   "seen (default 1.0: off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--kernels", default=None, metavar="MODE", help=f"{'|'.join(MODES)}: the torch backend's ops "
                   "(fused RMSNorm/RoPE/SwiGLU/attention/int4-int8 matmul, or the model's exact PyTorch; default "
                   "fused where the fused CPU library builds, else reference)")
    # Runtime (default: the configuration the artifact's export verified, recorded in its manifest)
    add_runtime_options(g)
    # Speculative decoding
    g.add_argument("--draft", default=None, metavar="PATH", help="draft model (checkpoint or artifact, same "
                   "tokenizer) that proposes tokens the model verifies in one forward")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="tokens the draft proposes per "
                   "round (default 4)")
    g.set_defaults(func=generate)

    v = sub.add_parser("verify", help="check artifacts and checkpoints without running them (manifest, "
                       "confinement, sizes, sha256, format headers, tokenizer, config against the tensors)")
    v.add_argument("paths", nargs="+", metavar="PATH", help="artifact or checkpoint directories")
    v.add_argument("--json", action="store_true", help="print the verdicts as JSON instead of a table")
    v.set_defaults(func=run_verify)
