"""The canonical quantized representation every method produces and every exporter reads.

API (stable; the trainer's QLoRA and the GGUF / ONNX / ExecuTorch exporters import it):

- `QuantizedLinear(in_features, out_features, bits=4, group_size=32, act_bits=None)`: a Linear
  without bias whose weight is held as
    `qweight`  int8 buffer `(out_features, in_features)`, one b-bit signed code per weight;
    `scales`   float16 buffer `(out_features, in_features // group_size)`, one per group of
               `group_size` consecutive input columns;
  symmetric, no zero point: `w[o, i] = scales[o, i // group_size] * qweight[o, i]`.
  `act_bits=8` also quantizes the input dynamically per token to int8 (SmoothQuant W8A8 / 8da4w).
  `forward` dequantizes a block of rows at a time and runs float matmuls (`kernels.fuse_(model)` swaps in a
  subclass whose kernel reads the codes). `dequantize(dtype)` returns the float weight; `from_float(linear, bits,
  group_size)` rounds to nearest (the rule below); `from_codes(qweight, scales, bits, group_size)` wraps codes
  chosen by any method (GPTQ, AWQ). `.to(dtype)` never casts codes or scales.
- `quantize_rtn(w, bits, group_size, target) -> (qweight, scales)` and `quantize_codes(w, d, bits, target)`
  (codes of `w` for given per-element fp32 scales `d`; `target` in TARGETS), the building blocks of every method.
- `QuantizedEmbedding(num_embeddings, embedding_dim, bits=4, group_size=32)`: the token embedding in
  the same representation, grouped along the embedding dim (`qweight` `(vocab, dim)`, `scales`
  `(vocab, dim // group_size)`): a QuantizedLinear with out = vocab, in = dim, and GGUF's token_embd Q4_0 / Q8_0.
  `forward(ids)` gathers the rows of codes and scales (never the whole table); `weight` is the dequantized table.
  Codes are round to nearest: a lookup has no activations to weigh errors by, nothing for GPTQ / AWQ to trade.
- `TiedQuantizedHead(table)`: a tied model's lm_head over a quantized embedding, reading its codes and scales
  (as llama.cpp runs a tied model's output from `token_embd`); the checkpoint stores the table once.
- `quantize_linear_(model, bits, group_size, include=None) -> list[str]` swaps `nn.Linear`
  submodules in place; `quantize_embedding_(model, bits, group_size)` swaps the token embedding (and
  ties a tied head to it); `replace_module_(model, name, module)`; `check_scheme(bits, group_size,
  in_features, name)` raises one clear EdgesmithError; `scheme_of(model)` lists every quantized
  module's scheme for `edgesmith.json`; `quantized_numel(model)` counts the codes once.
- `Int8KVAttention(attn, k_scale, v_scale)`: an Attention whose KV cache is `Int8KVCache` (int8 codes, one fixed
  fp32 scale per KV head for K and for V, buffers `(n_kv_heads,)`); without a cache it quantize-dequantizes K and V.
- `quantization_meta(model)` / `apply_quantization_meta_(model, meta)`: the `edgesmith.json` "quantization" entry
  (keys are HF module names) and the module swaps that rebuild a model from it.

The rounding rule is llama.cpp's reference quantizer (`quantize_row_q4_0_ref` / `_q8_0_ref` in ggml-quants.c;
`gguf.quants.Q4_0/Q8_0`): our round-to-nearest codes are bit-identical to llama.cpp's Q4_0 / Q8_0 of the weights:

- 4 bits: codes in [-8, 7]. Per group, `m` is the signed value of largest magnitude, `d = m / -8` (fp32), codes
  `trunc(w / d + 8.5)` clamped to [0, 15], minus 8; stored scale `fp16(d)` (signed: the extreme lands on -8).
  GGUF Q4_0 block (group 32): `d = scale` (fp16), `q = code + 8` in [0, 15], low nibbles are columns
  0..15 and high nibbles 16..31. ONNX Runtime MatMulNBits bits=4: `q = code + 8` with the default
  zero point 8 (= 2^(bits-1)), `scale` as is.
- 5 bits: codes in [-16, 15], Q5_0's rule (`quantize_row_q5_0_ref`): `d = m / -16`, codes `trunc(w / d + 16.5)`
  clamped to [0, 31], minus 16. GGUF Q5_0 block (group 32): `d` (fp16), `qh` (uint32: bit j is bit 4 of column j's
  `q = code + 16`), `qs[16]` (low nibbles columns 0..15, high nibbles 16..31). It is the step between 4 and 8 bits that
  a size limit between them can use. A format without a 5-bit type holds the codes in its 8-bit form (`held_bits`,
  `widen_codes_`): exact, but no smaller than 8 bits there.
- 8 bits: codes in [-127, 127]. `d = max|w| / 127` (fp32, positive), codes `roundf(w / d)` (half away from zero),
  stored scale `fp16(d)`. GGUF Q8_0: `d = scale`, `qs = code`. MatMulNBits bits=8: `q = code + 128` (zero point 128).
- An all-zero group has scale 0 and codes 0. This module does not choose codes from data (toolchain/compress
  does), pack nibbles or write files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import EdgesmithError
from models.int8_kv import Int8KVAttention  # noqa: F401 (re-exported: part of this module's API)

BITS = (4, 5, 8)
GROUP_SIZES = (32, 64, 128)
ACT_BITS = (None, 8)
CHUNK = 1 << 21  # weights dequantized per F.linear call (8 MB in fp32)
CODE_RANGE = {4: (-8, 7), 5: (-16, 15), 8: (-127, 127)}
# "any": llama.cpp's Q4_0 / Q8_0 rule. "xnnpack": positive bf16-exact scales, codes XNNPACK's int4 planes hold
# (8 bits as 16 * hi + lo: [-127, 119]); every format holds those exactly, ExecuTorch's 8da4w kernel included.
TARGETS = ("any", "xnnpack")
XNNPACK_LIMITS = {4: (8, 7), 5: (16, 15), 8: (127, 119)}  # |most negative code|, most positive code


def check_scheme(bits: int, group_size: int, in_features: int | None = None, name: str | None = None) -> None:
    """Raise one clear line when (bits, group_size) is not allowed or does not fit a layer."""
    if isinstance(bits, bool) or bits not in BITS:
        raise EdgesmithError(f"bits={bits!r} is not allowed; allowed: {', '.join(map(str, BITS))}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise EdgesmithError(f"group_size={group_size!r} is not allowed; allowed: {', '.join(map(str, GROUP_SIZES))}")
    if in_features is not None and in_features % group_size:
        raise EdgesmithError(f"layer {name or '?'}: group_size={group_size} does not divide its in_features "
                             f"{in_features}")


def held_bits(bits: int, widths: tuple[int, ...] = (4, 8)) -> int:
    """The width a format that stores only `widths` holds `bits`-bit codes at: the smallest that fits them."""
    return min(w for w in widths if w >= bits)


def widen_codes_(model: nn.Module, widths: tuple[int, ...] = (4, 8)) -> list[str]:
    """Relabel each quantized module whose width a format cannot store as the next width it can (5 -> 8): the codes
    and scales stay as they are, so every value is unchanged. Names relabelled."""
    done = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and m.bits not in widths:
            m.bits = held_bits(m.bits, widths)
            done.append(name)
    return done


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero (torch.round is half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise EdgesmithError(f"target={target!r} is not allowed; allowed: {', '.join(TARGETS)}")


def fit_scales(d: torch.Tensor, target: str = "any") -> torch.Tensor:
    """fp32 scales as `target` stores them: "xnnpack" rounds each nonzero |d| up (codes stay in range) to a bf16
    value >= 2^-14 (so fp16 holds it too)."""
    if target == "any":
        return d
    i = d.float().abs().clamp_min(2.0 ** -14).contiguous().view(torch.int32)
    up = ((i & -65536) + ((i & 0xFFFF) != 0).to(torch.int32) * 65536).view(torch.float32)
    return torch.where(d == 0, torch.zeros_like(up), up)


def group_scales(w: torch.Tensor, bits: int, target: str = "any") -> torch.Tensor:
    """fp32 scale `d` of each group: w `(..., G)` -> `(..., 1)` (llama.cpp's Q4_0 / Q5_0 / Q8_0 rule; "xnnpack":
    positive, 4 and 5 bits the extreme on the most negative or positive code; 8 bits the smallest scale clipping
    neither end)."""
    w = w.float()
    if target == "xnnpack":
        neg, pos = XNNPACK_LIMITS[bits]
        if bits == 8:
            return fit_scales(torch.maximum(w.amax(-1, True) / pos, -w.amin(-1, True) / neg).clamp_min(0), target)
        m = torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True))
        return fit_scales(torch.where(m < 0, -m / neg, m / pos), target)
    if bits < 8:  # the signed extreme lands on the most negative code
        return torch.gather(w, -1, w.abs().argmax(dim=-1, keepdim=True)) / -float(1 << (bits - 1))
    return w.abs().amax(dim=-1, keepdim=True) / 127.0


def quantize_codes(w: torch.Tensor, d: torch.Tensor, bits: int, target: str = "any") -> torch.Tensor:
    """Codes of `w` for fp32 scales `d` (broadcastable), rounded as llama.cpp does; int8 result."""
    w, d = w.float(), d.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))
    top = XNNPACK_LIMITS[8][1] if target == "xnnpack" else 127
    if bits < 8:
        half = 1 << (bits - 1)
        return (torch.trunc(w * inv + (half + 0.5)).clamp(0, 2 * half - 1) - half).to(torch.int8)
    return _roundf(w * inv).clamp(-127, top).to(torch.int8)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, target: str = "any") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: float weight `(out, in)` -> (qweight int8 `(out, in)`, scales fp16 `(out, in/g)`)."""
    check_scheme(bits, group_size, w.shape[1])
    out_f, in_f = w.shape
    groups = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, ng, g)
    d = group_scales(groups, bits, target)
    codes = quantize_codes(groups, d, bits, target)
    return codes.reshape(out_f, in_f), d.squeeze(-1).to(torch.float16)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out_f, in_f = qweight.shape
    w = qweight.float().reshape(out_f, scales.shape[1], -1).mul_(scales.float().unsqueeze(-1))  # (out, ng, g)
    return w.reshape(out_f, in_f).to(dtype)


