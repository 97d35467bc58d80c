"""The fused ops as torch custom ops (`torch.ops.edgesmith.*`), each with a fake implementation so
that it traces under torch.compile and torch.export.

Which implementation runs is picked per call from the tensors' device, once per op:

    CUDA  -> Triton (kernels/triton_kernels.py) when triton imports, else the reference
    CPU   -> the fused C++ library (kernels/cpu.py) when it builds, else the reference
    other -> the reference (kernels/reference.py)

`override("reference" | "cpu" | "triton")` forces one implementation for every device, in the calling
thread only (a context variable; tests run the Triton kernels on CPU tensors this way under
TRITON_INTERPRET=1). Ops return the same layout whichever implementation runs: attention outputs are
`(B, H, T, D)` views of `(B, T, H, D)` memory, so the model's transpose + reshape copies nothing.

The ops are for inference: none has an autograd formula. This module registers the ops (and keeps
their Python bodies in `EAGER`, which the fused modules call directly in eager mode); a model runs them
after `kernels.fuse_(model)` (kernels/modules.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import torch
from torch import Tensor

from kernels import cpu, reference
from models.errors import EdgesmithError

IMPLS = ("reference", "cpu", "triton")
# For tests: force one implementation. A context variable, so one thread's override never reaches another's ops.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgesmith_kernel_override", default=None)
_triton: types.ModuleType | None = None
_triton_reason: str | None = None


def triton_module() -> types.ModuleType | None:
    """kernels.triton_kernels, or None when triton cannot be imported (reason: triton_unavailable_reason)."""
    global _triton, _triton_reason
    if _triton is None and _triton_reason is None:
        try:  # lazily: importing kernels.triton_kernels imports triton, an optional heavy dependency
            from kernels import triton_kernels

            _triton = triton_kernels
        except ImportError as e:
            _triton_reason = f"triton is not installed ({e}); pip install 'edgesmith[triton]'"
    return _triton


def triton_unavailable_reason() -> str | None:
    triton_module()
    return _triton_reason


@contextlib.contextmanager
def override(impl: str | None):
    """Run every op with one implementation ("reference", "cpu", "triton"); None restores the choice by device."""
    if impl is not None and impl not in IMPLS:
        raise EdgesmithError(f"kernel implementation {impl!r}; allowed: {', '.join(IMPLS)}")
    token = _override.set(impl)
    try:
        yield
    finally:
        _override.reset(token)


# The ops' Python bodies by name, for eager callers that skip the dispatcher (kernels/modules.py: a call
# through torch.ops costs about 5 us more, a tenth of a small model's decode step over its ~300 calls).
EAGER = types.SimpleNamespace()


def _op(name: str, mutates_args: tuple[str, ...] = ()):
    """Register the decorated function as `torch.ops.edgesmith.<name>` and keep its body in EAGER."""
    def wrap(fn):
        setattr(EAGER, name, fn)
        return torch.library.custom_op(f"edgesmith::{name}", fn, mutates_args=mutates_args)
    return wrap


def current_override() -> str | None:
    """The implementation `override` forces in this thread (None: chosen by device)."""
    return _override.get()


def impl_for(t: Tensor) -> types.ModuleType:
    """The implementation module for tensors on t's device (see the module docstring)."""
    forced = _override.get()
    if forced == "reference":
        return reference
    if forced == "cpu" or (forced is None and t.device.type == "cpu"):
        return cpu if cpu.available() else reference
    if forced == "triton" or t.is_cuda:
        return triton_module() or reference
    return reference


def _attention_layout(y: Tensor) -> Tensor:
    """y `(B, H, T, D)` as a view of `(B, T, H, D)` memory (what the fused kernels return)."""
    if y.stride(1) == y.shape[3] and y.stride(2) == y.shape[1] * y.shape[3]:
        return y
    B, H, T, D = y.shape
    return torch.empty(B, T, H, D, dtype=y.dtype, device=y.device).transpose(1, 2).copy_(y)


# ----------------------------------------------------------------------------- normalisation


@_op("rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * rmsnorm(x) (fp32 statistics)."""
    return impl_for(x).rms_norm(x, None, weight, eps)[0]


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)


