"""The one place that says which fused op lowers to which ONNX Runtime contrib op, and how.

`CONTRIB_OPS` names the ONNX op (type, domain) of each fused op; toolchain/export/onnx_graph.py
(the hand-built fused graph) takes its op names from here. `translation_table()` gives the dynamo
exporter's `custom_translation_table`, so a model after `kernels.fuse_(model)` exports with

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=translation_table())

This is the one export path that carries the fused ops. The toolchain's exporters work from the plain
model: GGUF and the hand-built ONNX / TensorRT graphs read only weights (the same fused or not), and
ExecuTorch, which traces the model, refuses a fused one in one line (`kernels.refuse_fused`).

| fused op                    | ONNX op                                          |
|-----------------------------|--------------------------------------------------|
| edgesmith::rms_norm         | SimplifiedLayerNormalization (ai.onnx domain, ORT) |
| edgesmith::add_rms_norm     | com.microsoft SkipSimplifiedLayerNormalization   |
| edgesmith::rope             | com.microsoft RotaryEmbedding                    |
| edgesmith::swiglu           | Sigmoid, Mul, Mul (no contrib op needed)         |
| edgesmith::flash_attention  | com.microsoft GroupQueryAttention (no past)      |
| edgesmith::weight_only_matmul | com.microsoft MatMulNBits                      |

`decode_attention` has no translation: exported decode graphs keep the static cache and its mask
(every exporter traces the reference path), and the hand-built fused graph feeds GroupQueryAttention
its own cache buffers. The contrib ops' schemas are not in the `onnx` package, so each translation
declares the part of the schema it uses (`_schema`). onnx and onnxscript (optional, heavy) are imported
only by the functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import ops  # noqa: F401  (registers torch.ops.edgesmith.*)

MS = "com.microsoft"


@dataclass(frozen=True)
class ContribOp:
    op_type: str
    domain: str


CONTRIB_OPS: dict[str, ContribOp] = {
    "rms_norm": ContribOp("SimplifiedLayerNormalization", ""),
    "add_rms_norm": ContribOp("SkipSimplifiedLayerNormalization", MS),
    "rope": ContribOp("RotaryEmbedding", MS),
    "flash_attention": ContribOp("GroupQueryAttention", MS),
    "weight_only_matmul": ContribOp("MatMulNBits", MS),
}

FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(key: str, inputs: list[str], outputs: list[str], attributes: dict[str, str],
            types: dict[str, list[str]] | None = None):
    """An onnx OpSchema for CONTRIB_OPS[key]. Inputs/outputs are "name:TYPEVAR" ("?" suffix: optional);
    attributes name -> "INT" | "FLOAT"; type variables default to T (floats), M (int64), I (int32), U (uint8)."""
    from onnx.defs import OpSchema

    op = CONTRIB_OPS[key]
    FP, Opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption

    def params(specs):
        out = []
        for spec in specs:
            name, tv = spec.rstrip("?").split(":")
            out.append(FP(name, tv, param_option=Opt.Optional if spec.endswith("?") else Opt.Single))
        return out

    tvs = {"T": FLOATS, "M": ["tensor(int64)"], "I": ["tensor(int32)"], "U": ["tensor(uint8)"], "F": ["tensor(float)"],
           **(types or {})}
    used = {s.rstrip("?").split(":")[1] for s in inputs + outputs}
    return OpSchema(op.op_type, op.domain, 1, inputs=params(inputs), outputs=params(outputs),
                    type_constraints=[(tv, tvs[tv], "") for tv in sorted(used)],
                    attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, t), "") for a, t in attributes.items()])


def translation_table() -> dict:
    """{torch.ops.edgesmith.<op>.default: onnxscript translation} for torch.onnx.export(dynamo=True)."""
    from onnxscript import opset18 as op
    from onnxscript import values

    def contrib(key, *schema):
        o = CONTRIB_OPS[key]
        return values.Op(values.Opset(o.domain, 1) if o.domain else op, o.op_type, _schema(key, *schema))

    sln = contrib("rms_norm", ["X:T", "scale:T"], ["Y:T", "inv_std_var:F?"],
                  {"axis": "INT", "epsilon": "FLOAT", "stash_type": "INT"})
    skip = contrib("add_rms_norm", ["input:T", "skip:T", "gamma:T"],
                   ["output:T", "mean:F?", "inv_std_var:F?", "input_skip_bias_sum:T?"], {"epsilon": "FLOAT"})
    rotary = contrib("rope", ["input:T", "position_ids:M", "cos_cache:T", "sin_cache:T"], ["output:T"],
                     {"interleaved": "INT"})
    gqa = contrib("flash_attention", ["query:T", "key:T", "value:T", "past_key:T?", "past_value:T?", "seqlens_k:I",
                                      "total_sequence_length:I"], ["output:T", "present_key:T", "present_value:T"],
                  {"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT"})
    nbits = contrib("weight_only_matmul", ["A:T", "B:U", "scales:T"], ["Y:T"],
                    {"K": "INT", "N": "INT", "bits": "INT", "block_size": "INT", "accuracy_level": "INT"})

    def rms_norm(x, weight, eps):
        y, _ = sln(x, weight, axis=-1, epsilon=eps, stash_type=1)
        return y

    def add_rms_norm(x, residual, weight, eps):
        y, _, _, h = skip(x, residual, weight, epsilon=eps)
        return y, h

    def rope(x, cos, sin):
        # cos/sin hold the rows of this call's positions: use them as the cache, at positions 0..T-1
        T = op.Shape(x, start=2, end=3)
        pos = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(T), op.Constant(value_int=1)), [0])
        pos = op.Expand(pos, op.Concat(op.Shape(x, start=0, end=1), T, axis=0))  # (B, T)
        half = op.Div(op.Shape(cos, start=1, end=2), op.Constant(value_ints=[2]))
        zero, one = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
        return rotary(x, pos, op.Slice(cos, zero, half, one), op.Slice(sin, zero, half, one), interleaved=0)

    def swiglu(gate, up):
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)

    def flash_attention(q, k, v, q_pos, scale):
        if q_pos is not None:
            raise NotImplementedError("edgesmith::flash_attention with q_pos lowers only without a KV cache "
                                      "(q_pos None); cached graphs come from toolchain/export/onnx_graph.py")
        H, Hkv = q.shape[1], k.shape[1]
        flat = op.Constant(value_ints=[0, 0, -1])
        q3, k3, v3 = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), flat) for t in (q, k, v))  # (B, T, heads*D)
        T = op.Shape(q, start=2, end=3)  # int64 (1,)
        seqlens = op.Expand(op.Sub(T, op.Constant(value_ints=[1])), op.Shape(q, start=0, end=1))  # (B,) T-1
        y, _, _ = gqa(q3, k3, v3, None, None, op.Cast(seqlens, to=6), op.Cast(op.Squeeze(T), to=6), num_heads=H,
                      kv_num_heads=Hkv, scale=scale)
        y = op.Reshape(y, op.Concat(op.Shape(q, start=0, end=1), op.Shape(q, start=2, end=3),
                                    op.Constant(value_ints=[H, -1]), axis=0))  # (B, T, H, D)
        return op.Transpose(y, perm=[0, 2, 1, 3])

    def weight_only_matmul(x, qweight, scales, bits):
        N, K = qweight.shape[0], qweight.shape[1]
        g = K // scales.shape[1]
        q = op.Cast(op.Add(op.Cast(qweight, to=7), op.Constant(value_int=1 << (bits - 1))), to=2)  # code + 2^(b-1), uint8
        q = op.Reshape(q, op.Constant(value_ints=[N, K // g, g]))
        if bits == 4:  # two per byte, even column in the low nibble (as onnx_graph.matmulnbits_weight)
            even = op.Slice(q, [0], [g], [2], [2])
            odd = op.Slice(q, [1], [g], [2], [2])
            q = op.BitwiseOr(even, op.BitShift(odd, op.Constant(value=_uint8(4)), direction="LEFT"))
        s = op.Reshape(op.CastLike(scales, x), op.Constant(value_ints=[-1]))
        return nbits(x, q, s, K=K, N=N, bits=bits, block_size=g, accuracy_level=0)

    e = torch.ops.edgesmith
    return {e.rms_norm.default: rms_norm, e.add_rms_norm.default: add_rms_norm, e.rope.default: rope,
            e.swiglu.default: swiglu, e.flash_attention.default: flash_attention,
            e.weight_only_matmul.default: weight_only_matmul}


def _uint8(v: int):
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(v, dtype=np.uint8))
