"""ExecuTorch export: `torch.export` + `to_edge_transform_and_lower` with the XNNPACK partitioner.

The model is our one Transformer with its static KV cache set up at `max_seq_len`: the cache
buffers become mutable buffers of the program, written by index at `input_pos`, so the .pte keeps
its cache between calls. The forward takes `tokens (1, T)` and `input_pos (T,)` with T dynamic in
[1, max_seq_len]: one method does the prefill and the one-token decodes. Export runs under
`torch.no_grad()`. `model.pte` is written with `tokenizer.json` beside it.

Quantized checkpoints (fp32 activations only) become 8da4w / 8da8w from our codes, never
re-quantized: every QuantizedLinear is swapped for `XnnpackGroupLinear`, whose forward is the
pattern XNNPACK's partitioner lowers to its dynamically quantized fully-connected kernel
(`qd8-f32-qb4w`: int8 per-token asymmetric activations, group-wise int4 weights):
torchao's `choose_qparams_affine / quantize_affine / dequantize_affine` on the input and
`dequantize_affine` on int8-held int4 codes with one scale per (row, group). That kernel holds
4-bit codes only, needs every group scale > 0, and stores the scales in bf16. So:

- signed scales: a group with scale s < 0 is stored as (|s|, -code); an all-zero group (scale 0,
  codes 0) as scale 1 with codes 0. Both are exact rewrites of `w = scale * code`.
- 4 bits: -code can be +8, which int4 cannot hold; it is stored as 7 and the remaining `|s|` goes
  into an exact sparse remainder (below).
- 8 bits (XNNPACK has no group-wise int8 kernel): code = 16 * hi + lo with hi, lo in [-8, 7] as two
  int4 planes with scales 16|s| and |s|; codes 120..127 (hi would be 8) leave 16 in the remainder.
- remainder: the weights the planes miss, `(rows, P)` column indices and exact fp32 values, applied
  to the float (not int8) input by a gather; P is the most such weights in any row (with
  round-to-nearest codes a few per group, about 2-8 % of a row).
- bf16 scales: the serializer rounds each fp32 group scale to bf16 (8 significant bits, our fp16
  scales have 11), so a plane's weights deviate from ours by at most 2^-8 relative (|dw| <= 2^-8 |w|,
  round to nearest even). The remainder keeps exact scales.

The artifact therefore computes `dq8(x) @ (W + dW).T + x @ R.T` with W our fake-quant weights,
|dW| <= 2^-8 |W| (about 0.4 %), dq8 XNNPACK's per-token asymmetric int8 round trip (step
(max - min) / 255 of each token). Both are runtime numerics, not weight changes, so the int4 / int8
parity thresholds (parity.THRESHOLDS, unchanged) apply; measured on the test model: max |logit diff|
6.9e-3 (4-bit) and 5.7e-3 (8-bit) of max |logit|, argmax and 32 greedy tokens all matching.
A quantized token embedding becomes `ExecuTorchEmbedding`: a lookup of our codes written with
portable ops only (embedding, bitwise and / shift, cast, mul), so any ExecuTorch runtime runs it
without extra kernel libraries (`quantized_decomposed::embedding_4bit` would need the quantized
kernels linked into the runner; Python's `executorch.runtime` lacks them unless
`executorch.kernels.quantized` is imported). 4-bit codes stay packed two per byte (`code + 8`, even
column in the low nibble), 8-bit codes as int8, scales as fp32 (exact widening of ours); only the
looked-up rows are unpacked, as `(float) code * scale`, exactly the fake-quant value.
A tied head is a QuantizedLinear like any other (its own XNNPACK planes).
fp16 with quantized weights is refused (not built); int8 KV caches are refused by name.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kernels import refuse_fused
from models.checkpoint import Checkpoint
from models.errors import EdgesmithError
from models.llama import Transformer
from models.lowrank import LowRankLinear
from models.quant import QuantizedEmbedding, QuantizedLinear, replace_module_
from runtimes.backends.executorch import ExecuTorchBackend
from runtimes.probe import remember
from toolchain.export.spec import FormatSpec, quantization_scheme, refuse_int8_kv_cache, register_format

FILE = "model.pte"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
STORED_AS = {4: "8da4w: XNNPACK qd8-qb4w (bf16 group scales) + exact remainder",
             8: "8da8w: two XNNPACK qd8-qb4w planes (16*hi + lo, bf16 group scales) + exact remainder"}
EMBEDDING_STORED_AS = {4: "packed int4 lookup in portable ops (fp32 group scales)",
                       8: "int8 lookup in portable ops (fp32 group scales)"}


def split_codes(q: QuantizedLinear) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Our codes and scales as int4 planes with positive fp32 scales, plus the exact remainder.

    Returns `(planes, idx, val)`: `planes` a list of (codes int8 `(out, in)` in [-8, 7], scales fp32
    `(out, in/g)` > 0), `idx` int64 and `val` fp32 `(out, P)` with
    `sum(dequantize(planes)) + scatter(idx, val) == q.dequantize()` exactly (before bf16 scales)."""
    out_f, in_f = q.qweight.shape
    s = q.scales.float()                                                  # (out, ng), signed
    c = q.qweight.to(torch.int32).reshape(out_f, s.shape[1], q.group_size)
    c = torch.where((s < 0)[..., None], -c, c)
    c = c.masked_fill((s == 0)[..., None], 0)
    pos = s.abs().masked_fill(s == 0, 1.0)
    if q.bits == 4:
        lo = c.clamp(-8, 7)
        planes, rest = [(lo, pos)], c - lo
    else:
        lo = torch.remainder(c + 8, 16) - 8
        hi = torch.div(c - lo, 16, rounding_mode="floor").clamp(-8, 7)
        planes, rest = [(hi, pos * 16), (lo, pos)], c - 16 * hi - lo
    planes = [(p.reshape(out_f, in_f).to(torch.int8), sc) for p, sc in planes]
    w_rest = (rest.float() * pos[..., None]).reshape(out_f, in_f)
    nonzero = w_rest != 0
    P = int(nonzero.sum(1).max())
    idx = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :P]  # nonzero columns first
    return planes, idx, torch.gather(w_rest, 1, idx)


