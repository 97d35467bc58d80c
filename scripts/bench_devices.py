"""Devices benchmark: the planner's decode bounds against published measurements, and `edgesmith
bench` over the nano artifacts of every format on this machine with their roofline fractions.

On paper (no hardware needed): for each published figure, the decode bound of the device profile
(bandwidth / bytes read per token: every Linear at the published run's precision, lm_head
included, plus the fp16 KV cache at the benchmark's context) next to the measurement, and the
implied efficiency. A bound below a published figure would mean the profile is wrong.

- llama.cpp on a Raspberry Pi 5, TinyLlama-1.1B Q8_0: about 9 tok/s (llama.cpp Q8_0 runs on the
  Pi 5 reported by the community, e.g. https://github.com/ggml-org/llama.cpp/discussions/4167);
- MLC INT4 (q4f16) on Jetson Orin Nano Super: Llama-3.2-3B 43.1 tok/s, Llama-3.1-8B 19.1 tok/s
  (https://developer.nvidia.com/blog/nvidia-jetson-orin-nano-developer-kit-gets-a-super-boost/);
- ExecuTorch on a OnePlus 12, Llama-3.2-1B SpinQuant (4-bit group-32 Linears, 8-bit per-channel
  head) 50.2 tok/s decode, and BF16 19.2 tok/s, prompt length 64
  (https://github.com/pytorch/executorch/blob/main/examples/models/llama/README.md, "Performance").

On this machine: a random-weight nano model (head scaled so that greedy parity is decisive, as in
bench_runtime.py) exported to GGUF (F32 and Q4_0), ONNX (fp32 and int4 MatMulNBits) and ExecuTorch
(fp32); TensorRT is skipped where `tensorrt` does not import. Each artifact runs in a fresh
process through `devices.bench.bench(..., "local")`.

    python scripts/bench_devices.py                 # paper + local, prompt 128, generate 128, 5 runs
    python scripts/bench_devices.py --quick         # prompt 32, generate 32, 3 runs
    python scripts/bench_devices.py --paper-only
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devices.bench import bench, format_table, plot_results, write_results  # noqa: E402
from devices.planner import kv_cache_bytes, linear_read_bytes  # noqa: E402
from devices.profiles import load_profile  # noqa: E402
from devices.shapes import resolve_model  # noqa: E402
from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint  # noqa: E402
from models.llama import SIZES, Transformer  # noqa: E402
from models.quant import quantize_linear_  # noqa: E402
from models.tokenizer import train_tokenizer  # noqa: E402
from toolchain.export import ExportConfig, export  # noqa: E402

# (runtime, device, model, Linear bits (16 = bf16/fp16), lm_head bits, context, published tok/s)
PUBLISHED = [
    ("llama.cpp Q8_0", "raspberry-pi-5", "tinyllama-1.1b", 8, None, 128, 9.0),
    ("MLC q4f16", "jetson-orin-nano", "llama-3.2-3b", 4, None, 128, 43.1),
    ("MLC q4f16", "jetson-orin-nano", "llama-3.1-8b", 4, None, 128, 19.1),
    ("ExecuTorch SpinQuant", "oneplus-12", "llama-3.2-1b", 4, 8, 64, 50.2),
    ("ExecuTorch BF16", "oneplus-12", "llama-3.2-1b", 16, None, 64, 19.2),
]


def paper() -> bool:
    print("planner decode bound vs published decode tok/s (batch 1, fp16 KV cache)")
    head = f"{'runtime':<22} {'device':<18} {'model':<16} {'GB/token':>8} {'bound':>7} {'published':>9} {'eff.':>6}"
    print(head + "\n" + "-" * len(head))
    ok = True
    for runtime, device, model, bits, head_bits, ctx, published in PUBLISHED:
        prof, spec = load_profile(device), resolve_model(model)
        read = linear_read_bytes(spec, bits, head_bits) + kv_cache_bytes(spec.config, ctx)
        bound = prof.bandwidth_bytes_s / read
        ok &= bound >= published
        flag = "" if bound >= published else "  BOUND BELOW PUBLISHED: profile wrong"
        print(f"{runtime:<22} {device:<18} {model:<16} {read / 1e9:>8.3f} {bound:>7.1f} {published:>9.1f} "
              f"{published / bound:>6.0%}{flag}")
    return ok


def nano_artifacts(root: Path) -> list[Path]:
    cfg = SIZES["nano"]
    float_dir, q4_dir = root / "nano-float", root / "nano-q4"
    if not (q4_dir / "edgesmith.json").is_file():
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(25.0)
        text = "".join(Path(os.__file__).parent.joinpath(n).read_text() for n in ("json/decoder.py", "json/encoder.py"))
        tok = train_tokenizer([text], vocab_size=512, show_progress=False)
        save_checkpoint(model, tok, float_dir, {"parent": None, "passes": []})
        ckpt = load_checkpoint(float_dir)
        quantize_linear_(ckpt.model, 4, 32)
        save_checkpoint(ckpt.model, tok, q4_dir, child_lineage(ckpt, {"kind": "quantize", "method": "rtn", "bits": 4}))
    plan = [("gguf-f32", float_dir, ExportConfig("gguf")), ("gguf-q4_0", q4_dir, ExportConfig("gguf")),
            ("onnx-fp32", float_dir, ExportConfig("onnx")), ("onnx-int4", q4_dir, ExportConfig("onnx")),
            ("executorch-fp32", float_dir, ExportConfig("executorch"))]
    if importlib.util.find_spec("tensorrt") is not None:
        plan.append(("tensorrt-fp16", float_dir, ExportConfig("tensorrt", precision="fp16")))
    else:
        print("tensorrt: skipped (the tensorrt package does not import on this machine)")
    out = []
    for name, src, ecfg in plan:
        if not (root / name / "manifest.json").is_file():
            t0 = time.perf_counter()
            export(src, root / name, ecfg, log=lambda line: None)
            print(f"  exported {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        out.append(root / name)
    return out


def local(args) -> None:
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_devices-"))
    root.mkdir(parents=True, exist_ok=True)
    artifacts = nano_artifacts(root)
    prof = load_profile("local")
    print(f"\nlocal: {prof.cores} cores, {prof.ram_bytes / 2**30:.1f} GiB, bandwidth "
          f"{prof.bandwidth_bytes_s / 1e9:.1f} GB/s (measured once, cached), load average {os.getloadavg()[0]:.2f}")
    results = bench(artifacts, "local", prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat,
                    progress=lambda d, t, label: print(f"  [{d}/{t}] {label}", flush=True))
    print(format_table(results))
    if args.json:
        out = write_results(results, args.json)
        plot_results(results, out.with_suffix(".png"))
        print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="prompt 32, generate 32, 3 runs")
    p.add_argument("--paper-only", action="store_true")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--gen-len", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--keep", default=None, metavar="DIR", help="build (or reuse) the nano artifacts here")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args()
    for name, full, quick in (("prompt_len", 128, 32), ("gen_len", 128, 32), ("repeat", 5, 3)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    ok = paper()
    if not args.paper_only:
        local(args)
    if not ok:
        sys.exit("a planner bound fell below a published figure: fix the device profile")


if __name__ == "__main__":
    main()
