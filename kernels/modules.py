"""The fused modules: subclasses of the model's layers whose steps call the fused custom ops, and the
in-place swap that puts them into one model (`fuse_`) or takes them out again (`unfuse_`).

| plain (models/)        | fused (here)               | what runs fused                                  |
|------------------------|----------------------------|--------------------------------------------------|
| RMSNorm                | FusedRMSNorm               | edgesmith::rms_norm                              |
| Block                  | FusedBlock                 | edgesmith::add_rms_norm (residual add + norm)    |
| Attention              | FusedAttention             | edgesmith::rope(_), flash / split-KV decode attention |
| Int8KVAttention        | FusedInt8KVAttention       | the same, over the dequantized int8 cache        |
| MLP                    | FusedMLP                   | edgesmith::swiglu                                |
| QuantizedLinear        | FusedQuantizedLinear       | edgesmith::weight_only_matmul (reads the codes)  |
| TiedQuantizedHead      | FusedTiedQuantizedHead     | the same, on the embedding's codes               |

The swap changes each module's class in place (`module.__class__ = FUSED[type(module)]`): a fused
subclass adds no state, only overrides the step the layer names (`rotate`, `attend`, `act`,
`add_norm`, `forward`), so parameters, buffers, the KV cache, hooks and state-dict names stay exactly
as they were, a fused model saves the same checkpoint, and `unfuse_` is the exact inverse. Only the
exact classes of the table are swapped: a variant it does not know (another package's Attention
subclass) keeps its own forward, and `fused_modules(model)` lists what does run fused. A Block is
fused only when its post-attention norm is a plain RMSNorm (the fused add reads its weight and eps).

There is no process-wide state: what a forward runs is decided by the classes of that model's
modules, so two models in one process (one fused, one not) each run their own ops, from any thread.
The ops have no autograd formulas: fused modules are for inference. This module does not pick the
implementation behind an op (kernels/ops.py does, per device) and does not export (kernels/onnx.py).
"""

from __future__ import annotations

import torch
from torch import nn

import kernels.ops  # noqa: F401  (registers torch.ops.edgesmith.*)
from models.errors import EdgesmithError
from models.llama import MLP, Attention, Block, RMSNorm
from models.quant import Int8KVAttention, QuantizedLinear, TiedQuantizedHead, fake_quantize_per_token

MODES = ("reference", "fused")
E = torch.ops.edgesmith


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return E.rms_norm(x, self.weight, self.eps)


class FusedBlock(Block):
    def add_norm(self, a, x):
        norm = self.post_attention_layernorm
        return E.add_rms_norm(a, x, norm.weight, norm.eps)


class _FusedAttend:
    """Rotary embedding in place and attention over the live keys only (no repeated K/V)."""

    def rotate(self, q, k, cos, sin):
        if torch.compiler.is_compiling():  # traced graphs get the functional form (no input mutation)
            return E.rope(q, cos, sin), E.rope(k, cos, sin)
        E.rope_(q, cos, sin)
        E.rope_(k, cos, sin)
        return q, k

    def attend(self, q, k, v, input_pos, mask):
        # (B, nh, T, hd) as a view of (B, T, nh, hd) memory: the caller's transpose + reshape copies nothing
        scale = q.shape[-1] ** -0.5
        if input_pos is not None and q.shape[2] == 1:
            return E.decode_attention(q, k, v, input_pos, scale)
        return E.flash_attention(q, k, v, input_pos, scale)


class FusedAttention(_FusedAttend, Attention):
    pass


class FusedInt8KVAttention(_FusedAttend, Int8KVAttention):
    pass


class FusedMLP(MLP):
    def act(self, gate, up):
        return E.swiglu(gate, up)


class _FusedWeightOnly:
    """The int4/int8 weight-only matmul kernel on the canonical codes and scales (no float weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = fake_quantize_per_token(x, self.act_bits)
        return E.weight_only_matmul(x, self.qweight, self.scales, self.bits)


class FusedQuantizedLinear(_FusedWeightOnly, QuantizedLinear):
    pass


class FusedTiedQuantizedHead(_FusedWeightOnly, TiedQuantizedHead):
    pass


FUSED: dict[type, type] = {RMSNorm: FusedRMSNorm, Block: FusedBlock, Attention: FusedAttention,
                           Int8KVAttention: FusedInt8KVAttention, MLP: FusedMLP,
                           QuantizedLinear: FusedQuantizedLinear, TiedQuantizedHead: FusedTiedQuantizedHead}
PLAIN: dict[type, type] = {fused: plain for plain, fused in FUSED.items()}


def check_mode(mode: str, flag: str = "kernels") -> str:
    if mode not in MODES:
        raise EdgesmithError(f"{flag}: {mode!r}; allowed: {', '.join(MODES)}")
    return mode


def _fusable(m: nn.Module) -> bool:
    if type(m) is Block:
        return type(m.post_attention_layernorm) in (RMSNorm, FusedRMSNorm)
    return type(m) in FUSED


def fuse_(model: nn.Module, mode: str = "fused") -> nn.Module:
    """Swap `model`'s layers in place for their fused subclasses ("fused") or back to the plain
    PyTorch ("reference", the same as `unfuse_`); returns the model."""
    if check_mode(mode) == "reference":
        return unfuse_(model)
    for m in model.modules():
        if _fusable(m):
            m.__class__ = FUSED[type(m)]
    return model


def unfuse_(model: nn.Module) -> nn.Module:
    """Put every fused module of `model` back to its plain class (exact inverse of `fuse_`); returns the model."""
    for m in model.modules():
        if type(m) in PLAIN:
            m.__class__ = PLAIN[type(m)]
    return model


def fused_modules(model: nn.Module) -> list[str]:
    """Dotted names of the modules of `model` that run fused ops ("" for the model itself)."""
    return [name for name, m in model.named_modules() if type(m) in PLAIN]


def refuse_fused(model: nn.Module, what: str) -> None:
    """One clear line when `model` has fused modules: `what` (an exporter) traces the plain PyTorch."""
    names = fused_modules(model)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise EdgesmithError(f"{what}: the model runs fused kernels ({shown}); exporters trace the plain "
                             "PyTorch: call kernels.unfuse_(model) first (only kernels/onnx.py's translation_table "
                             "lowers the fused ops, for a cache-free ONNX graph)")
