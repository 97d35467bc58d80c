"""The `edgesmith` command: thin argparse sugar over the library.

Each subcommand builds a config, calls one library function and prints the result. Bad input is
an `EdgesmithError` (or an `OSError` naming its file): printed as one line, exit status 2. Anything
else is a bug of ours: one line too, exit status 1. The traceback is printed only with `--debug`
(or EDGESMITH_DEBUG=1, which the processes we start inherit). No logic lives here that a test of the
library could not reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

from models.errors import EdgesmithError
from models.version import edgesmith_version
from toolchain.train.trainer import TrainConfig

TRAIN_DEFAULTS = TrainConfig()


def cmd_run(args: argparse.Namespace) -> None:
    from toolchain.pipeline import run_pipeline, run_step_job
    from toolchain.recipe import load_recipe

    if args.step_job is not None:  # a torchrun rank of a multi-process step of a run
        return run_step_job(args.step_job)
    recipe = load_recipe(args.recipe, args.overrides)
    s = run_pipeline(recipe, args.out)
    print()
    print(s["console"])


def cmd_recipes(args: argparse.Namespace) -> None:
    from toolchain.recipe import list_recipes

    recipes = list_recipes()
    width = max(len(n) for n, _ in recipes)
    for name, description in recipes:
        print(f"{name:<{width}}  {description}")
    print("\nrun one with `edgesmith run NAME` (no name: demo); a recipe file: `edgesmith run FILE.toml`")


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


def _session_tokenizer(session, path):
    if session.tokenizer is None:
        raise EdgesmithError(f"{path}: no tokenizer.json with the <|bos|>/<|endoftext|> tokens (needed to encode text)")
    return session.tokenizer


def cmd_generate(args: argparse.Namespace) -> None:
    import runtimes
    from runtimes.sampling import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.draft_tokens is not None and args.draft is None:
        raise EdgesmithError("--draft-tokens: needs --draft PATH (the draft model that proposes them)")
    session = runtimes.load(args.checkpoint, **_kernel_options(args))
    tok = _session_tokenizer(session, args.checkpoint)
    draft = runtimes.load(args.draft) if args.draft is not None else None
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
    from kernels import check_mode

    check_mode(args.kernels, "--kernels")
    if (Path(args.checkpoint) / "manifest.json").is_file():
        raise EdgesmithError(f"--kernels: applies to a checkpoint (torch backend); {args.checkpoint} is an exported "
                             "artifact, which runs its runtime's own kernels")
    return {"kernels": args.kernels}


def cmd_eval(args: argparse.Namespace) -> None:
    import runtimes
    from toolchain.data import load_corpus, tokenize_corpus

    if args.reference is not None:
        return _eval_reference(args)
    session = runtimes.load(args.checkpoint)  # a checkpoint (torch) or any exported artifact
    seq_len = min(args.seq_len, session.max_seq_len - 1)
    tokens = tokenize_corpus(load_corpus(args.data), _session_tokenizer(session, args.checkpoint))
    n = min(len(tokens.val) - 1, args.max_tokens) // seq_len * seq_len
    if n == 0:
        raise EdgesmithError(f"--data {args.data}: evaluation needs more than {seq_len} validation tokens, "
                             f"got {len(tokens.val)}")
    # windows of seq_len + 1 tokens sharing their boundary token: seq_len predictions each
    ppl = session.perplexity(tokens.val[: n + 1], window=seq_len + 1, progress=True)
    print(f"validation perplexity {ppl:.3f}  ({n:,} tokens of {args.data}, windows of {seq_len}, "
          f"through {session.backend})")


def _eval_reference(args: argparse.Namespace) -> None:
    from toolchain.compress.driver import evaluate
    from toolchain.compress.quality import format_table

    r = evaluate(args.checkpoint, args.reference, args.data, args.seq_len, args.max_tokens)
    print(f"validation perplexity {r['perplexity']:.3f}  (reference {r['reference_perplexity']:.3f}; "
          f"{r['tokens']:,} tokens of {args.data}, windows of {r['seq_len']})")
    print(f"mean KL vs reference  {r['kl']:.3g} nats/token")
    print(f"top-1 agreement       {r['top1']:.4f}")
    print("per-layer output SQNR against the reference (calibration tokens, train split):")
    print(format_table(r["layer_sqnr_db"]))


def cmd_compress(args: argparse.Namespace) -> None:
    from toolchain.compress import parse_pass
    from toolchain.compress.driver import REPORT, compress_checkpoint
    from toolchain.compress.quality import format_table

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
    print(f"validation perplexity {q['perplexity']:.3f} (reference {q['reference_perplexity']:.3f}), "
          f"KL {q['kl']:.3g}, top-1 agreement {q['top1']:.4f}")
    print(format_table({k: (float("inf") if v is None else v) for k, v in r["layer_sqnr_db"].items()}))


def _parse_rule(text: str) -> tuple[str, str]:
    pattern, eq, value = text.rpartition("=")
    if not eq or not pattern:
        raise EdgesmithError(f"--rule {text!r}: expected REGEX=VALUE with VALUE 4, 8 or skip")
    return pattern, value


def cmd_import_hf(args: argparse.Namespace) -> None:
    from models.hf import import_hf

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
    print(f"imported {args.src} -> {import_hf(args.src, out)}")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       warmup=args.warmup, grad_accum=args.grad_accum, precision=args.precision,
                       strategy=args.strategy, grad_ckpt=args.grad_ckpt, eval_every=args.eval_every,
                       save_every=args.save_every, keep=args.keep, seed=args.seed)


def cmd_train(args: argparse.Namespace) -> None:
    from toolchain.train.run import TrainJob, run_train

    job = TrainJob(model=args.model, data=args.data, out=args.out, train=_train_config(args), nproc=args.nproc,
                   resume=args.resume)
    s = run_train(job, args.argv)
    if s is not None:
        print(f"checkpoint            {s['checkpoint']}")
        print(f"final train loss      {s['final_loss']:.4f} (step {s['steps']})")
        if s["val_perplexity"] is not None:
            print(f"validation perplexity {s['val_perplexity']:.2f}")
        print(f"train tokens/s        {s['tokens_per_s']:,.0f} (median step, {s['world_size']} rank(s))")


def cmd_finetune(args: argparse.Namespace) -> None:
    from toolchain.train.finetune import FinetuneJob, run_finetune

    job = FinetuneJob(checkpoint=args.checkpoint, data=args.data, out=args.out, train=_train_config(args),
                      rank=args.lora_rank, alpha=args.lora_alpha, targets=args.targets, qlora=args.qlora,
                      merge=args.merge, nproc=args.nproc, resume=args.resume)
    s = run_finetune(job, args.argv)
    if s is not None:
        print(f"trainable parameters  {s['trainable_params']:,} of {s['total_params']:,} (LoRA adapters)")
        print(f"final train loss      {s['final_loss']:.4f} (step {s['steps']})")
        if s["val_perplexity"] is not None:
            print(f"validation perplexity {s['val_perplexity']:.2f}")
        print(f"output                {s['output']}")


def _add_train_options(t: argparse.ArgumentParser, steps: int, lr: float, batch_size: int) -> None:
    # Optimization
    t.add_argument("--steps", type=int, default=steps)
    t.add_argument("--batch-size", type=int, default=batch_size, help="global batch in sequences "
                   "(processes x per-process batch x --grad-accum)")
    t.add_argument("--seq-len", type=int, default=TRAIN_DEFAULTS.seq_len)
    t.add_argument("--lr", type=float, default=lr)
    t.add_argument("--warmup", type=int, default=TRAIN_DEFAULTS.warmup)
    t.add_argument("--grad-accum", type=int, default=1, metavar="K")
    t.add_argument("--precision", default="fp32", help="fp32 or bf16 (autocast)")
    t.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    t.add_argument("--seed", type=int, default=0)
    # Distribution
    t.add_argument("--nproc", type=int, default=1, metavar="N", help="processes on this machine (torchrun)")
    t.add_argument("--strategy", default="ddp", help="ddp or fsdp (FSDP2 fully_shard)")
    # Monitoring and checkpoints
    t.add_argument("--eval-every", type=int, default=0, help="validation perplexity every N steps (0: at the end)")
    t.add_argument("--save-every", type=int, default=0, help="training-state checkpoint every N steps")
    t.add_argument("--keep", type=int, default=2, metavar="K", help="training-state checkpoints kept")
    t.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STATE",
                   help="continue from the newest state under --out (or the given state directory)")


def cmd_export(args: argparse.Namespace) -> None:
    from toolchain.export import ExportConfig, export

    cfg = ExportConfig(format=args.format, precision=args.precision, max_seq_len=args.max_seq_len,
                       fuse=not args.no_fuse, force=args.force, target=args.target)
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


def target_verdict(device: str, artifact, fmt: str) -> str:
    """One line: does the artifact fit the device, its decode bound, and whether the device prefers this format."""
    from devices.planner import plan
    from devices.profiles import load_profile

    profile = load_profile(device)
    p = plan(profile, str(artifact))
    fit = (f"fits ({p.total_bytes / 1e6:,.1f} MB of a {p.budget_bytes / 1e6:,.0f} MB budget at {p.context:,} "
           f"tokens)" if p.fits else f"does NOT fit ({p.total_bytes / 1e6:,.1f} MB of a {p.budget_bytes / 1e6:,.0f} "
           f"MB budget at {p.context:,} tokens; largest context that fits: {p.max_context:,})")
    prefers = "" if fmt in profile.formats else f"; {device} prefers {', '.join(profile.formats)}"
    return f"target {device:<12} {fit}, decode bound {p.decode_tok_s_bound:,.1f} tok/s{prefers}"


# ----------------------------------------------------------------------------- devices and bench (devices/)


def cmd_devices(args: argparse.Namespace) -> None:
    from devices.planner import format_plan, plan
    from devices.profiles import list_profiles, load_profile

    if args.devices_command == "list":
        for name in list_profiles():
            prof = load_profile(name) if name != "local" else None
            desc = prof.description if prof else "this machine (detected; bandwidth measured once, cached)"
            print(f"{name:<18} {(prof.kind if prof else 'desktop'):<8} {desc}")
    elif args.devices_command == "show":
        prof = load_profile(args.name)
        for key, value in prof.as_dict().items():
            print(f"{key:<20} {value}")
    else:
        print(format_plan(plan(args.device, args.model, context=args.context, bits=args.bits)))


def cmd_bench(args: argparse.Namespace) -> None:
    from devices.bench import bench, format_table, plot_results, write_results

    from tqdm import tqdm

    bar = tqdm(total=len(args.artifacts), desc=f"bench on {args.device}", unit="artifact")

    def progress(done: int, total: int, label: str) -> None:
        bar.n = done
        bar.set_postfix_str(label)
        bar.refresh()

    try:
        results = bench(args.artifacts, args.device, prompt_len=args.prompt_len, gen_len=args.gen_len,
                        repeat=args.repeat, timeout_s=args.timeout, progress=progress)
    finally:
        bar.close()
    print(format_table(results))
    if args.json:
        out = write_results(results, args.json)
        png = plot_results(results, out.with_suffix(".png"))
        print(f"wrote {out} and {png}")


def cmd_gui(args: argparse.Namespace) -> None:
    from gui.server import serve

    serve(workspace=args.workspace, host=args.host, port=args.port, auth=args.auth, max_file_size=args.max_upload)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesmith", description="From training to a measured device benchmark.")
    p.add_argument("--version", action="version", version=f"edgesmith {edgesmith_version()}")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also after the command; "
                   "or set EDGESMITH_DEBUG=1)")
    # the same flag after the command; SUPPRESS keeps a subcommand from resetting the one given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)

    r = sub.add_parser("run", help="run a recipe: train or load, compress, export, bench, report (default: demo)")
    r.add_argument("recipe", nargs="?", default="demo", metavar="RECIPE",
                   help="a bundled recipe name (see `edgesmith recipes`) or a .toml file (default: demo)")
    r.add_argument("--out", default=None, metavar="DIR", help="run directory (default runs/<recipe name>)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. source.train.steps=100, pass[0].bits=8, target.device=pixel-8")
    r.add_argument("--step-job", default=None, help=argparse.SUPPRESS)  # torchrun ranks of a multi-process step
    r.set_defaults(func=cmd_run)

    rc = sub.add_parser("recipes", help="list the bundled recipes")
    rc.set_defaults(func=cmd_recipes)

    g = sub.add_parser("generate", help="stream a completion from a checkpoint or an exported artifact")
    g.add_argument("checkpoint", metavar="PATH", help="checkpoint or artifact directory (gguf, onnx, executorch, "
                   "tensorrt)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--kernels", default=None, metavar="MODE", help="fused|reference: the torch backend's ops "
                   "(fused RMSNorm/RoPE/SwiGLU/attention/int4-int8 matmul, or the model's PyTorch; default reference)")
    # Speculative decoding
    g.add_argument("--draft", default=None, metavar="PATH", help="draft model (checkpoint or artifact, same "
                   "tokenizer) that proposes tokens the model verifies in one forward")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="K", help="tokens the draft proposes per "
                   "round (default 4)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="validation perplexity of a checkpoint or an artifact, through its runtime")
    e.add_argument("checkpoint", metavar="PATH", help="checkpoint or artifact directory")
    e.add_argument("--data", default="stdlib", help="corpus whose validation split is scored (default stdlib)")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--max-tokens", type=int, default=64 * 1024)
    e.add_argument("--reference", default=None, metavar="CKPT", help="unquantized checkpoint: adds KL, top-1 "
                   "agreement and per-layer SQNR")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compress", help="prune, factorize, distill, QAT or quantize a checkpoint")
    c.add_argument("checkpoint")
    c.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help="quantize:method=gptq,bits=4,group_size=32[,act_order=true,...], prune:method=heads,ratio=0.25, "
                        "lowrank:energy=0.9, distill:steps=300, qat:bits=4,steps=200; repeat to chain")
    c.add_argument("--rule", action="append", default=[], metavar="REGEX=VALUE",
                   help="per-layer rule, first match wins; VALUE 4, 8 or skip (e.g. --rule lm_head=8)")
    c.add_argument("--out", required=True)
    # Data
    c.add_argument("--data", default="stdlib", help="corpus: calibration from its train split, quality on validation")
    c.add_argument("--seq-len", type=int, default=128, help="calibration and evaluation window")
    c.add_argument("--max-tokens", type=int, default=32 * 1024, help="validation tokens scored")
    c.add_argument("--seed", type=int, default=0, help="calibration window choice")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.add_argument("--nproc", type=int, default=1, help="DDP ranks (torchrun) for the training passes: distill, qat")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("import-hf", help="import a Llama directory saved by transformers")
    i.add_argument("src")
    i.add_argument("--out", required=True)
    i.add_argument("--force", action="store_true", help="replace --out if it exists")
    i.set_defaults(func=cmd_import_hf)

    t = sub.add_parser("train", help="train a model (one process, or DDP/FSDP ranks through torchrun)")
    # Model and data
    t.add_argument("--model", default="nano", help="nano, micro, small or a CONFIG.json")
    t.add_argument("--data", default="stdlib", help="'stdlib' (embedded default), a text file or a folder")
    t.add_argument("--out", required=True, help="run directory: checkpoint/, state/, metrics.jsonl, loss.png")
    _add_train_options(t, TRAIN_DEFAULTS.steps, TRAIN_DEFAULTS.lr, TRAIN_DEFAULTS.batch_size)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning of a checkpoint")
    f.add_argument("checkpoint")
    f.add_argument("--data", required=True, help="a text file or a folder (or 'stdlib')")
    f.add_argument("--out", required=True, help="run directory: adapter/ or merged/, state/, metrics.jsonl")
    f.add_argument("--lora-rank", type=int, required=True, metavar="R")
    f.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="scale alpha / R (default: 2 R)")
    f.add_argument("--targets", default=None, metavar="REGEX", help="Linear names to adapt (default: every "
                   "projection of attention and MLP)")
    f.add_argument("--qlora", action="store_true", help="keep the frozen base in 4 bits (group 32)")
    f.add_argument("--merge", action="store_true", help="write a plain checkpoint with the adapters folded in")
    _add_train_options(f, 200, 1e-3, 8)
    f.set_defaults(func=cmd_finetune)

    x = sub.add_parser("export", help="export a checkpoint to onnx, executorch, gguf or tensorrt (parity-checked)")
    x.add_argument("checkpoint")
    x.add_argument("--format", required=True, help="onnx, executorch, gguf or tensorrt")
    x.add_argument("--out", required=True, help="artifact directory (files + manifest.json)")
    x.add_argument("--precision", default="fp32", help="fp32 or fp16 (quantized checkpoints keep their codes)")
    x.add_argument("--max-seq-len", type=int, default=None, metavar="N", help="KV cache length (default: the model's)")
    x.add_argument("--no-fuse", action="store_true", help="onnx: plain standard-op graph instead of contrib ops")
    x.add_argument("--target", default=None, metavar="DEVICE", help="device profile the artifact is for: recorded "
                   "in the manifest, and the planner says whether it fits (see `edgesmith devices list`)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("devices", help="device profiles and the memory / roofline planner")
    dsub = d.add_subparsers(dest="devices_command", required=True, metavar="SUBCOMMAND")
    add_device_parser = dsub.add_parser
    dsub.add_parser = lambda *a, **k: add_device_parser(*a, parents=[common], **k)
    dsub.add_parser("list", help="the bundled device profiles, and local")
    ds = dsub.add_parser("show", help="one profile's specs and sources")
    ds.add_argument("name", help="profile name, local, or a profile .toml")
    dp = dsub.add_parser("plan", help="does a model fit on a device, and its decode / prefill bounds")
    dp.add_argument("device", help="profile name, local, or a profile .toml")
    dp.add_argument("--model", required=True, help="checkpoint or artifact directory, nano/micro/small, or "
                    "llama-2-7b, tinyllama-1.1b, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b")
    dp.add_argument("--context", type=int, default=None, metavar="N", help="tokens in the KV cache (default: "
                    "the model's max_seq_len, at most 4096)")
    dp.add_argument("--bits", type=int, default=None, metavar="B", help="weight bits: 4, 8, 16 or 32 (default: "
                    "as stored when quantized, else the device's recommended precision)")
    d.set_defaults(func=cmd_devices)

    b = sub.add_parser("bench", help="time artifacts on a device (local, a profile, ssh:// or adb://)")
    b.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="exported artifact directories")
    b.add_argument("--device", default="local", help="local, a profile name, ssh://user@host[:port] or "
                   "adb://SERIAL (default local)")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--gen-len", type=int, default=128)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds per device command")
    b.add_argument("--json", default=None, metavar="OUT", help="write the results here (and a plot next to it)")
    b.set_defaults(func=cmd_bench)

    ui = sub.add_parser("gui", help="the Gradio app: every step in a browser (binds 127.0.0.1 by default)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--workspace", default=".", metavar="DIR", help="the only directory the app reads and writes "
                    "(default: the current directory)")
    ui.add_argument("--auth", default=None, metavar="USER:PASS", help="require a login (or set EDGESMITH_GUI_AUTH, "
                    "which keeps the password out of the process list)")
    ui.add_argument("--max-upload", default="100mb", metavar="SIZE", help="largest upload, e.g. 20mb (default 100mb)")
    ui.set_defaults(func=cmd_gui)
    return p


def debugging() -> bool:
    return os.environ.get("EDGESMITH_DEBUG", "").lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    debug = args.debug or debugging()
    if debug:
        os.environ["EDGESMITH_DEBUG"] = "1"  # torchrun ranks, jobs and bench agents print theirs too
    else:
        quiet_library_warnings()
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("edgesmith: interrupted", file=sys.stderr)
        return 130
    except (EdgesmithError, OSError) as e:  # bad input, a missing or unreadable file: the user's to fix
        if debug:
            traceback.print_exc()
        print(f"edgesmith: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, and how to get the rest
        if debug:
            traceback.print_exc()
        print(f"edgesmith: internal error: {type(e).__name__}: {one_line(e)}"
              + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1
    return 0


# Library log lines that say nothing to a user of this CLI: torchao's CUDA-only extensions that do not
# load on a CPU machine, and a pytree deprecation raised by torchao's own import. Shown with --debug.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_library_warnings() -> None:
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


if __name__ == "__main__":
    sys.exit(main())
