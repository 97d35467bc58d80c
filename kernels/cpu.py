"""The fused CPU implementations: a small C++ library (kernels/csrc/cpu_kernels.cpp) built once with
the system compiler and called through ctypes on the tensors' memory.

Why not torch.utils.cpp_extension: the kernels need no torch headers, and without them the build
takes about a second instead of a minute (torch/extension.h), so a fresh machine or a test session
pays almost nothing, and the library does not depend on the torch ABI. Why not torch.compile: on
these small decode-time tensors the compiled function's guards and launch cost more than the work
(scripts/bench_kernels.py measures both; see the "compiled" column).

The library is cached under `$EDGESMITH_CACHE/kernels/<hash>/` (default `~/.cache/edgesmith`), the
hash covering the source, the flags and the compiler version; it is written to a temporary name and
renamed. `-march=x86-64-v3` (AVX2, FMA, F16C, BMI2) is used only when /proc/cpuinfo says the CPU has
those; otherwise a generic `-O3` build. No compiler, or a failed build: `available()` is False with
the reason in `unavailable_reason()`, and the ops run their references.

The kernels compute in fp32; other dtypes are converted at the boundary (fp32 accumulation, as the
Triton kernels do). This module does not register ops (kernels/ops.py does).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
ABI_VERSION = 6
X86_64_V3 = ("avx2", "fma", "f16c", "bmi2")

MIN_PARALLEL_WORK = 1 << 17  # elements below which a call runs on one thread (a parallel region costs more)
_lib: ctypes.CDLL | None = None
_reason: str | None = None

c_i64, c_f32, c_int, c_p = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "es_rms_norm": [c_p, c_p, c_p, c_p, c_p, c_i64, c_i64, c_f32, c_int],
    "es_rope_inplace": [c_p, c_p, c_p] + [c_i64] * 7 + [c_int],
    "es_swiglu": [c_p, c_p, c_p, c_i64, c_int],
    "es_flash_attention": [c_p] * 5 + [c_i64] * 5 + [c_f32] + [c_i64] * 12 + [c_int],
    "es_decode_attention": [c_p] * 6 + [c_i64] * 5 + [c_f32, c_i64] + [c_i64] * 6 + [c_int],
    "es_wo_matmul4": [c_p] * 4 + [c_i64] * 4 + [c_int],
    "es_wo_matmul8": [c_p] * 4 + [c_i64] * 4 + [c_int],
    "es_gemv_f32": [c_p] * 3 + [c_i64] * 3 + [c_int],
}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith")) / "kernels"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]
    if all(f in cpu_flags() for f in X86_64_V3):
        flags.append("-march=x86-64-v3")
    return flags


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build() -> Path:
    """Compile the library (or find it in the cache); its path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    flags = compile_flags()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version]).encode()).hexdigest()[:16]
    out = cache_dir() / key / "libedgesmith_kernels.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{cxx} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def lib() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None when it cannot be built (see unavailable_reason)."""
    global _lib, _reason
    if _lib is None and _reason is None:
        try:
            handle = ctypes.CDLL(str(build()))
            if handle.es_abi_version() != ABI_VERSION:
                raise RuntimeError(f"library ABI {handle.es_abi_version()} != {ABI_VERSION}")
            for name, argtypes in SIGNATURES.items():
                getattr(handle, name).argtypes = argtypes
                getattr(handle, name).restype = None
            _lib = handle
        except (OSError, RuntimeError) as e:
            _reason = str(e)
    return _lib


def available() -> bool:
    return lib() is not None


def unavailable_reason() -> str | None:
    lib()
    return _reason


def _threads(work: int) -> int:
    """torch's intra-op thread count, or 1 when the work is too small to split."""
    return 1 if work < MIN_PARALLEL_WORK else torch.get_num_threads()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


