"""Freed memory goes back to the OS during and after an export's lowering (glibc's malloc; elsewhere nothing
changes).

glibc serves a block from its mmap threshold up with its own mapping, returned to the OS on free; below it, from
the heap, where freed memory stays in the process. The threshold starts at 128 KB and rises, after the first large
block is freed, up to 32 MB: from then on a Linear's per-layer temporaries (a 1024 x 2816 weight in int32 is 11.5
MB) live on the heap, and the persistent tensors allocated between them keep it from shrinking. A 336 M ExecuTorch
export held 1.7 GB of freed temporaries that way, and the lowering's graphs leave hundreds of MB of small freed
blocks behind. Inside `freed_memory_returned()` the threshold is 1 MB; on leaving it, the garbage is collected and
the heap's free pages are given back (`malloc_trim`), then the thresholds are those glibc's own rule ends at (mmap
32 MB, trim 64 MB), so later temporaries, such as the parity check's dequantized weights, reuse the heap at full
speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


@contextmanager
def freed_memory_returned():
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 2 << 20)
    try:
        yield
    finally:
        gc.collect()  # the lowered program's graphs are reference cycles
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
