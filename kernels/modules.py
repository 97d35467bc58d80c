"""The fused modules: subclasses of the model's layers whose steps call the fused custom ops, and the
in-place swap that puts them into one model (`fuse_`) or takes them out again (`unfuse_`).

| plain (models/)        | fused (here)               | what runs fused                                  |
|------------------------|----------------------------|--------------------------------------------------|
| RMSNorm                | FusedRMSNorm               | edgesmith::rms_norm                              |
| Block                  | FusedBlock                 | edgesmith::add_rms_norm (residual add + norm)    |
| Attention              | FusedAttention             | q/k/v as one weight-only matmul, edgesmith::rope(_), |
|                        |                            | flash / split-KV decode attention                |
| Int8KVAttention        | FusedInt8KVAttention       | the same, over the dequantized int8 cache        |
| MLP                    | FusedMLP                   | gate/up as one weight-only matmul, edgesmith::swiglu |
| nn.Linear (float)      | FusedLinear                | edgesmith::linear (decode: fp32 gemv)            |
| QuantizedLinear        | FusedQuantizedLinear       | edgesmith::weight_only_matmul (reads the codes)  |
| TiedQuantizedHead      | FusedTiedQuantizedHead     | the same, on the embedding's codes               |

The swap changes each module's class in place (`module.__class__ = FUSED[type(module)]`): a fused
subclass adds no state (beyond a cache of the joint packed q/k/v or gate/up codes, rebuilt from the
codes when they change, dropped by `unfuse_`), only overrides the step the layer names (`project`,
`rotate`, `attend`, `gate_up`, `act`, `add_norm`, `forward`), so parameters, buffers, the KV cache,
hooks and state-dict names stay exactly as they were, a fused model saves the same checkpoint, and
`unfuse_` is the exact inverse. Only the exact classes of the table are swapped: a variant it does not
know (another package's Attention subclass) keeps its own forward, and `fused_modules(model)` lists what
does run fused. A Block is fused only when its post-attention norm is a plain RMSNorm (the fused add
reads its weight and eps).

In eager mode the modules call the ops' Python bodies directly (kernels.ops.EAGER: the same code without
the dispatcher); traced graphs (torch.compile, torch.export) get the registered torch.ops.edgesmith ops.
There is no process-wide state: what a forward runs is decided by the classes of that model's
modules, so two models in one process (one fused, one not) each run their own ops, from any thread.
The ops have no autograd formulas: fused modules are for inference. This module does not pick the
implementation behind an op (kernels/ops.py does, per device) and does not export (kernels/onnx.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import cpu
from kernels.ops import CPU_GEMV_MAX_ROWS, EAGER, current_override, impl_for  # importing it registers the ops
from models.errors import EdgesmithError
from models.llama import MLP, Attention, Block, RMSNorm
from models.quant import Int8KVAttention, QuantizedLinear, TiedQuantizedHead, fake_quantize_per_token, held_bits

MODES = ("reference", "fused")
E = torch.ops.edgesmith


def _ops():
    """The ops a forward calls: their Python bodies directly in plain eager mode (the same code without the
    dispatcher's ~5 us a call); torch.ops.edgesmith in a traced graph (torch.compile, torch.export) and
    while something watches the dispatcher (torch.profiler, a TorchDispatchMode), so it sees our ops."""
    if torch.compiler.is_compiling() or torch.autograd._profiler_enabled() or _dispatch_mode():
        return E
    return EAGER


def _dispatch_mode() -> bool:
    """A TorchDispatchMode (FakeTensorMode, an op recorder) is active in this thread (the mode stack is
    thread-local; torch.utils._python_dispatch's flag is process-wide and races between threads)."""
    return torch._C._len_torch_dispatch_stack() > 0


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops().rms_norm(x, self.weight, self.eps)


class FusedBlock(Block):
    def add_norm(self, a, x):
        norm = self.post_attention_layernorm
        return _ops().add_rms_norm(a, x, norm.weight, norm.eps)


def _joint(owner: nn.Module, x: torch.Tensor, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
    """The outputs of `linears` on x from one call of the CPU weight-only kernel, where it applies: eager
    mode (no trace, no dispatch mode), the CPU implementation, at most CPU_GEMV_MAX_ROWS rows (prefill
    dequantizes instead), weight-only fused Linears of the same bits and group size. None otherwise: the
    caller runs them one by one through the op."""
    first = linears[0]
    if torch.compiler.is_compiling() or _dispatch_mode() or impl_for(x) is not cpu:
        return None
    if x.numel() // x.shape[-1] > CPU_GEMV_MAX_ROWS and current_override() != "cpu":
        return None
    if not all(type(m) is FusedQuantizedLinear and m.act_bits is None and m.bias is None and m.bits == first.bits
               and m.group_size == first.group_size for m in linears):
        return None
    parts = [(m.qweight, m.scales) for m in linears]
    if torch.autograd._profiler_enabled():  # named in a profile like the op
        with torch.profiler.record_function("edgesmith::weight_only_matmul (joint)"):
            return cpu.joint_weight_only_matmul(x, owner, parts, held_bits(first.bits))
    return cpu.joint_weight_only_matmul(x, owner, parts, held_bits(first.bits))


class _FusedAttend:
    """q/k/v projected by one int4/int8 kernel call, rotary embedding in place, attention over the live keys
    only (no repeated K/V)."""

    def project(self, x):
        joint = _joint(self, x, (self.q_proj, self.k_proj, self.v_proj))
        if joint is None:
            return super().project(x)
        B, T, _ = x.shape
        q, k, v = joint
        return (q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2),
                k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2),
                v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2))

    def rotate(self, q, k, cos, sin):
        if torch.compiler.is_compiling():  # traced graphs get the functional form (no input mutation)
            return E.rope(q, cos, sin), E.rope(k, cos, sin)
        ops = _ops()
        ops.rope_(q, cos, sin)
        ops.rope_(k, cos, sin)
        return q, k

    def attend(self, q, k, v, input_pos, mask):
        # (B, nh, T, hd) as a view of (B, T, nh, hd) memory: the caller's transpose + reshape copies nothing
        if self.softcap is not None:  # the kernels do not soft-cap (Gemma-2)
            return super().attend(q, k, v, input_pos, mask)
        scale = self.scale
        window = self.window if self.window is not None and k.shape[2] > self.window else None
        if input_pos is not None and q.shape[2] == 1:
            if window is not None:  # a sliding layer reads the last `window` live keys
                start = int(input_pos[-1]) + 1 - window
                k, v, input_pos = k[:, :, start:], v[:, :, start:], input_pos - start
            return _ops().decode_attention(q, k, v, input_pos, scale)
        if window is not None:  # the kernels are causal only: a sliding prefill goes through SDPA with its mask
            return super().attend(q, k, v, input_pos, mask)
        return _ops().flash_attention(q, k, v, input_pos, scale)


