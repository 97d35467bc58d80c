"""Quantization quality: method x bits against size, perplexity, KL and top-1 agreement, one run.

Trains a model with the plain trainer (micro by default) on the embedded corpus, then applies every
method at 4 and 8 bits (group 32) with calibration from the train split, and scores each on the same
validation tokens against the float model. Every method's default rule quantizes the token embedding
too (round to nearest, at the method's bits), as llama.cpp's Q4_0 / Q8_0 do. Size MB is what the
weights take deployed: b/8 bytes per code + 2 bytes per group scale for quantized Linears and the
quantized embedding, 2 bytes (fp16) for every float tensor — exactly GGUF Q4_0 / Q8_0 / F16 sizes.
Anchor rows (llama.cpp's own quantizer on the F16 GGUF of the same model, perplexity through
llama.cpp on the same windows) need the `gguf` and llama-cpp-python packages; when either is
missing the table is printed without them, saying so. Our best 4-bit goes through llama.cpp twice:
as written (token_embd Q4_0 from our codes) and with its embedding put back to float (token_embd
F16), so the embedding's share of size and perplexity shows; the last line checks the issue's target
(no more perplexity than Q4_K_M, at no larger size).

    python scripts/bench_quant.py                                   # micro, 1500 steps (a few minutes idle)
    python scripts/bench_quant.py --model nano --steps 100 --eval-tokens 8192   # a quick check
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.llama import Transformer, config_for  # noqa: E402
from models.quant import QuantizedEmbedding, QuantizedLinear, replace_module_  # noqa: E402
from toolchain.compress import Context, apply, calibration_tokens, parse_pass  # noqa: E402
from toolchain.compress.quality import compare  # noqa: E402
from toolchain.data import load_corpus, tokenize_corpus  # noqa: E402
from toolchain.demo import cached_tokenizer  # noqa: E402
from toolchain.export.formats.gguf import write_gguf  # noqa: E402
from toolchain.train.trainer import TrainConfig, train  # noqa: E402

SPECS = [f"quantize:method={m},bits={b},group_size=32" for b in (8, 4) for m in ("rtn", "gptq", "awq", "smoothquant")]


def deployed_mb(model: torch.nn.Module) -> float:
    total, seen = 0.0, set()
    for m in model.modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            if id(m.qweight) not in seen:  # a tied head reads the embedding's table: counted once
                seen.add(id(m.qweight))
                total += m.qweight.numel() * m.bits / 8 + m.scales.numel() * 2
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * 2
    return total / 1e6


def llama_cpp_ppl(path: Path, tokens: np.ndarray, seq_len: int, max_tokens: int) -> float:
    from llama_cpp import Llama  # optional, as in anchor_rows
    llm = Llama(model_path=str(path), n_ctx=seq_len, logits_all=True, n_threads=1, verbose=False)
    n_windows = min(len(tokens) - 1, max_tokens) // seq_len
    nll, count = 0.0, 0
    for w in range(n_windows):
        win = [int(t) for t in tokens[w * seq_len: w * seq_len + seq_len + 1]]
        llm.reset()
        llm.eval(win[:-1])
        logits = torch.from_numpy(np.asarray(llm.scores[:seq_len], dtype=np.float32))
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(win[1:]), reduction="sum").item()
        count += seq_len
    return math.exp(nll / count)


def anchor_rows(model, best4, tokenizer, val, args) -> list[tuple]:
    """llama.cpp Q8_0 / Q4_0 / Q4_K_M of the F16 GGUF, and our best 4-bit as GGUF, through llama.cpp."""
    import llama_cpp  # optional: the anchor rows are left out where llama-cpp-python is missing

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "f16.gguf"
        write_gguf(f16, model, tokenizer, "fp16", args.seq_len)
        rows.append(("llama.cpp F16", f16.stat().st_size / 1e6, llama_cpp_ppl(f16, val, args.seq_len, args.eval_tokens)))
        for name, ftype in (("Q8_0", 7), ("Q4_0", 2), ("Q4_K_M", 15)):
            out = Path(tmp) / f"{name}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize {name} failed")
            rows.append((f"llama.cpp {name}", out.stat().st_size / 1e6, llama_cpp_ppl(out, val, args.seq_len, args.eval_tokens)))
        float_embd = copy.deepcopy(best4[1])
        replace_module_(float_embd, "embed_tokens", copy.deepcopy(model.embed_tokens))
        for label, q in ((f"ours {best4[0]} as GGUF, token_embd F16", float_embd),
                         (f"ours {best4[0]} as GGUF", best4[1])):
            out = Path(tmp) / "ours.gguf"
            write_gguf(out, q, tokenizer, "fp16", args.seq_len)
            rows.append((label, out.stat().st_size / 1e6, llama_cpp_ppl(out, val, args.seq_len, args.eval_tokens)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="micro")
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=64 * 1024)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 avoids OpenMP spin on shared cores)")
    ap.add_argument("--no-anchors", action="store_true")
    args = ap.parse_args()
    print("bench_quant:", vars(args))
    torch.set_num_threads(args.threads)
    cfg = config_for(args.model)
    corpus = load_corpus(args.data)
    tok = cached_tokenizer(corpus, cfg.vocab_size)
    tokens = tokenize_corpus(corpus, tok)
    torch.manual_seed(0)
    model = Transformer(cfg)
    t0 = time.perf_counter()
    model, _ = train(model, tokens.train, None, TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len))
    print(f"trained {args.model} {args.steps} steps in {time.perf_counter() - t0:.0f} s")
    model.eval()
    calib = calibration_tokens(tokens.train, args.n_calib, args.seq_len, seed=0)
    base = compare(model, None, tokens.val, args.seq_len, args.eval_tokens)
    rows = [("float (fp16 size)", deployed_mb(model), base["perplexity"], 0.0, 1.0, 0.0)]
    best4 = None
    for spec in SPECS + ["quantize:method=kv_int8"]:
        q = copy.deepcopy(model)
        t = time.perf_counter()
        apply(q, parse_pass(spec), Context(tokenizer=tok, calibration=calib, reference=model))
        secs = time.perf_counter() - t
        r = compare(q, model, tokens.val, args.seq_len, args.eval_tokens)
        label = spec.removeprefix("quantize:method=").replace(",group_size=32", "")
        rows.append((label, deployed_mb(q), r["perplexity"], r["kl"], r["top1"], secs))
        if ",bits=4" in spec and "smoothquant" not in spec and (best4 is None or r["kl"] < best4[2]):
            best4 = (label, q, r["kl"])
    print(f"\n{args.model}, {base['tokens']:,} validation tokens of {args.data}, windows of {args.seq_len}, "
          f"calibration {args.n_calib} x {args.seq_len} train tokens")
    print(f"{'method':<28} {'size MB':>8} {'ppl':>9} {'ppl ratio':>9} {'KL':>9} {'top-1':>7} {'quant s':>8}")
    for label, mb, ppl, kl, top1, secs in rows:
        print(f"{label:<28} {mb:>8.3f} {ppl:>9.3f} {ppl / base['perplexity']:>9.4f} {kl:>9.2e} {top1:>7.4f} {secs:>8.1f}")
    if args.no_anchors:
        print("\nanchor rows: skipped (--no-anchors)")
        return
    try:
        anchors = anchor_rows(model, best4, tok, tokens.val, args)
    except ImportError as e:
        print(f"\nanchor rows: not available ({e}); the gguf or llama-cpp-python package is missing")
        return
    print("\nanchor rows (llama.cpp perplexity on the same windows; size = file bytes)")
    for label, mb, ppl in anchors:
        print(f"{label:<44} {mb:>8.3f} {ppl:>9.3f} {ppl / base['perplexity']:>9.4f}")
    k_m, ours = next(r for r in anchors if r[0] == "llama.cpp Q4_K_M"), anchors[-1]
    met = ours[2] <= k_m[2] and ours[1] <= k_m[1]
    print(f"\ntarget (ours as GGUF Q4_0: ppl <= Q4_K_M's, size <= Q4_K_M's): ppl {ours[2]:.3f} vs {k_m[2]:.3f}, "
          f"size {ours[1]:.3f} vs {k_m[1]:.3f} MB: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