def dq8_per_token(x: torch.Tensor) -> torch.Tensor:
    """int8 asymmetric per-token quantize-dequantize, as torchao's 8da configs write it (the pattern
    XNNPACK fuses into its dynamically quantized input)."""
    from torchao.quantization.quant_primitives import (MappingType, choose_qparams_affine, dequantize_affine,
                                                       quantize_affine)

    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    scale, zero = choose_qparams_affine(x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127,
                                        zero_point_dtype=torch.int8)
    q = quantize_affine(x, block, scale, zero, torch.int8, -128, 127)
    return dequantize_affine(q, block, scale, zero, torch.int8, -128, 127, output_dtype=x.dtype)


class XnnpackGroupLinear(nn.Module):
    """A QuantizedLinear in the form XNNPACK lowers to qd8-f32-qb4w (see the module docstring)."""

    def __init__(self, q: QuantizedLinear):
        super().__init__()
        planes, idx, val = split_codes(q)
        self.group_size, self.n_planes, self.has_rest = q.group_size, len(planes), idx.shape[1] > 0
        for i, (codes, scales) in enumerate(planes):
            self.register_buffer(f"codes{i}", codes)
            self.register_buffer(f"scales{i}", scales)
            self.register_buffer(f"zeros{i}", torch.zeros(scales.shape, dtype=torch.int8))
        self.rest_shape = tuple(idx.shape)
        self.register_buffer("rest_idx", idx.flatten())  # flat: the gather needs no reshape at run time
        self.register_buffer("rest_val", val)
        bias = getattr(q, "bias", None)  # Qwen2's q/k/v: float, added after the planes
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quant_primitives import dequantize_affine

        y = None
        for i in range(self.n_planes):  # each plane is its own dynamically quantized linear
            w = dequantize_affine(getattr(self, f"codes{i}"), (1, self.group_size), getattr(self, f"scales{i}"),
                                  getattr(self, f"zeros{i}"), torch.int8, -8, 7, output_dtype=x.dtype)
            part = F.linear(dq8_per_token(x), w)
            y = part if y is None else y + part
        if self.has_rest:
            picked = x.index_select(-1, self.rest_idx).unflatten(-1, self.rest_shape)
            y = y + (picked * self.rest_val).sum(-1)
        return y if self.bias is None else y + self.bias