@_op("add_rms_norm")
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(weight * rmsnorm(x + residual), x + residual): the residual add fused into the norm."""
    y, h = impl_for(x).rms_norm(x, residual, weight, eps)
    return y, h


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device), torch.empty_like(x)


# ----------------------------------------------------------------------------- rotary embedding


@_op("rope_", mutates_args=("x",))
def rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate x `(B, H, T, D)` in place by the rows cos/sin `(T, D)` (HF rotate-half)."""
    impl_for(x).rope_(x, cos, sin)


@rope_.register_fake
def _(x, cos, sin):
    return None


@_op("rope")
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The out-of-place form of rope_, for traced graphs (torch.compile, torch.export, ONNX)."""
    y = x.clone()
    impl_for(x).rope_(y, cos, sin)
    return y


@rope.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------- SwiGLU


@_op("swiglu")
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one pass."""
    return impl_for(gate).swiglu(gate, up)


@swiglu.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- attention


@_op("flash_attention")
def flash_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor | None, scale: float) -> Tensor:
    """Causal grouped-query attention, tiled with an online softmax. q `(B, H, T, D)`, k/v
    `(B, Hkv, S, D)`; query t sees key j iff j <= q_pos[t] (q_pos None: positions 0..T-1)."""
    pos = torch.arange(q.shape[2], device=q.device) if q_pos is None else q_pos
    return _attention_layout(impl_for(q).flash_attention(q, k, v, pos, scale))


@flash_attention.register_fake
def _(q, k, v, q_pos, scale):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


@_op("decode_attention")
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float,
                     split: int = 0) -> Tensor:
    """One new query per head `(B, H, 1, D)` against the static cache `(B, Hkv, S, D)`, reading only
    the live keys 0..input_pos, split along the key length (`split` keys per chunk, 0: chosen for the
    device) and merged by log-sum-exp."""
    impl = impl_for(q)
    if impl is cpu:
        length = int(input_pos.reshape(-1)[-1]) + 1
        return cpu.decode_attention(q, k_cache, v_cache, length, scale, split or _cpu_split(q, k_cache, length))
    return _attention_layout(impl.decode_attention(q, k_cache, v_cache, input_pos, scale, split))


@decode_attention.register_fake
def _(q, k_cache, v_cache, input_pos, scale, split=0):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D).transpose(1, 2)


def _cpu_split(q: Tensor, k_cache: Tensor, length: int) -> int:
    """Keys per chunk on the CPU: enough chunks that every thread has (batch, KV head, chunk) work."""
    items = q.shape[0] * k_cache.shape[1]
    chunks = max(1, -(-2 * torch.get_num_threads() // items))
    return max(64, -(-length // chunks))


# ----------------------------------------------------------------------------- weight-only matmul

# Rows of x up to which the batch-1 kernel beats dequantize + float matmul on the CPU
# (scripts/bench_kernels.py; prefill goes through the dequantized weight).
CPU_GEMV_MAX_ROWS = 8


@_op("weight_only_matmul")
def weight_only_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bits: int) -> Tensor:
    """x `(..., K)` @ W^T with W = scales * codes, read from the canonical int8 codes `(N, K)` and fp16
    group scales `(N, K/g)` (models/quant.py) without materialising W."""
    impl = impl_for(x)
    if impl is cpu and x.numel() // x.shape[-1] > CPU_GEMV_MAX_ROWS and _override.get() != "cpu":
        impl = reference
    return impl.weight_only_matmul(x, qweight, scales, bits)


@weight_only_matmul.register_fake
def _(x, qweight, scales, bits):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@_op("linear")
def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x `(..., K)` @ weight^T for a float weight `(N, K)`: on the CPU library, fp32 and at most
    CPU_GEMV_MAX_ROWS rows (decode), its gemv, which streams the weight at the memory bandwidth (torch's
    BLAS reaches about half of it on some CPUs); otherwise F.linear."""
    rows = x.numel() // x.shape[-1]
    if (impl_for(x) is cpu and x.dtype == weight.dtype == torch.float32
            and (rows <= CPU_GEMV_MAX_ROWS or _override.get() == "cpu")):
        return cpu.linear_f32(x, weight)
    return torch.nn.functional.linear(x, weight)


@linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
