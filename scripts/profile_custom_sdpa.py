"""Per-call time of ExecuTorch's llama::custom_sdpa (its CPU kernel, as the .pte runs it) at the 336 M shape's
decode: q (1, 1, 16, 64), fp32 cache (1, 1024, 4, 64), after 128 and after 896 positions; torch SDPA beside it
over the live prefix. Issue 20's @896 / @128 profile (BENCHMARKS.md):

    python scripts/profile_custom_sdpa.py
"""

import statistics
import time

import torch
import torch.nn.functional as F
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

torch.set_num_threads(2)
H, KV, D, S = 16, 4, 64, 1024
q, k, v = torch.randn(1, 1, H, D), torch.randn(1, S, KV, D), torch.randn(1, S, KV, D)


def t(fn, n=2000):
    """Median over 5 rounds of the mean microseconds per call."""
    for _ in range(50):
        fn()
    xs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        xs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(xs)


for pos in (128, 896):
    et = t(lambda: torch.ops.llama.custom_sdpa(q, k, v, pos, None, 0.0, True, None))
    qq, kk, vv = q.transpose(1, 2), k[:, :pos + 1].transpose(1, 2), v[:, :pos + 1].transpose(1, 2)
    th = t(lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True))
    print(f"pos {pos}: custom_sdpa {et:.1f} us/call, x24 layers {24 * et / 1000:.2f} ms/token; "
          f"torch SDPA (live prefix) {th:.1f} us")