def linear_dequantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias=None) -> torch.Tensor:
    """F.linear over the dequantized weight; one larger than CHUNK goes a block of rows at a time, which the allocator
    reuses (a 256k-row head dequantized whole is GBs of fresh pages per call: 3-8 s against 0.2 s)."""
    b, rows = None if bias is None else bias.to(x.dtype), max(1, CHUNK // qweight.shape[1])
    return torch.cat([F.linear(x, dequantize(qweight[r:r + rows], scales[r:r + rows], x.dtype),
                               None if b is None else b[r:r + rows]) for r in range(0, qweight.shape[0], rows)], -1) \
        if qweight.numel() > CHUNK else F.linear(x, dequantize(qweight, scales, x.dtype), b)


def fake_quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token (last dim) int8 quantize-dequantize of activations."""
    qmax = 2 ** (bits - 1) - 1
    s = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    return (_roundf(x.float() / s).clamp(-qmax, qmax) * s).to(x.dtype)


class QuantizedLinear(nn.Module):
    """A Linear stored as int8 codes + fp16 group scales (see the module docstring); its bias, where it has one
    (Qwen2's q/k/v), stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 32,
                 act_bits: int | None = None, bias: bool = False):
        super().__init__()
        check_scheme(bits, group_size, in_features)
        if act_bits not in ACT_BITS:
            raise EdgesmithError(f"act_bits={act_bits!r} is not allowed; allowed: None, 8")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group_size, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(cls, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                   act_bits: int | None = None, bias: torch.Tensor | None = None) -> QuantizedLinear:
        out_f, in_f = qweight.shape
        m = cls(in_f, out_f, bits, group_size, act_bits, bias=bias is not None)
        _check_codes(qweight, scales, bits, group_size)
        m.qweight.copy_(qweight)
        m.scales.copy_(scales.to(torch.float16))
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m.to(qweight.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32,
                   act_bits: int | None = None, name: str | None = None, target: str = "any") -> QuantizedLinear:
        check_scheme(bits, group_size, linear.in_features, name)
        qweight, scales = quantize_rtn(linear.weight, bits, group_size, target)
        return cls.from_codes(qweight, scales, bits, group_size, act_bits, bias=linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = fake_quantize_per_token(x, self.act_bits)
        return linear_dequantized(x, self.qweight, self.scales, self.bias)

    def scheme(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "act_bits": self.act_bits}

    def _apply(self, fn, recurse=True):
        # Casts (model.to(bfloat16), .half()) must not touch the canonical fp16 scales; device moves do.
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def extra_repr(self) -> str:
        act = f", act_bits={self.act_bits}" if self.act_bits else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}{act}")


class QuantizedEmbedding(nn.Module):
    """An nn.Embedding stored as int8 codes + fp16 group scales along the embedding dim (module docstring)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 4, group_size: int = 32):
        super().__init__()
        check_scheme(bits, group_size, embedding_dim)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size = bits, group_size
        self.dtype = torch.float32  # of the output; follows casts of the model (codes and scales never do)
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(num_embeddings, embedding_dim // group_size, dtype=torch.float16))

    @classmethod
    def from_codes(cls, qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> QuantizedEmbedding:
        m = cls(qweight.shape[0], qweight.shape[1], bits, group_size)
        _check_codes(qweight, scales, bits, group_size)
        m.qweight.copy_(qweight)
        m.scales.copy_(scales.to(torch.float16))
        return m.to(qweight.device)

    @classmethod
    def from_float(cls, emb: nn.Embedding, bits: int = 4, group_size: int = 32,
                   name: str | None = None, target: str = "any") -> QuantizedEmbedding:
        check_scheme(bits, group_size, emb.embedding_dim, name)
        m = cls.from_codes(*quantize_rtn(emb.weight, bits, group_size, target), bits, group_size)
        m.dtype = emb.weight.dtype
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (built on each access; forward never uses it)."""
        return self.dequantize(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(ids, self.qweight)  # (..., dim) int8
        scales = F.embedding(ids, self.scales)  # (..., dim / g) fp16
        w = codes.unflatten(-1, (-1, self.group_size)).float() * scales.float().unsqueeze(-1)  # (..., dim/g, g)
        return w.flatten(-2).to(self.dtype)  # (..., dim): exactly dequantize(dtype)[ids]

    def scheme(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "act_bits": None}

    def _apply(self, fn, recurse=True):
        # Like QuantizedLinear: a cast changes the output dtype only; device moves apply to everything.
        scales = self.scales
        self.dtype = fn(torch.zeros((), dtype=self.dtype)).dtype
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


class TiedQuantizedHead(QuantizedLinear):
    """lm_head of a tied model with a quantized embedding: the table's codes and scales, read in place."""

    bias = None

    def __init__(self, table: QuantizedEmbedding):
        nn.Module.__init__(self)
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings
        self.bits, self.group_size, self.act_bits = table.bits, table.group_size, None
        self.__dict__["table"] = table  # a reference, not a submodule: state dicts hold the table once

    @property
    def qweight(self) -> torch.Tensor:
        return self.table.qweight

    @property
    def scales(self) -> torch.Tensor:
        return self.table.scales

    def scheme(self) -> dict:
        return {**super().scheme(), "tied_to": "model.embed_tokens"}

    def _apply(self, fn, recurse=True):
        return nn.Module._apply(self, fn, recurse)  # nothing of its own to cast or move


def _check_codes(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> None:
    lo, hi = CODE_RANGE[bits]
    if qweight.dtype != torch.int8 or int(qweight.min()) < lo or int(qweight.max()) > hi:
        raise EdgesmithError(f"qweight must be int8 codes in [{lo}, {hi}] for {bits} bits")
    rows, cols = qweight.shape
    if tuple(scales.shape) != (rows, cols // group_size):
        raise EdgesmithError(f"scales shape {tuple(scales.shape)}, expected {(rows, cols // group_size)}")


# ----------------------------------------------------------------------------- module swaps


def replace_module_(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def linear_names(model: nn.Module) -> list[str]:
    """Dotted names of every float nn.Linear, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_linear_(model: nn.Module, bits: int = 4, group_size: int = 32, include=None,
                     act_bits: int | None = None, target: str = "any") -> list[str]:
    """Swap each nn.Linear (for which `include(name)` is true) for its RTN QuantizedLinear; names swapped.

    A Linear whose weight is shared with another module (a tied lm_head) is left float: quantizing it
    would silently untie the embedding.
    """
    check_scheme(bits, group_size)
    shared = _shared_weight_names(model)
    done = []
    for name in linear_names(model):
        if (include is not None and not include(name)) or name in shared:
            continue
        lin = model.get_submodule(name)
        replace_module_(model, name, QuantizedLinear.from_float(lin, bits, group_size, act_bits, name=name,
                                                                target=target))
        done.append(name)
    return done


def quantize_embedding_(model: nn.Module, bits: int = 4, group_size: int = 32, include=None,
                        target: str = "any") -> list[str]:
    """Swap each nn.Embedding (for which `include(name)` is true) for its RTN QuantizedEmbedding; names
    swapped. A Linear that shared its weight (a tied lm_head) becomes a TiedQuantizedHead of the table."""
    check_scheme(bits, group_size)
    done = []
    for name in [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]:
        if include is not None and not include(name):
            continue
        emb = model.get_submodule(name)
        tied = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is emb.weight]
        q = QuantizedEmbedding.from_float(emb, bits, group_size, name=name, target=target)  # a tied head reads it
        replace_module_(model, name, q)
        for head in tied:
            replace_module_(model, head, TiedQuantizedHead(q))
        done.append(name)
    return done


def _shared_weight_names(model: nn.Module) -> set[str]:
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter):  # not QuantizedEmbedding.weight, a fresh tensor on every access
            owners.setdefault(id(w), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def scheme_of(model: nn.Module) -> dict[str, dict]:
    """`{module name: {"bits", "group_size", "act_bits"[, "tied_to"]}}` for every quantized Linear and
    embedding in `model`."""
    return {n: m.scheme() for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def quantized_numel(model: nn.Module) -> int:
    """Codes held by quantized modules, each table once (a tied head shares the embedding's)."""
    tensors = {id(m.qweight): m.qweight for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    return sum(t.numel() for t in tensors.values())


# ----------------------------------------------------------------------------- checkpoint metadata

META_VERSION = 1


def _hf(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def _ours(name: str) -> str:
    return name.removeprefix("model.")


def quantization_meta(model: nn.Module) -> dict | None:
    """The edgesmith.json "quantization" entry, or None for a float model."""
    weights = {_hf(n): s for n, s in scheme_of(model).items()}
    kv = [n for n, m in model.named_modules() if isinstance(m, Int8KVAttention)]
    if not weights and not kv:
        return None
    return {
        "version": META_VERSION,
        "format": "symmetric int codes, w = scale * code; tensors <name>.qweight (int8), <name>.scales (float16)",
        "weights": weights,
        "kv_cache": {"dtype": "int8", "scales": "per-head", "layers": [_hf(n) for n in kv]} if kv else None,
    }


def apply_quantization_meta_(model: nn.Module, meta: dict | None, source: str = "edgesmith.json") -> nn.Module:
    """Swap in empty QuantizedLinear / QuantizedEmbedding / Int8KVAttention modules (and a tied head) so
    the quantized tensors load into place."""
    if not meta:
        return model
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise EdgesmithError(f"{source}: quantization.version={meta.get('version') if isinstance(meta, dict) else meta!r}"
                             f" is not supported; allowed: {META_VERSION}")
    weights = meta.get("weights") or {}
    for hf_name, s in weights.items():
        name = _ours(hf_name)
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise EdgesmithError(f"{source}: quantization names unknown layer {hf_name!r}") from None
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            raise EdgesmithError(f"{source}: quantization names {hf_name!r}, which is not a Linear or an Embedding")
        if isinstance(s, dict) and "tied_to" in s:
            continue  # rebuilt with the table it reads, below
        try:
            if isinstance(mod, nn.Embedding):
                q = QuantizedEmbedding(mod.num_embeddings, mod.embedding_dim, s["bits"], s["group_size"])
            else:
                q = QuantizedLinear(mod.in_features, mod.out_features, s["bits"], s["group_size"], s.get("act_bits"),
                                    bias=mod.bias is not None)
        except (KeyError, TypeError) as e:
            raise EdgesmithError(f"{source}: quantization scheme of {hf_name!r} is malformed ({e})") from None
        except EdgesmithError as e:
            raise EdgesmithError(f"{source}: {hf_name}: {e}") from None
        replace_module_(model, name, q)
    _tie_heads_(model, weights, source)
    for hf_name in ((meta.get("kv_cache") or {}).get("layers") or []):
        name = _ours(hf_name)
        attn = model.get_submodule(name)
        zeros = torch.zeros(attn.n_kv_heads)
        replace_module_(model, name, Int8KVAttention(attn, zeros, zeros))
    return model


def _tie_heads_(model: nn.Module, weights: dict, source: str) -> None:
    """Point a tied model's lm_head at its quantized embedding (float tied heads stay as they are)."""
    if not getattr(getattr(model, "config", None), "tie_embeddings", False):
        if any(isinstance(s, dict) and "tied_to" in s for s in weights.values()):
            raise EdgesmithError(f"{source}: quantization ties lm_head to the embedding, but config.json has "
                                 "tie_word_embeddings=false")
        return
    table = model.get_submodule("embed_tokens")
    if isinstance(table, QuantizedEmbedding):
        replace_module_(model, "lm_head", TiedQuantizedHead(table))
    elif "lm_head" in weights:
        raise EdgesmithError(f"{source}: quantization names 'lm_head' of a tied model whose embedding is float; "
                             "a tied lm_head follows model.embed_tokens")
