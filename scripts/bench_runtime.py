"""Runtime benchmark: every backend behind the Session API, with llama.cpp and optimum anchors.

A random-weight Llama (default ~245 M parameters: dim 1024, 16 layers, 16/4 heads, ffn 2816,
vocab 32000, max_seq_len 1024) is saved as a float checkpoint and as its RTN 4-bit group-32 child
(our `rtn` pass), and exported with our exporters (GGUF F16 and Q4_0, fused ONNX fp32 and 4-bit
MatMulNBits, ExecuTorch fp32 and 8da4w). Random weights give nearly flat logits whose near-ties
would make the exporters' parity checks coin tosses, so the head is scaled up (LOGIT_SCALE): the
logits are peaked, every shape and every byte moved per token is the same.

Each row runs in its own subprocess (so its peak RSS is its own: scripts/bench_runtime_worker.py, run
through `devices.bench.run_json` as `edgesmith bench` runs its agent) with the bench agent's harness
(`devices.agent`): greedy argmax over the logits the runtime returns, medians over `--repeats`:

- prefill tok/s of a `--prompt-len` (512) token prompt, and TTFT = that prefill + the first argmax;
- decode tok/s over `--decode-tokens` (128) tokens after a 128-token prompt, and after a
  `--long-context` (896) token prompt: their ratio shows what a growing KV cache costs;
- weight bandwidth achieved in decode: bytes of Linear weights read per token (lm_head included;
  the embedding row and the KV cache excluded) x decode tok/s, as a share of this machine's
  bandwidth measured first with `devices.measure` (median of torch sums over a large fp32 tensor).

Anchors in the same run: llama.cpp itself (llama-cpp-python's `Llama`, flash attention on, one
thread per core) on the same GGUF files, Q4_0 and F16, and on llama.cpp's own quantizations of our F16
F32 file (`llama_model_quantize` Q4_0 and Q4_K_M, its defaults; their bytes per token read from the file);
optimum's ONNX export of the same float
checkpoint run with `ORTModelForCausalLM`, in fp32 and quantized by ONNX Runtime's own
`MatMulNBitsQuantizer` (4 bits, block 32, symmetric, accuracy_level 4: what a user of optimum would
pick). The last table prints the ratios the issue sets targets for. Speculative decoding (fp32 ONNX
target, its 4-bit artifact as draft) reports acceptance and speedup.

    python scripts/bench_runtime.py                 # full size, all rows (run on an idle machine)
    python scripts/bench_runtime.py --small         # dim 256, 4 layers, vocab 4096: proves it works
    python scripts/bench_runtime.py --rows ort-int4,llama-q4-anchor --repeats 5
    python scripts/bench_runtime.py --layers 24 --kv-heads 8 --rows torch-int4,llama-q4-own-anchor --profile 8

Torch rows run the checkpoint as `runtimes.load` does (fused kernels by default; `-ref` rows: `--kernels
reference`); `--profile N` adds torch.profiler's top ops over N decode steps at the long context.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.bench import run_json  # noqa: E402
from devices.measure import measure_bandwidth  # noqa: E402
from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint  # noqa: E402
from models.errors import EdgesmithError  # noqa: E402
from models.llama import ModelConfig, Transformer  # noqa: E402
from models.tokenizer import train_tokenizer  # noqa: E402
from runtimes.options import describe  # noqa: E402
from runtimes.session import cpu_cores  # noqa: E402
from toolchain.compress import Context, apply, parse_pass  # noqa: E402
from toolchain.export import ExportConfig, export  # noqa: E402

WORKER = Path(__file__).resolve().with_name("bench_runtime_worker.py")

LOGIT_SCALE = 25.0
Q4_0, NBITS_Q4, XNNPACK_Q4 = 18 / 32, (16 + 4) / 32, (16 + 2) / 32  # bytes per weight (NBITS: fp32 scales)

LANES_Q4 = (16 + 4) / 32  # the torch int4 kernel's form: packed nibbles + fp32 group scales
# key -> (label, kind, artifact, session options, bytes per Linear weight; None: read from the GGUF file)
ROWS = {
    "torch": ("torch fp32 (default: fused)", "session", "ckpt", {}, 4),
    "torch-ref": ("torch fp32 --kernels reference", "session", "ckpt", {"kernels": "reference"}, 4),
    "torch-int4": ("torch int4 (default: fused)", "session", "ckpt-q4", {}, LANES_Q4),
    "torch-int4-ref": ("torch int4 --kernels reference", "session", "ckpt-q4", {"kernels": "reference"}, 4),
    "torch-compile": ("torch fp32 (compiled decode)", "session", "ckpt", {"compile": True, "kernels": "reference"}, 4),
    "ort-fp32": ("onnxruntime fp32 fused", "session", "onnx", {}, 4),
    # the artifacts' own defaults ({}: the manifest's runtime_options, as `edgesmith bench`/generate run them)
    "ort-int4": ("onnxruntime int4 (default: acc=4)", "session", "onnx-q4", {}, NBITS_Q4),
    "ort-int4-acc0": ("onnxruntime int4 acc=0 (exact)", "session", "onnx-q4", {"accuracy_level": 0}, NBITS_Q4),
    "et-fp32": ("executorch fp32 (xnnpack)", "session", "executorch", {}, 4),
    "et-int4": ("executorch 8da4w (xnnpack)", "session", "executorch-q4", {}, XNNPACK_Q4),
    "llama-f16": ("llamacpp session F16 (default)", "session", "gguf-f16", {}, 2),
    "llama-q4": ("llamacpp session Q4_0 (default)", "session", "gguf-q4", {}, Q4_0),
    "llama-q4-nofa": ("llamacpp session Q4_0 --flash-attn off", "session", "gguf-q4", {"flash_attn": False}, Q4_0),
    "llama-f16-anchor": ("anchor: llama.cpp F16", "llama", "gguf-f16", {}, 2),
    "llama-q4-anchor": ("anchor: llama.cpp Q4_0", "llama", "gguf-q4", {}, Q4_0),
    # llama.cpp's own quantizer (llama_model_quantize) on our F32 GGUF, run by llama.cpp itself
    "llama-q4-own-anchor": ("anchor: llama.cpp own Q4_0", "llama", "gguf-q4-own", {}, None),
    "llama-q4km-own-anchor": ("anchor: llama.cpp own Q4_K_M", "llama", "gguf-q4km-own", {}, None),
    "optimum-fp32-anchor": ("anchor: optimum ORT fp32", "optimum", "optimum", {}, 4),
    "optimum-int4-anchor": ("anchor: optimum ORT int4", "optimum", "optimum-q4", {}, NBITS_Q4),
}
DEFAULT_ROWS = [k for k in ROWS if k not in ("torch-compile", "torch-ref", "torch-int4-ref", "llama-q4-nofa")]
OWN_QUANT = {"gguf-q4-own": "LLAMA_FTYPE_MOSTLY_Q4_0", "gguf-q4km-own": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
SIZES = {"full": dict(dim=1024, layers=16, heads=16, kv_heads=4, ffn=2816, vocab=32000),
         "small": dict(dim=256, layers=4, heads=8, kv_heads=4, ffn=768, vocab=4096)}


# ----------------------------------------------------------------------------- machine and model


def linear_weights(c: dict) -> int:
    hd = c["dim"] // c["heads"]
    per_layer = c["dim"] * hd * (2 * c["heads"] + 2 * c["kv_heads"]) + 3 * c["dim"] * c["ffn"]
    return c["layers"] * per_layer + c["dim"] * c["vocab"]


def make_checkpoints(c: dict, root: Path) -> dict[str, Path]:
    cfg = ModelConfig(vocab_size=c["vocab"], dim=c["dim"], n_layers=c["layers"], n_heads=c["heads"],
                      n_kv_heads=c["kv_heads"], ffn_dim=c["ffn"], max_seq_len=c["max_seq_len"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    text = "".join(Path(json.__file__).parent.joinpath(n).read_text() for n in ("decoder.py", "encoder.py"))
    tok = train_tokenizer([text], vocab_size=min(512, c["vocab"]), show_progress=False)
    paths = {"ckpt": save_checkpoint(model, tok, root / "float", {"parent": None, "passes": []})}
    ckpt = load_checkpoint(paths["ckpt"])
    spec = "quantize:method=rtn,bits=4,group_size=32"
    q4 = apply(ckpt.model, parse_pass(spec), Context())
    paths["ckpt-q4"] = save_checkpoint(q4, tok, root / "q4", child_lineage(ckpt, {"kind": "quantize", "spec": spec}))
    print(f"model: {model.num_params() / 1e6:.1f} M parameters, {linear_weights(c) / 1e6:.1f} M in Linears",
          flush=True)
    return paths


def export_optimum(ckpt: Path, out: Path, quantize: bool) -> Path:
    from optimum.exporters.onnx import main_export  # optional anchor: only its rows need optimum

    main_export(str(ckpt), output=str(out), task="text-generation-with-past", do_validation=False)
    if quantize:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(out / "model.onnx")), bits=4, block_size=32, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        for f in out.glob("model.onnx*"):
            f.unlink()
        q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    return out


def quantize_with_llamacpp(source: Path, out: Path, ftype: str, S: int) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`, its defaults: Q6_K output for Q4_0) on our F32 GGUF
    of the float checkpoint; a directory with the file and the two manifest fields the llama.cpp anchor reads."""
    import ctypes

    import llama_cpp as lc

    manifest = json.loads((source / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, ftype)
    params.nthread = cpu_cores()
    rc = lc.llama_model_quantize(str(source / manifest["entry"]).encode(), str(out / "model.gguf").encode(),
                                 ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} returned {rc}")
    (out / "manifest.json").write_text(json.dumps({"entry": "model.gguf", "options": {"max_seq_len": S},
                                                   "quantized_by": f"llama_model_quantize {ftype}"}))
    return out


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the 2-D weights a decoded token reads from a GGUF artifact (the token embedding excluded)."""
    import gguf

    entry = json.loads((path / "manifest.json").read_text())["entry"]
    reader = gguf.GGUFReader(str(path / entry))
    return sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2 and t.name != "token_embd.weight")


def make_artifacts(needed: set[str], ckpts: dict[str, Path], root: Path, S: int) -> dict[str, Path]:
    plan = {"onnx": ("ckpt", ExportConfig("onnx", max_seq_len=S)),
            "onnx-q4": ("ckpt-q4", ExportConfig("onnx", max_seq_len=S)),
            "executorch": ("ckpt", ExportConfig("executorch", max_seq_len=S)),
            "executorch-q4": ("ckpt-q4", ExportConfig("executorch", max_seq_len=S)),
            "gguf-f16": ("ckpt", ExportConfig("gguf", precision="fp16", max_seq_len=S)),
            "gguf-f32": ("ckpt", ExportConfig("gguf", precision="fp32", max_seq_len=S)),
            "gguf-q4": ("ckpt-q4", ExportConfig("gguf", max_seq_len=S))}
    paths = dict(ckpts)
    if needed & set(OWN_QUANT) and not (root / "gguf-f32" / "manifest.json").is_file():
        needed = needed | {"gguf-f32"}  # the source of llama.cpp's own quantizations
    for name in sorted(needed - set(paths), key=lambda n: n in OWN_QUANT):  # gguf-f32 before its quantizations
        t0 = time.perf_counter()
        if name in OWN_QUANT:
            paths[name] = quantize_with_llamacpp(root / "gguf-f32", root / name, OWN_QUANT[name], S)
        elif name.startswith("optimum"):
            paths[name] = export_optimum(ckpts["ckpt"], root / name, quantize=name.endswith("q4"))
        else:
            source, cfg = plan[name]
            export(ckpts[source], root / name, cfg, log=lambda line: None)
            paths[name] = root / name
        print(f"  exported {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


# ----------------------------------------------------------------------------- the rows (each in a worker)


def in_subprocess(spec: dict, timeout: int) -> dict:
    """One row in a fresh process (scripts/bench_runtime_worker.py); its JSON result, or the error in one line."""
    try:
        return run_json([sys.executable, str(WORKER), json.dumps(spec)], timeout, f"row {spec['kind']}")
    except EdgesmithError as e:
        return {"error": str(e)[:200]}


# ----------------------------------------------------------------------------- report


def row_mb(key: str, c: dict, paths: dict) -> float:
    """MB of weights read per decoded token by row `key` (GGUF rows of llama.cpp's own quantizations: from the file)."""
    bpw, art = ROWS[key][4], ROWS[key][2]
    return gguf_weight_bytes(paths[art]) / 1e6 if bpw is None else linear_weights(c) * bpw / 1e6


def print_tables(results: dict, c: dict, bandwidth: float, bandwidth_1: float, spec_result: dict | None,
                 paths: dict) -> None:
    print(f"\nmachine: {bandwidth:.1f} GB/s streaming bandwidth with {c['threads']} threads "
          f"({bandwidth_1:.1f} GB/s with 1); load average {os.getloadavg()[0]:.2f}")
    head = (f"{'row':<30} {'W MB/tok':>8} {'load s':>6} {'prefill tok/s':>13} {'TTFT ms':>8} {'decode tok/s':>12} "
            f"{'@' + str(c['long_context']):>8} {'long/short':>10} {'RSS MB':>7} {'+loaded':>7} {'GB/s':>6} "
            f"{'of bw':>6}  ran with")
    print(head)
    print("-" * len(head))
    for key, r in results.items():
        label, mb = ROWS[key][0], row_mb(key, c, paths)
        if "error" in r:
            print(f"{label:<30} {mb:>8.1f}  failed: {r['error']}")
            continue
        gbs = mb * r["decode_tok_s"] / 1e3
        print(f"{label:<30} {mb:>8.1f} {r['load_s']:>6.1f} {r['prefill_tok_s']:>13.1f} {r['ttft_ms']:>8.1f} "
              f"{r['decode_tok_s']:>12.1f} {r['decode_long_tok_s']:>8.1f} "
              f"{r['decode_long_tok_s'] / r['decode_tok_s']:>10.2f} {r['peak_rss_mb']:>7.0f} "
              f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>7.0f} {gbs:>6.1f} {gbs / bandwidth:>6.0%}  "
              f"{describe(r.get('run_options') or {})}")
        for line in r.get("profile", []):
            print(f"    {line}")

    def rate(key, field="decode_tok_s"):
        r = results.get(key) or {}
        return r.get(field)

    print("\nratios (decode tok/s unless said; target from the issue in brackets)")
    checks = [("onnxruntime int4 (default) / llama.cpp Q4_0", rate("ort-int4"), rate("llama-q4-anchor"), ">= 1.3", 1.3),
              ("onnxruntime int4 (default) / llama.cpp own Q4_0", rate("ort-int4"), rate("llama-q4-own-anchor"),
               ">= 1.3", 1.3),
              ("optimum int4 / llama.cpp Q4_0", rate("optimum-int4-anchor"), rate("llama-q4-anchor"), "about 0.7",
               None),
              ("torch int4 (default) / llama.cpp own Q4_0", rate("torch-int4"), rate("llama-q4-own-anchor"), ">= 0.5",
               0.5),
              ("torch int4 (default) / llama.cpp Q4_0 (our GGUF)", rate("torch-int4"), rate("llama-q4-anchor"), "-",
               None),
              ("torch fp32 / llama.cpp own Q4_0", rate("torch"), rate("llama-q4-own-anchor"), "-", None),
              ("llama.cpp Q4_0: our GGUF / its own quantizer", rate("llama-q4-anchor"), rate("llama-q4-own-anchor"),
               "-", None),
              ("llamacpp session Q4_0 @896 / @128", rate("llama-q4", "decode_long_tok_s"), rate("llama-q4"),
               ">= 0.85", 0.85),
              ("llama.cpp Q4_0 @896 / @128 (anchor)", rate("llama-q4-anchor", "decode_long_tok_s"),
               rate("llama-q4-anchor"), "-", None),
              ("llamacpp session Q4_0 / llama.cpp Q4_0", rate("llama-q4"), rate("llama-q4-anchor"), "about 1", None),
              ("llamacpp session F16 / llama.cpp F16", rate("llama-f16"), rate("llama-f16-anchor"), "about 1", None),
              ("executorch 8da4w / llama.cpp Q4_0", rate("et-int4"), rate("llama-q4-anchor"), "-", None),
              (f"onnxruntime int4 @{c['long_context']} / @128", rate("ort-int4", "decode_long_tok_s"), rate("ort-int4"),
               ">= 0.85", 0.85),
              (f"onnxruntime fp32 @{c['long_context']} / @128", rate("ort-fp32", "decode_long_tok_s"), rate("ort-fp32"),
               ">= 0.85", 0.85),
              (f"optimum int4 @{c['long_context']} / @128", rate("optimum-int4-anchor", "decode_long_tok_s"),
               rate("optimum-int4-anchor"), "about 0.5", None),
              ("onnxruntime int4 prefill / llama.cpp Q4_0 prefill", rate("ort-int4", "prefill_tok_s"),
               rate("llama-q4-anchor", "prefill_tok_s"), "-", None)]
    for name, a, b, target, floor in checks:
        if a is None or b is None:
            print(f"  {name:<50} (not measured)")
            continue
        verdict = "" if floor is None else ("  met" if a / b >= floor else "  NOT met")
        print(f"  {name:<50} {a / b:6.2f}   [{target}]{verdict}")
    for key, name in (("torch", "torch fp32 (default)"), ("ort-int4", "onnxruntime int4 (default)")):
        if key in results and "error" not in results[key]:
            frac = row_mb(key, c, paths) * results[key]["decode_tok_s"] / 1e3 / bandwidth
            print(f"  {name + ': share of the bandwidth roofline':<50} {frac:6.2f}   [>= 0.6]"
                  f"  {'met' if frac >= 0.6 else 'NOT met'}")
    if spec_result:
        if "error" in spec_result:
            print(f"\nspeculative decoding: failed: {spec_result['error']}")
        else:
            print(f"\nspeculative decoding (onnxruntime fp32 target, its int4 acc=4 artifact as draft, k=4, greedy, "
                  f"{c['decode_tokens']} tokens): output identical to plain greedy: {spec_result['identical']}, "
                  f"acceptance {spec_result['acceptance']:.1%}, {spec_result['tokens_per_target_forward']:.2f} "
                  f"tokens per target forward, {spec_result['plain_tok_s']:.1f} -> "
                  f"{spec_result['speculative_tok_s']:.1f} "
                  f"tok/s, speedup {spec_result['speedup']:.2f}x")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Model
    p.add_argument("--small", action="store_true", help="dim 256, 4 layers, vocab 4096 (a quick check)")
    for name in SIZES["full"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=1024)
    # Measurement
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma list of: {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=None, help="threads for every row (default: one per core)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--long-context", type=int, default=896)
    p.add_argument("--bandwidth-gib", type=float, default=None,
                   help="size of the bandwidth probe (default 1, small 0.25)")
    p.add_argument("--no-speculative", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="torch rows: torch.profiler over N decode "
                   "steps at --long-context; onnxruntime rows: its own profiler at 128 and at --long-context; top "
                   "ops printed under the row")
    p.add_argument("--keep", default=None, metavar="DIR", help="build (or reuse) checkpoints and artifacts here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    p.add_argument("--json", default=None, metavar="FILE", help="write the rows' results here as each one ends")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown row {unknown[0]!r}; allowed: {', '.join(ROWS)}")
    c = {k: getattr(args, k) if getattr(args, k) is not None else v
         for k, v in SIZES["small" if args.small else "full"].items()}
    c.update(max_seq_len=args.max_seq_len, threads=args.threads or cpu_cores(), long_context=args.long_context,
             decode_tokens=args.decode_tokens)
    if args.long_context + args.decode_tokens > args.max_seq_len or args.prompt_len > args.long_context:
        sys.exit("--long-context + --decode-tokens must fit --max-seq-len, and --prompt-len <= --long-context")
    print("bench_runtime:", vars(args), flush=True)
    gib = args.bandwidth_gib or (0.25 if args.small else 1.0)
    bandwidth, bandwidth_1 = measure_bandwidth(c["threads"], gib) / 1e9, measure_bandwidth(1, gib) / 1e9  # GB/s
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_runtime-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ckpts = ({"ckpt": root / "float", "ckpt-q4": root / "q4"} if (root / "q4" / "edgesmith.json").is_file()
                 else make_checkpoints(c, root))
        needed = {ROWS[r][2] for r in rows} | ({"onnx", "onnx-q4"} if not args.no_speculative else set())
        existing = {n: root / n for n in needed
                    if (root / n / "manifest.json").is_file() or (root / n / "config.json").is_file()}
        paths = {**existing, **make_artifacts(needed - set(existing), ckpts, root, args.max_seq_len)}
        print(f"checkpoints and artifacts ready in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {}
        for key in (bar := tqdm(rows, desc="rows", unit="row")):
            bar.set_postfix_str(key)
            label, kind, art, options, _ = ROWS[key]
            spec = {"kind": kind, "path": str(paths[art]), "options": options, "threads": c["threads"],
                    "vocab": c["vocab"], "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
                    "long_context": args.long_context, "repeats": args.repeats, "profile": args.profile}
            results[key] = r = in_subprocess(spec, args.timeout)
            tqdm.write(f"{key}: " + (r["error"] if "error" in r else
                                     f"decode {r['decode_tok_s']:.1f} @{args.long_context} {r['decode_long_tok_s']:.1f} "
                                     f"prefill {r['prefill_tok_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                                     f"load average {os.getloadavg()[0]:.2f}"))
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        spec_result = None
        if not args.no_speculative:
            spec_result = in_subprocess({"kind": "speculative", "path": str(paths["onnx"]),
                                         "draft": str(paths["onnx-q4"]), "threads": c["threads"], "vocab": c["vocab"],
                                         "decode_tokens": args.decode_tokens}, args.timeout)
        print_tables(results, c, bandwidth, bandwidth_1, spec_result, paths)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
