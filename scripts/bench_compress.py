"""Compression that shrinks the model: method -> parameters, size, perplexity, decode tok/s, one run.

Trains a model with the trainer (micro by default) on the embedded corpus, then applies each recipe of
passes (prune magnitude / 2:4 / heads / channels / layers, low-rank, distillation, RTN and QAT) to a
copy, with calibration from the train split and the unpruned model as the distillation teacher, and
scores every result on the same validation tokens. Rows with `+ distill` are the same pruned model
trained further against the teacher: compare them with the row above (pruning alone).

Columns: parameters (quantized codes counted one per weight); size MB as deployed (2 bytes per float
parameter, b/8 per code + 2 per fp16 group scale: GGUF F16 / Q4_0 sizes; low-rank factors as ONNX /
ExecuTorch keep them); zeros = share of all stored 2-D weights (embedding and head included) that are
exactly zero; perplexity and its ratio to the float model; greedy decode tokens/s on the torch runtime
(runtimes/generate.py, static KV cache, median of --repeats round-robin rounds; quantized Linears
dequantized once at load, as the torch runtime loads a checkpoint) and its ratio to the float model
measured in the same run. A nano / micro model decodes in about a millisecond per token, where
per-op overhead rather than FLOPs dominates: expect structured pruning's speed-up to show on larger
models more than on these.

Honest notes printed with the table: unstructured and 2:4 zeros are stored dense, so neither size nor
CPU speed changes; 2:4 pays off only on TensorRT's sparse tensor cores (Ampere+ GPUs, Jetson Orin).
The torch runtime dequantizes 4-bit weights at load, so quantization shows in size, not in its speed
(llama.cpp / ONNX Runtime run the codes: see bench_quant.py / bench_export.py).

    python scripts/bench_compress.py                    # micro, 1500 + 200-step passes (tens of minutes idle)
    python scripts/bench_compress.py --small            # nano, short runs: proves it works in a few minutes
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.llama import Transformer, config_for  # noqa: E402
from models.quant import QuantizedLinear, replace_module_  # noqa: E402
from runtimes.generate import generate  # noqa: E402
from runtimes.sampling import GenerationConfig  # noqa: E402
from toolchain.compress import Context, apply, calibration_tokens, parse_pass  # noqa: E402
from toolchain.compress.driver import deployed_bytes  # noqa: E402
from toolchain.compress.quality import compare  # noqa: E402
from toolchain.data import load_corpus, tokenize_corpus  # noqa: E402
from toolchain.demo import cached_tokenizer  # noqa: E402
from toolchain.train.trainer import TrainConfig, train  # noqa: E402


def recipes(distill: str, qat: str) -> list[tuple[str, list[str], str]]:
    """(label, passes, note). `distill` / `qat` are the training passes' specs."""
    structured = ["prune:method=heads,ratio=0.25", "prune:method=channels,ratio=0.25"]
    return [
        ("prune magnitude 50%", ["prune:method=magnitude,ratio=0.5"], "zeros stored dense: no runtime here gains"),
        ("prune 2:4", ["prune:method=2:4"], "dense CPU: no gain; TensorRT sparse TC (Ampere+/Orin) only"),
        ("prune 2:4 + distill", ["prune:method=2:4", distill], "zeros kept through training"),
        ("prune heads 25%", ["prune:method=heads,ratio=0.25"], "KV groups: KV cache shrinks too"),
        ("prune channels 25%", ["prune:method=channels,ratio=0.25"], ""),
        ("prune layers 1/3", ["prune:method=layers,ratio=0.34"], ""),
        ("prune layers 1/3 + distill", ["prune:method=layers,ratio=0.34", distill], ""),
        ("prune heads+channels 25%", structured, ""),
        ("prune heads+channels + distill", [*structured, distill], ""),
        ("lowrank budget 60%", ["lowrank:budget=0.6"], "GGUF multiplies factors back"),
        ("lowrank budget 60% + distill", ["lowrank:budget=0.6", distill], ""),
        ("rtn 4-bit", ["quantize:method=rtn,bits=4"], "torch runtime dequantizes at load"),
        ("qat 4-bit", [qat], "codes = fake-quant codes, 0 added error"),
        ("heads+channels + distill + qat", [*structured, distill, qat], "the DESIGN.md recipe shape"),
    ]