class FusedAttention(_FusedAttend, Attention):
    pass


class FusedInt8KVAttention(_FusedAttend, Int8KVAttention):
    pass


class FusedMLP(MLP):
    def gate_up(self, x):
        joint = _joint(self, x, (self.gate_proj, self.up_proj))
        return super().gate_up(x) if joint is None else joint

    def act(self, gate, up):
        return super().act(gate, up) if self.gelu else _ops().swiglu(gate, up)  # the kernel is SwiGLU's


class FusedLinear(nn.Linear):
    """A float Linear through edgesmith::linear: at decode time the CPU library's fp32 gemv (torch's BLAS,
    MKL, streams the weight at about half the bandwidth on an AMD CPU: scripts/bench_runtime.py
    --profile), F.linear otherwise; traced graphs keep F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(x)
        y = _ops().linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class _FusedWeightOnly:
    """The int4/int8 weight-only matmul kernel on the canonical codes and scales (no float weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = fake_quantize_per_token(x, self.act_bits)
        y = _ops().weight_only_matmul(x, self.qweight, self.scales, held_bits(self.bits))  # 5 bits: the 8-bit kernel
        bias = getattr(self, "bias", None)
        return y if bias is None else y + bias


class FusedQuantizedLinear(_FusedWeightOnly, QuantizedLinear):
    pass


class FusedTiedQuantizedHead(_FusedWeightOnly, TiedQuantizedHead):
    pass


FUSED: dict[type, type] = {RMSNorm: FusedRMSNorm, Block: FusedBlock, Attention: FusedAttention,
                           Int8KVAttention: FusedInt8KVAttention, MLP: FusedMLP, nn.Linear: FusedLinear,
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
            m.__dict__.pop(cpu.JOINT_CACHE, None)
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
