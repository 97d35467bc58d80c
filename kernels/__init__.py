"""Fused ops for the model: RMSNorm with a fused residual add, RoPE in place, SwiGLU, flash attention
(prefill), split-KV decode attention, int4/int8 group-quantized weight-only matmul.

Each op is a torch custom op (`torch.ops.edgesmith.*`, kernels/ops.py) with a readable reference
(kernels/reference.py), a fused CPU implementation (kernels/cpu.py, a small C++ library) and a
Triton implementation for CUDA (kernels/triton_kernels.py); kernels/onnx.py maps them to ONNX
Runtime contrib ops.

A model runs them after a module swap, chosen per model (kernels/modules.py):

    kernels.fuse_(model)            # its RMSNorm, Block, Attention, MLP, QuantizedLinear run the fused ops
    kernels.unfuse_(model)          # back to the model's own PyTorch (also `fuse_(model, "reference")`)
    kernels.fused_modules(model)    # the names of the modules that run fused ops

Nothing is process-wide: another model in the same process, in any thread, runs its own modules.
Exporters trace the plain PyTorch: `refuse_fused(model, what)` is their one-line refusal of a fused
model; kernels/onnx.py's translation table is the one path that exports the fused ops (a cache-free
ONNX graph). The ops have no autograd formulas: the fused mode is for inference.

May import `models` only; never `toolchain`, `runtimes`, `devices` or `gui`.
"""

from __future__ import annotations

from kernels.modules import MODES, check_mode, fuse_, fused_modules, refuse_fused, unfuse_

__all__ = ["MODES", "check_mode", "fuse_", "fused_modules", "refuse_fused", "unfuse_"]