class ExecuTorchEmbedding(nn.Module):
    """A QuantizedEmbedding as a lookup in portable ops (see the module docstring)."""

    def __init__(self, q: QuantizedEmbedding):
        super().__init__()
        self.bits, self.group_size = q.bits, q.group_size
        codes = q.qweight.detach()
        if q.bits == 4:
            u = (codes.to(torch.int16) + 8).to(torch.uint8)  # (V, dim) in [0, 15]
            codes = u[:, 0::2] | (u[:, 1::2] << 4)  # (V, dim / 2)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", q.scales.detach().float())  # exact: every fp16 is an fp32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.codes)  # (..., dim) int8, or (..., dim / 2) packed uint8
        if self.bits == 4:
            pairs = torch.stack([torch.bitwise_and(rows, 15), torch.bitwise_right_shift(rows, 4)], dim=-1)
            codes = pairs.flatten(-2).to(torch.float32) - 8.0  # (..., dim)
        else:
            codes = rows.to(torch.float32)
        scales = F.embedding(ids, self.scales)  # (..., dim / g)
        return (codes.unflatten(-1, (-1, self.group_size)) * scales.unsqueeze(-1)).flatten(-2)


class CachedDecoder(nn.Module):
    """`forward(tokens, input_pos) -> logits (1, T, V)` in fp32 through the model's static cache."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos).float()


def swap_quantized_(model: nn.Module) -> list[str]:
    """Replace every QuantizedLinear by its XnnpackGroupLinear and a QuantizedEmbedding by its
    ExecuTorchEmbedding; the names swapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    for name in names:
        m = model.get_submodule(name)
        replace_module_(model, name, ExecuTorchEmbedding(m) if isinstance(m, QuantizedEmbedding) else XnnpackGroupLinear(m))
    return names


def export_program(model: Transformer, precision: str, max_seq_len: int):
    """The lowered ExecuTorch program manager (call `.buffer` for the .pte bytes)."""
    refuse_fused(model, "executorch")  # torch.export would capture edgesmith::* ops no XNNPACK runtime has
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    model = model.to(_DTYPES[precision]).eval()
    model.setup_cache(1, max_seq_len)
    swap_quantized_(model)  # after setup_cache, which asks the embedding for its dtype
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    example = (torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
    partitioners = [XnnpackPartitioner()]
    if any(isinstance(m, XnnpackGroupLinear) for m in model.modules()):
        # the dynamically quantized linears first (one per op), then the float rest
        partitioners.insert(0, XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT,
                                                  per_op_mode=True))
    with torch.no_grad():
        exported = torch.export.export(CachedDecoder(model), example,
                                       dynamic_shapes=({1: seq}, {0: seq}), strict=False)
        edge = to_edge_transform_and_lower(exported, partitioner=partitioners,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        # Mutated buffers are serialized without contents unless marked: the cache starts as the zeros
        # the torch model starts with, never as whatever the memory held (0 x NaN would leak through
        # the masked softmax).
        return edge.to_executorch(ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])]))


def write(ckpt: Checkpoint, cfg, tmp: Path, max_seq_len: int) -> dict:
    refuse_int8_kv_cache(ckpt.model, "executorch")
    quantized = [n for n, m in ckpt.model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    if quantized and cfg.precision != "fp32":
        raise EdgesmithError(f"--precision: {cfg.precision} is not supported for a quantized checkpoint "
                             f"({quantized[0]}.weight) by --format executorch; allowed: fp32")
    if quantized or any(isinstance(m, LowRankLinear) for m in ckpt.model.modules()):  # low-rank: both factors kept
        model = copy.deepcopy(ckpt.model)  # the reference keeps its quantized modules
    else:
        model = Transformer(ckpt.config)
        model.load_state_dict(ckpt.model.state_dict())
    program = export_program(model, cfg.precision, max_seq_len)
    data = program.buffer
    (tmp / FILE).write_bytes(data)
    remember(hashlib.sha256(data).hexdigest(), "export")  # ours: loaded in this process next (parity), no probe
    return {"entry": FILE, "options": {"backend": "xnnpack", "method": "forward"},
            "quantization": quantization_scheme(ckpt, STORED_AS, EMBEDDING_STORED_AS)}


register_format(FormatSpec(name="executorch", precisions=("fp32", "fp16"), write=write, backend=ExecuTorchBackend,
                           runtime_package="executorch",
                           toolkit="executorch", estimate_s=50.0))
