"""Measuring a machine: weight-streaming memory bandwidth and fp32 matmul rate.

Bandwidth is what decode needs: the median time of a multi-threaded sum over a tensor much larger
than the caches (reads only, like streaming weights). With torch when it imports, numpy (one
thread) otherwise, so the bench agent can measure a device that has no torch. This module only
measures; `devices.profiles` caches the results.
"""

from __future__ import annotations

import statistics
import time


def measure_bandwidth(threads: int | None = None, gib: float = 0.5, repeats: int = 5) -> float:
    """Bytes/s of a sum over a `gib` GiB float32 tensor, median of `repeats`."""
    n = int(gib * (1 << 30)) // 4
    try:
        import torch
    except ImportError:
        import numpy as np

        x = np.ones(n, dtype=np.float32)
        x.sum()  # touch every page once
        return n * 4 / _median_time(lambda: x.sum(), repeats)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.ones(n)
        x.sum()
        return n * 4 / _median_time(lambda: x.sum(), repeats)
    finally:
        torch.set_num_threads(before)


def measure_matmul_flops(threads: int | None = None, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an fp32 n x n matmul, median of `repeats` (after one warm-up)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        return 2 * n ** 3 / _median_time(lambda: a @ b, repeats)
    finally:
        torch.set_num_threads(before)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
