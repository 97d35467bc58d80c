"""Fused ops for the model: RMSNorm with a fused residual add, RoPE in place, SwiGLU, flash attention
(prefill), split-KV decode attention, int4/int8 group-quantized weight-only matmul.

Each op is a torch custom op (`torch.ops.edgesmith.*`, kernels/ops.py) with a readable reference
(kernels/reference.py), a fused CPU implementation (kernels/cpu.py, a small C++ library) and a
Triton implementation for CUDA (kernels/triton_kernels.py); kernels/onnx.py maps them to ONNX
Runtime contrib ops.

The one switch: `with kernels.use("fused"): model(tokens, input_pos)` makes every Transformer in the
process call the fused ops (models/llama.py KERNELS); `use("reference")` (and the default, outside
any `use`) is the model's own inline PyTorch. The switch is process-wide and not thread-safe: enter it
around the calls that should use it (runtimes/torch.py does so per forward). The ops have no autograd
formulas: the fused mode is for inference.

May import `models` only; never `toolchain`, `runtimes`, `devices` or `gui`.
"""

from __future__ import annotations

import contextlib

from models.errors import EdgesmithError
from models.llama import KERNELS

MODES = ("reference", "fused")


def fused_table() -> dict:
    """The entries `use("fused")` puts in models.llama.KERNELS."""
    import torch

    from kernels import ops  # noqa: F401  (registers torch.ops.edgesmith.*)

    def rope(x, cos, sin):
        if torch.compiler.is_compiling():  # traced graphs get the functional form (no input mutation)
            return torch.ops.edgesmith.rope(x, cos, sin)
        torch.ops.edgesmith.rope_(x, cos, sin)
        return x

    def attention(q, k, v, input_pos):
        scale = q.shape[-1] ** -0.5
        if input_pos is not None and q.shape[2] == 1:
            return torch.ops.edgesmith.decode_attention(q, k, v, input_pos, scale)
        return torch.ops.edgesmith.flash_attention(q, k, v, input_pos, scale)

    e = torch.ops.edgesmith
    return {"rms_norm": e.rms_norm, "add_rms_norm": e.add_rms_norm, "rope": rope, "swiglu": e.swiglu,
            "attention": attention, "weight_only_matmul": e.weight_only_matmul}


def check_mode(mode: str, flag: str = "kernels") -> str:
    if mode not in MODES:
        raise EdgesmithError(f"{flag}: {mode!r}; allowed: {', '.join(MODES)}")
    return mode


@contextlib.contextmanager
def use(mode: str):
    """Run the model with the fused ops ("fused") or its inline reference ("reference") inside the block."""
    check_mode(mode)
    saved = dict(KERNELS)
    KERNELS.update(fused_table() if mode == "fused" else dict.fromkeys(KERNELS))
    try:
        yield
    finally:
        KERNELS.update(saved)
