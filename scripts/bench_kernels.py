"""Fused kernels against the unfused eager chain of ops they replace (same run, medians, ratios).

    python scripts/bench_kernels.py                 # CPU table (+ the GPU table when CUDA is available)
    python scripts/bench_kernels.py --quick         # smaller shapes, fewer repeats (a smoke run)
    python scripts/bench_kernels.py --no-compile    # skip the torch.compile column

CPU: for each kernel, `eager` is the reference chain (what an unfused model runs),
`compiled` is that chain under torch.compile (the other fused-CPU option; measured so the choice of
a C++ library is a measurement, not a guess), `fused` is torch.ops.edgesmith.* (kernels/cpu.py). The
weight-only matmul also gets `fp32 linear`: the float matmul of the already dequantized weight (what
the torch runtime does with --kernels reference).

GPU (CUDA only, a few minutes): Triton vs eager for every kernel, achieved GB/s against the measured
device copy bandwidth (target >= 70 % for RMSNorm, SwiGLU, RoPE, int4 gemv), and flash attention
prefill TFLOP/s against torch SDPA at sequence 2048, head dim 64 and 128 (target >= 0.8x SDPA).
Shapes default to a ~1B Llama layer (dim 2048, 32 heads / 8 KV heads of 64, ffn 5632).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import runtimes  # noqa: E402
from kernels import cpu, ops, reference  # noqa: E402
from models.checkpoint import child_lineage, save_checkpoint  # noqa: E402
from models.llama import ModelConfig, Transformer, apply_rope  # noqa: E402
from models.quant import dequantize, quantize_linear_, quantize_rtn  # noqa: E402
from models.tokenizer import train_tokenizer  # noqa: E402


def median_s(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- eager chains (the model's code)


def eager_add_rms_norm(x, r, w, eps=1e-5):
    h = x + r
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h


def eager_attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def cases(a, device: str, dtype):
    """[(name, {impl: fn}, bytes moved by the fused kernel, flops)] for one set of shapes."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    D, H, Hkv, T, S, C, FF = a.head_dim, a.heads, a.kv_heads, a.prefill, a.ctx, a.dim, a.ffn
    es = torch.tensor(0, dtype=dtype).element_size()
    out = []
    x, r, w = rnd(T, C), rnd(T, C), rnd(C)
    out.append(("rms_norm+residual", {"eager": lambda: eager_add_rms_norm(x, r, w),
                                      "fused": lambda: torch.ops.edgesmith.add_rms_norm(x, r, w, 1e-5)},
                4 * T * C * es, 0))
    qv = rnd(1, T, H, D).transpose(1, 2)
    cos, sin = rnd(T, D), rnd(T, D)
    out.append(("rope (q, in place)", {"eager": lambda: qv.copy_(apply_rope(qv, cos, sin)),
                                       "fused": lambda: torch.ops.edgesmith.rope_(qv, cos, sin)},
                2 * qv.numel() * es, 0))
    gt, up = rnd(T, FF), rnd(T, FF)
    out.append(("swiglu", {"eager": lambda: F.silu(gt) * up, "fused": lambda: torch.ops.edgesmith.swiglu(gt, up)},
                3 * T * FF * es, 0))
    q, k, v = rnd(1, H, T, D), rnd(1, Hkv, T, D), rnd(1, Hkv, T, D)
    out.append((f"flash prefill T={T}", {"eager": lambda: eager_attention(q, k, v, None),
                                         "fused": lambda: torch.ops.edgesmith.flash_attention(q, k, v, None, D**-0.5)},
                (q.numel() * 2 + k.numel() * 2) * es, 2 * 2 * H * T * T * D))
    q1, kc, vc = rnd(1, H, 1, D), rnd(1, Hkv, a.max_seq, D), rnd(1, Hkv, a.max_seq, D)
    pos = torch.tensor([S - 1], device=device)
    mask = (torch.arange(a.max_seq, device=device) <= pos).view(1, 1, 1, -1)
    out.append((f"decode attn {S}/{a.max_seq}", {
        "eager": lambda: eager_attention(q1, kc, vc, mask),
        "fused": lambda: torch.ops.edgesmith.decode_attention(q1, kc, vc, pos, D**-0.5)},
        2 * Hkv * S * D * es, 4 * H * S * D))
    for bits in (4, 8):
        qw, sc = quantize_rtn(torch.randn(FF, C, generator=g), bits, 32)
        qw, sc = qw.to(device), sc.to(device)
        wf = dequantize(qw, sc, dtype)
        xv = rnd(1, C)
        out.append((f"int{bits} gemv {FF}x{C}", {
            "eager": lambda qw=qw, sc=sc, xv=xv: F.linear(xv, dequantize(qw, sc, dtype)),
            "fp32 linear": lambda wf=wf, xv=xv: F.linear(xv, wf),
            "fused": lambda qw=qw, sc=sc, xv=xv, b=bits: torch.ops.edgesmith.weight_only_matmul(xv, qw, sc, b)},
            FF * C * bits // 8 + sc.numel() * 2 + C * es, 2 * FF * C))
    return out


# ----------------------------------------------------------------------------- CPU


def bench_cpu(a) -> None:
    if not cpu.available():
        print(f"fused CPU library unavailable: {cpu.unavailable_reason()}")
        return
    print(f"CPU: {torch.get_num_threads()} threads, flags {' '.join(cpu.compile_flags())}")
    head = f"{'kernel':28s} {'eager ms':>10s} {'compiled ms':>12s} {'fused ms':>10s} {'eager/fused':>12s} " \
           f"{'compiled/fused':>15s}  other"
    print(head)
    print("-" * len(head))
    with torch.inference_mode():
        for name, fns, _, _ in cases(a, "cpu", torch.float32):
            t = {k: median_s(fn, a.repeat) for k, fn in fns.items()}
            if a.compile and "rope" not in name:  # compiling an in-place copy_ of a view: not a fair chain
                compiled = torch.compile(fns["eager"], dynamic=False)
                t["compiled"] = median_s(compiled, a.repeat, warmup=2)
            comp = t.get("compiled")
            other = "  ".join(f"{k} {v * 1e3:.3f} ms ({v / t['fused']:.2f}x)" for k, v in t.items()
                              if k not in ("eager", "fused", "compiled"))
            print(f"{name:28s} {t['eager'] * 1e3:10.3f} {comp * 1e3 if comp else float('nan'):12.3f} "
                  f"{t['fused'] * 1e3:10.3f} {t['eager'] / t['fused']:11.2f}x "
                  f"{comp / t['fused'] if comp else float('nan'):14.2f}x  {other}")


# ----------------------------------------------------------------------------- GPU


def cuda_time(fn, repeat: int) -> float:
    from triton.testing import do_bench  # lazily: triton is optional (only the GPU table needs it)

    return do_bench(fn, warmup=25, rep=max(50, repeat * 10)) / 1e3  # ms -> s


def copy_bandwidth() -> float:
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / cuda_time(lambda: y.copy_(x), 20)


def bench_gpu(a) -> None:
    if ops.triton_module() is None:
        print(f"GPU: {ops.triton_unavailable_reason()}")
        return
    bw = copy_bandwidth()
    print(f"\nGPU: {torch.cuda.get_device_name()}, measured copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    head = f"{'kernel':28s} {'eager ms':>10s} {'triton ms':>10s} {'speedup':>8s} {'GB/s':>8s} {'% copy bw':>10s} {'TFLOP/s':>8s}"
    print(head)
    print("-" * len(head))
    with torch.inference_mode():
        for name, fns, nbytes, flops in cases(a, "cuda", torch.bfloat16):
            te, tf = cuda_time(fns["eager"], a.repeat), cuda_time(fns["fused"], a.repeat)
            print(f"{name:28s} {te * 1e3:10.4f} {tf * 1e3:10.4f} {te / tf:7.2f}x {nbytes / tf / 1e9:8.0f} "
                  f"{100 * nbytes / tf / bw:9.0f}% {flops / tf / 1e12 if flops else float('nan'):8.1f}")
        for D in (64, 128):
            B, H, T = 4, 2048 // D, 2048
            q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
            ts = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), a.repeat)
            tf = cuda_time(lambda: torch.ops.edgesmith.flash_attention(q, k, v, None, D**-0.5), a.repeat)
            print(f"flash vs SDPA T=2048 D={D:<4d}  SDPA {flops / ts / 1e12:6.1f} TFLOP/s  triton {flops / tf / 1e12:6.1f} "
                  f"TFLOP/s  = {ts / tf:.2f}x SDPA (target >= 0.8x)")


def bench_model(a) -> None:
    """End to end: the torch runtime's decode with --kernels reference vs fused, float and RTN 4-bit.

    A random-weight Llama of the shapes above (`--model-layers` layers), saved as a checkpoint and as
    its 4-bit group-32 child; each decodes `--decode` tokens after a `--ctx`-token prompt through
    `runtimes.load(ckpt, kernels=...)`. Reference mode dequantizes 4-bit weights at load (a float
    matmul per step); fused mode keeps the codes and runs the weight-only kernel."""
    cfg = ModelConfig(vocab_size=32000, dim=a.dim, n_layers=a.model_layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                      ffn_dim=a.ffn, max_seq_len=a.max_seq)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    text = "".join(Path(json.__file__).parent.joinpath(n).read_text() for n in ("decoder.py", "encoder.py"))
    tok = train_tokenizer([text], vocab_size=512, show_progress=False)  # ids only; the model's vocab stays 32000
    with tempfile.TemporaryDirectory() as tmp:
        f32 = save_checkpoint(model, tok, Path(tmp) / "f32", child_lineage(None, {"kind": "random"}))
        quantize_linear_(model, 4, 32)
        q4 = save_checkpoint(model, tok, Path(tmp) / "q4", child_lineage(None, {"kind": "rtn", "bits": 4}))
        del model
        prompt = torch.randint(0, cfg.vocab_size, (a.ctx,)).tolist()
        print(f"\ntorch runtime decode, {sum(p.numel() for p in Transformer(cfg).parameters()) / 1e6:.0f} M "
              f"parameters, {a.decode} tokens after a {a.ctx}-token prompt (median ms/token)")
        rows = {}
        for name, ckpt in (("fp32", f32), ("int4 g32", q4)):
            for mode in ("reference", "fused"):
                s = runtimes.load(ckpt, kernels=mode)
                s.prefill(prompt)
                tok, times = prompt[-1], []
                for _ in range(a.decode):
                    t0 = time.perf_counter()
                    logits = s.decode(tok)
                    times.append(time.perf_counter() - t0)
                    tok = int(torch.as_tensor(logits).reshape(-1).argmax())
                rows[name, mode] = statistics.median(times[3:])
                del s
        print(f"{'weights':<10} {'reference':>10} {'fused':>10} {'ref/fused':>10}")
        for name in ("fp32", "int4 g32"):
            r, f = rows[name, "reference"], rows[name, "fused"]
            print(f"{name:<10} {r * 1e3:10.2f} {f * 1e3:10.2f} {r / f:9.2f}x")
        print(f"int4 fused vs fp32 reference: {rows['fp32', 'reference'] / rows['int4 g32', 'fused']:.2f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--prefill", type=int, default=256, help="tokens of a prefill (elementwise rows, flash T)")
    p.add_argument("--ctx", type=int, default=1024, help="live keys of the decode step")
    p.add_argument("--max-seq", type=int, default=2048, help="static cache length")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--quick", action="store_true", help="dim 512, ffn 1536, 8/4 heads, prefill 64, ctx 256/512")
    p.add_argument("--model-layers", type=int, default=0, metavar="L",
                   help="also time the torch runtime end to end on an L-layer model of these shapes")
    p.add_argument("--decode", type=int, default=32, help="decode steps of the end-to-end timing")
    a = p.parse_args(argv)
    if a.quick:
        a.dim, a.ffn, a.heads, a.kv_heads, a.prefill, a.ctx, a.max_seq, a.repeat = 512, 1536, 8, 4, 64, 256, 512, 10
    print("bench_kernels:", {k: v for k, v in vars(a).items()})
    bench_cpu(a)
    if a.model_layers:
        bench_model(a)
    if torch.cuda.is_available():
        bench_gpu(a)
    else:
        print("\nGPU: no CUDA device here; the GPU figures (GB/s, TFLOP/s, vs SDPA) are open.")


if __name__ == "__main__":
    main()
