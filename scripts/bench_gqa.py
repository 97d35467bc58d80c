"""ONNX Runtime's CPU GroupQueryAttention alone, at decode (one query token), with an fp32 and an fp16 KV cache.

    python scripts/bench_gqa.py [--threads 2] [--contexts 128,896]

Why (issue 19, item 4): the fused ONNX graph loses speed with context, and the profile
(`scripts/bench_runtime.py --profile`) puts the growth in GroupQueryAttention. This times one node of the
245 M benchmark Llama's shape (16 query heads, 4 KV heads, head dim 64, a 1024-position cache bound in
place through IOBinding, as runtimes/backends/onnxruntime.py binds it), median of 200 runs per context, and
prints the time per layer next to the time the cache's bytes take at the streaming bandwidth given.
"""

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, KV, D, S = 16, 4, 64, 1024


def graph(dtype) -> bytes:
    T = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    inputs = [vi("q", T, [1, 1, H * D]), vi("k", T, [1, 1, KV * D]), vi("v", T, [1, 1, KV * D]),
              vi("past_k", T, [1, KV, S, D]), vi("past_v", T, [1, KV, S, D]),
              vi("seqlens_k", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [1])]
    outputs = [vi("out", T, [1, 1, H * D]), vi("present_k", T, [1, KV, S, D]), vi("present_v", T, [1, KV, S, D])]
    node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], [o.name for o in outputs],
                            domain="com.microsoft", num_heads=H, kv_num_heads=KV)
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def time_layer(dtype, context: int, threads: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(graph(dtype), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cache = {n: ort.OrtValue.ortvalue_from_numpy(rng.random((1, KV, S, D)).astype(dtype)) for n in ("k", "v")}
    io = s.io_binding()
    for name, width in (("q", H * D), ("k", KV * D), ("v", KV * D)):
        io.bind_cpu_input(name, rng.random((1, 1, width)).astype(dtype))
    for n in ("k", "v"):  # the cache in place: past and present are one buffer
        io.bind_ortvalue_input(f"past_{n}", cache[n])
        io.bind_ortvalue_output(f"present_{n}", cache[n])
    io.bind_cpu_input("seqlens_k", np.array([context], np.int32))
    io.bind_cpu_input("total", np.array([context + 1], np.int32))
    io.bind_output("out")
    for _ in range(20):
        s.run_with_iobinding(io)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        s.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", default="128,896")
    p.add_argument("--bandwidth-gbs", type=float, default=40.0, help="streaming bandwidth for the bytes column")
    args = p.parse_args()
    print(f"GroupQueryAttention, {H} heads / {KV} KV heads, head dim {D}, cache {S}, {args.threads} threads")
    print(f"{'cache':<8} {'context':>7} {'us / layer':>10} {'KV MB read':>10} {'us at bandwidth':>15}")
    for dtype in (np.float32, np.float16):
        for ctx in (int(c) for c in args.contexts.split(",")):
            mb = 2 * KV * (ctx + 1) * D * np.dtype(dtype).itemsize / 1e6
            us = time_layer(dtype, ctx, args.threads) * 1e6
            print(f"{np.dtype(dtype).name:<8} {ctx:>7} {us:>10.1f} {mb:>10.2f} {mb / args.bandwidth_gbs * 1e3:>15.1f}")


if __name__ == "__main__":
    main()