# ----------------------------------------------------------------------------- elementwise


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(w * rmsnorm(x + residual), x + residual) in x's dtype; the second is None without a residual."""
    dim = x.shape[-1]
    xf = _f32(x).contiguous()
    rf = None if residual is None else _f32(residual).contiguous()
    wf = _f32(weight).contiguous()
    out = torch.empty_like(xf)
    res_out = None if rf is None else torch.empty_like(xf)
    rows = xf.numel() // dim
    lib().es_rms_norm(_p(xf), None if rf is None else _p(rf), _p(wf), _p(out),
                      None if res_out is None else _p(res_out), rows, dim, eps, _threads(xf.numel()))
    dtype = torch.result_type(weight, x)
    return out.to(dtype), None if res_out is None else res_out.to(x.dtype)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x `(B, H, T, D)` in place (any strides with a contiguous last dim)."""
    B, H, T, D = x.shape
    c, s = _f32(cos).contiguous(), _f32(sin).contiguous()
    if x.dtype == torch.float32 and x.stride(-1) == 1:
        lib().es_rope_inplace(_p(x), _p(c), _p(s), B, H, T, D, *x.stride()[:3], _threads(x.numel()))
        return
    y = x.float().contiguous()
    lib().es_rope_inplace(_p(y), _p(c), _p(s), B, H, T, D, *y.stride()[:3], _threads(y.numel()))
    x.copy_(y)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = _f32(gate).contiguous(), _f32(up).contiguous()
    out = torch.empty_like(g)
    lib().es_swiglu(_p(g), _p(u), _p(out), g.numel(), _threads(g.numel()))
    return out.to(gate.dtype)


# ----------------------------------------------------------------------------- attention


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = _f32(t)
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attention(q, k, v, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q `(B, H, T, D)`, k/v `(B, Hkv, S, D)`: query t sees keys j <= q_pos[t]; out like q (layout
    `(B, T, H, D)` underneath, so the caller's transpose + reshape is free)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qf, kf, vf = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    out = torch.empty(B, T, H, D, dtype=torch.float32).transpose(1, 2)
    pos = q_pos.to(torch.int64).contiguous()
    lib().es_flash_attention(_p(qf), _p(kf), _p(vf), _p(out), _p(pos), B, H, Hkv, T, D, scale,
                             *qf.stride()[:3], *kf.stride()[:3], *vf.stride()[:3], *out.stride()[:3],
                             _threads(B * H * T * D * 64))
    return out.to(q.dtype)


def decode_attention(q, k_cache, v_cache, length: int, scale: float, split: int) -> torch.Tensor:
    """q `(B, H, 1, D)` against the first `length` keys of the cache, `split` keys per chunk."""
    B, H, _, D = q.shape
    Hkv = k_cache.shape[1]
    qf = _f32(q).contiguous()
    kf, vf = _last_contiguous(k_cache), _last_contiguous(v_cache)
    nsplit = -(-length // split)
    out = torch.empty(B, 1, H, D, dtype=torch.float32)
    part_o = torch.empty(B, H, nsplit, D, dtype=torch.float32)
    part_lse = torch.empty(B, H, nsplit, dtype=torch.float32)
    lib().es_decode_attention(_p(qf), _p(kf), _p(vf), _p(out), _p(part_o), _p(part_lse), B, H, Hkv, length, D,
                              scale, split, *kf.stride()[:3], *vf.stride()[:3],
                              min(torch.get_num_threads(), B * Hkv * nsplit) if length * D * H >= 32768 else 1)
    return out.transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------- weight-only matmul


def pack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int8 codes `(N, K)` in [-8, 7] -> uint8 `(N, K/2)`: `code + 8`, even column in the low nibble
    (MatMulNBits' layout, which the Triton kernel reads; the CPU kernel reads `pack_lanes`)."""
    q = (qweight.to(torch.int16) + 8).to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def packed_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel's form of the canonical (codes, scales): packed nibbles (4 bits) or the codes (8 bits),
    and fp32 scales. Derived once and kept on the codes tensor (rebuilt when either tensor changes)."""
    key = (_version(qweight), _version(scales), scales.data_ptr(), bits)
    cached = getattr(qweight, "_edgesmith_packed", None)
    if cached is None or cached[0] != key:
        w = pack_int4(qweight) if bits == 4 else qweight.contiguous()
        cached = (key, w, scales.float().contiguous())
        qweight._edgesmith_packed = cached
    return cached[1], cached[2]


def _version(t: torch.Tensor) -> int:
    """In-place changes bump a tensor's version; inference tensors have none (taken as never changing)."""
    return -1 if t.is_inference() else t._version