def _dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """What the torch runtime runs: weight-only quantized Linears as float Linears holding scale * code."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is QuantizedLinear and m.act_bits is None:  # a tied head keeps reading its table
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            lin.weight = torch.nn.Parameter(m.dequantize(torch.float32), requires_grad=False)
            replace_module_(model, name, lin)
    return model.eval()


def decode_rate(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> float:
    """Greedy decode tokens/s of one run (the first token excluded: it is the prefill's)."""
    stamps = [time.perf_counter() for _tok in generate(model, prompt, GenerationConfig(max_new_tokens=new_tokens))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_tok_s(models: list[torch.nn.Module], prompt: list[int], new_tokens: int, repeats: int) -> list[float]:
    """Median decode tokens/s of each model, measured round-robin (every round runs every model once),
    so a change in machine load hits all rows alike instead of whichever ran at the time."""
    runnable = [_dequantized(m) for m in models]
    for m in runnable:  # warm-up
        decode_rate(m, prompt, new_tokens)
    rates = [[] for _ in runnable]
    for _ in range(repeats):
        for i, m in enumerate(runnable):
            rates[i].append(decode_rate(m, prompt, new_tokens))
    return [statistics.median(r) for r in rates]


def zero_share(model: torch.nn.Module) -> float:
    weights = [p for p in model.parameters() if p.dim() == 2]
    return sum(int((p == 0).sum()) for p in weights) / max(1, sum(p.numel() for p in weights))


def n_params(model: torch.nn.Module) -> int:
    codes = [m for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "bits")]
    return model.num_params() + sum(m.qweight.numel() for m in codes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="micro")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--steps", type=int, default=1500, help="training steps of the base model")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=32 * 1024)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 avoids OpenMP spin on shared cores)")
    ap.add_argument("--only", default=None, metavar="SUBSTR", help="run only the rows whose label contains this")
    ap.add_argument("--small", action="store_true",
                    help="nano, 150 steps, 30-step passes, 8K eval tokens: a quick check")
    args = ap.parse_args()
    if args.small:
        args.model, args.steps, args.distill_steps, args.qat_steps = "nano", 150, 30, 30
        args.eval_tokens, args.decode_tokens, args.repeats = 8 * 1024, 64, 5
    print("bench_compress:", vars(args))
    torch.set_num_threads(args.threads)
    cfg = config_for(args.model)
    corpus = load_corpus(args.data)
    tok = cached_tokenizer(corpus, cfg.vocab_size)
    tokens = tokenize_corpus(corpus, tok)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, _ = train(Transformer(cfg), tokens.train, None,
                     TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len))
    model.eval()
    print(f"trained {args.model} {args.steps} steps in {time.perf_counter() - t0:.0f} s")
    calib = calibration_tokens(tokens.train, args.n_calib, args.seq_len, seed=0)
    prompt = [tok.bos_id] + [int(t) for t in tokens.val[:15]]
    train_fields = f"batch_size=8,seq_len={args.seq_len},eval_tokens={min(args.eval_tokens, 16384)}"
    distill = f"distill:steps={args.distill_steps},{train_fields}"
    qat = f"qat:bits=4,steps={args.qat_steps},{train_fields}"

    def row(label, m, secs, note, extra=""):
        ppl = compare(m, None, tokens.val, args.seq_len, args.eval_tokens)["perplexity"]
        return [label, n_params(m), deployed_bytes(m) / 1e6, zero_share(m), ppl, None, secs, (note + extra).strip("; ")]

    rows, models = [row("float", model, 0.0, "")], [model]
    for label, specs, note in recipes(distill, qat):
        if args.only and args.only not in label:
            continue
        m, t, extra = copy.deepcopy(model), time.perf_counter(), ""
        for spec in specs:
            ctx = Context(tokenizer=tok, calibration=calib, reference=model, train_tokens=tokens.train,
                          val_tokens=tokens.val)
            m = apply(m, parse_pass(spec), ctx)
            changes = ctx.report.get("config_changes") or {}
            extra += "".join(f"; {k.removesuffix('_override')} {a}->{b}"
                             for k, (a, b) in changes.items() if a is not None)
            if spec.startswith("distill") and ctx.report.get("recovered") is not None:
                extra += f"; recovered {ctx.report['recovered']:.0%} of the ppl gap"
        rows.append(row(label, m, time.perf_counter() - t, note, extra))
        models.append(m)
        print(f"  done: {label} ({rows[-1][-2]:.0f} s)", flush=True)
    print(f"decode speed: {len(models)} models x {args.repeats} rounds ...", flush=True)
    for r, tps in zip(rows, decode_tok_s(models, prompt, args.decode_tokens, args.repeats)):
        r[5] = tps
    base = rows[0]
    print(f"\n{args.model}, {args.steps} training steps, {args.eval_tokens:,} validation tokens of {args.data}, "
          f"windows of {args.seq_len}; decode: {args.decode_tokens} greedy tokens, {args.threads} thread(s), "
          f"median of {args.repeats} round-robin rounds")
    print(f"{'method':<32} {'params M':>8} {'size MB':>8} {'zeros':>6} {'ppl':>9} {'ppl x':>6} {'tok/s':>7} "
          f"{'tok/s x':>7} {'pass s':>7}  note")
    for label, params, mb, zeros, ppl, tps, secs, note in rows:
        print(f"{label:<32} {params / 1e6:>8.3f} {mb:>8.3f} {zeros:>6.1%} {ppl:>9.3f} {ppl / base[4]:>6.3f} "
              f"{tps:>7.0f} {tps / base[5]:>7.2f} {secs:>7.0f}  {note}")
    print("\nnotes: magnitude / 2:4 zeros are stored dense -- same size, and dense CPU kernels (PyTorch, ONNX Runtime,"
          "\nllama.cpp, ExecuTorch/XNNPACK) run them at the same speed; only TensorRT's sparse tensor cores (Ampere+"
          "\nGPUs, Jetson Orin) exploit 2:4. Structured pruning and low-rank remove weights and FLOPs for real.")


if __name__ == "__main__":
    main()