def linear_f32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x `(..., K)` fp32 @ weight `(N, K)` fp32 ^T -> `(..., N)`: the matrix-vector product of a float Linear
    at decode time (torch's BLAS reaches about half the memory bandwidth there on some CPUs)."""
    N, K = weight.shape
    w = weight if weight.is_contiguous() else weight.contiguous()
    xf = x.reshape(-1, K).contiguous()
    out = torch.empty(xf.shape[0], N, dtype=torch.float32)
    lib().es_gemv_f32(_p(xf), _p(w), _p(out), xf.shape[0], N, K, _threads(N * K // 4))
    return out.reshape(*x.shape[:-1], N)


def pack_lanes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The CPU kernel's layout of int8 codes `(N, K)`: each chunk of 64 (4 bits) or 32 (8 bits) weights is
    one 32-byte block of eight 32-bit lanes, lane l holding weights l, l + 8, l + 16, ...: 4 bits as
    nibble j = `code + 8` (bits 4j..4j+3; a last half chunk padded), 8 bits as byte j. `(N, blocks * 32)`
    uint8 (kernels/csrc/cpu_kernels.cpp reads one block per chunk with shifts only)."""
    N, K = qweight.shape
    if bits == 8:
        return qweight.view(N, K // 32, 4, 8).transpose(2, 3).reshape(N, K).contiguous().view(torch.uint8)
    chunks = -(-K // 64)
    u = (qweight.to(torch.int16) + 8).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, chunks * 64 - K)).view(N, chunks, 8, 8)  # [n, chunk, j, lane]
    blocks = u[:, :, 0::2] | (u[:, :, 1::2] << 4)  # [n, chunk, j // 2, lane]: byte j // 2 of the lane
    return blocks.transpose(2, 3).reshape(N, chunks * 32).contiguous()


def cpu_packed_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pack_lanes codes, fp32 scales), derived once and kept on the codes tensor like packed_weight."""
    key = (_version(qweight), _version(scales), scales.data_ptr(), bits)
    cached = getattr(qweight, "_edgesmith_cpu_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, pack_lanes(qweight, bits), scales.float().contiguous())
        qweight._edgesmith_cpu_packed = cached
    return cached[1], cached[2]


def weight_only_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """x `(..., K)` @ (scales * codes)^T -> `(..., N)` in x's dtype."""
    N, K = qweight.shape
    g = K // scales.shape[1]
    w, s = cpu_packed_weight(qweight, scales, bits)
    xf = _f32(x).reshape(-1, K).contiguous()
    M = xf.shape[0]
    out = torch.empty(M, N, dtype=torch.float32)
    fn = lib().es_wo_matmul4 if bits == 4 else lib().es_wo_matmul8
    fn(_p(xf), _p(w), _p(s), _p(out), M, N, K, g, _threads(N * K // 4))
    return out.reshape(*x.shape[:-1], N).to(x.dtype)


JOINT_CACHE = "_edgesmith_joint_packed"  # the attribute of the owning module that holds the joint packing


def joint_weight_only_matmul(x: torch.Tensor, owner, parts: list[tuple[torch.Tensor, torch.Tensor]],
                             bits: int) -> tuple[torch.Tensor, ...]:
    """x `(..., K)` through several weights of one input width in one kernel call (a layer's q/k/v or
    gate/up projections): their packed codes and scales concatenated once, kept on `owner` (the module
    they belong to; rebuilt when a part changes); the outputs are views of one `(..., N1 + N2 + ...)` result."""
    key = tuple((_version(q), _version(sc), q.data_ptr(), sc.data_ptr()) for q, sc in parts) + (bits,)
    cached = owner.__dict__.get(JOINT_CACHE)
    if cached is None or cached[0] != key:
        w = torch.cat([pack_lanes(q, bits) for q, _ in parts])
        cached = (key, w, torch.cat([sc.float() for _, sc in parts]).contiguous())
        owner.__dict__[JOINT_CACHE] = cached
    _, w, s = cached
    K = parts[0][0].shape[1]
    N, g = w.shape[0], K // parts[0][1].shape[1]
    xf = _f32(x).reshape(-1, K).contiguous()
    out = torch.empty(xf.shape[0], N, dtype=torch.float32)
    fn = lib().es_wo_matmul4 if bits == 4 else lib().es_wo_matmul8
    fn(_p(xf), _p(w), _p(s), _p(out), xf.shape[0], N, K, g, _threads(N * K // 4))
    out = out.reshape(*x.shape[:-1], N).to(x.dtype)
    return out.split([q.shape[0] for q, _ in parts], dim=-1)
