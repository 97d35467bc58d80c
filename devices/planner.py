"""The memory and roofline planner: does a model fit on a device, and how fast can it be at best.

- weights: every parameter at its stored precision; a b-bit weight costs b/8 bytes plus one fp16
  scale per group of 32 (our canonical form, GGUF Q4_0/Q8_0);
- KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes per element x tokens x batch;
- runtime overhead: RUNTIME_BYTES (runtime code, allocator, tokenizer) plus the activations of a
  PREFILL_CHUNK-token prefill chunk in fp32;
- it fits when the sum is within the device's RAM budget (`ram_budget_fraction` of RAM);
- decode is memory-bound: tok/s <= bandwidth / bytes read per token (every Linear, lm_head
  included, at its stored precision, plus the whole KV cache at that context);
- prefill is compute-bound: tok/s <= peak compute / FLOPs per token (2 per Linear weight, plus
  attention over half the context on average).

A bound is an upper limit, never a prediction: measured figures divided by it are the achieved
roofline fraction. This module computes; it runs nothing and reads no weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from devices.profiles import DeviceProfile, load_profile
from devices.shapes import ModelSpec, linear_shapes, resolve_model
from models.errors import EdgesmithError

BITS = {32: "fp32", 16: "fp16", 8: "int8", 5: "int5", 4: "int4"}  # 5: GGUF's Q5_0
PRECISION_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
GROUP_SIZE, SCALE_BYTES = 32, 2
RUNTIME_BYTES = 256 << 20
PREFILL_CHUNK = 512
DEFAULT_CONTEXT = 4096  # when --context is not given: the model's max_seq_len, at most this
# compute precision falls back to the next one the device lists (int4 weights run int8 dot products)
COMPUTE_FALLBACK = ("int4", "int8", "fp16", "bf16", "fp32")


def bytes_per_weight(bits: int, group_size: int = GROUP_SIZE, scale_bytes: float = SCALE_BYTES) -> float:
    """Bytes one weight costs stored at `bits`: a float as is, an integer code with its group's scale."""
    return bits / 8 if bits >= 16 else bits / 8 + scale_bytes / group_size


def keeps_window(fmt: str | None, cfg) -> bool:
    """Whether `fmt`'s runtime keeps only a sliding layer's window: our ExecuTorch ring, llama.cpp's window cache of
    its gemma2 / gemma3 (its llama / qwen2 / phi3 attend to the whole context; ONNX and TensorRT hold it all)."""
    return fmt == "executorch" or (fmt == "gguf" and cfg.family in ("gemma2", "gemma3"))


def kv_cache_bytes(cfg, tokens: float, bytes_per_element: float = 2, batch: int = 1, windows: bool = True) -> int:
    """2 (K and V) x kv_heads x head_dim x bytes x batch x the positions each layer keeps: `tokens`, or with
    `windows` a sliding layer's window where shorter (see keeps_window)."""
    kept = sum(tokens if cfg.window_of(i) is None or not windows else min(tokens, cfg.window_of(i))
               for i in range(cfg.n_layers))
    return int(2 * cfg.n_kv_heads * cfg.head_dim * bytes_per_element * kept * batch)


def largest_context(cfg, room: float, bytes_per_element: float, windows: bool = True) -> int:
    """The most tokens (at most max_seq_len) whose KV cache fits in `room` bytes."""
    lo, hi = 0, cfg.max_seq_len
    while lo < hi:  # kv_cache_bytes grows with the tokens (flat past a window)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if kv_cache_bytes(cfg, mid, bytes_per_element, windows=windows) <= room else (lo, mid - 1)
    return lo


def param_count(cfg) -> int:
    """Every parameter: embedding, Linears, norms, and lm_head unless tied."""
    linears = sum(o * i for o, i in linear_shapes(cfg).values())
    if cfg.tie_embeddings:
        linears -= cfg.vocab_size * cfg.dim
    return cfg.vocab_size * cfg.dim + linears + (2 * cfg.n_layers + 1) * cfg.dim


def linear_read_bytes(spec: ModelSpec, bits: int | None, lm_head_bits: int | None = None) -> float:
    """Bytes of Linear weights read per decoded token (lm_head included; a tied head reads the
    embedding table). `bits` None: each Linear as the checkpoint or artifact stores it."""
    total = 0.0
    for name, (o, i) in linear_shapes(spec.config).items():
        b = lm_head_bits if (name == "lm_head" and lm_head_bits) else bits
        total += o * i * _stored_bytes(spec, name, b)
    return total


def _stored_bytes(spec: ModelSpec, name: str, bits: int | None) -> float:
    if bits is not None:
        return bytes_per_weight(bits)
    q = spec.quantized.get(name) or (spec.quantized.get("model.embed_tokens") if name == "lm_head" and
                                     spec.config.tie_embeddings else None)
    if q:
        return bytes_per_weight(int(q["bits"]), int(q.get("group_size", GROUP_SIZE)))
    return PRECISION_BITS.get(spec.precision or "fp16", 16) / 8


def weight_bytes(spec: ModelSpec, bits: int | None) -> int:
    """Bytes of every stored parameter (what must sit in RAM)."""
    cfg = spec.config
    heads = linear_read_bytes(spec, bits)
    if cfg.tie_embeddings:  # the head's bytes are the embedding's: counted once
        embed = 0.0
    else:
        embed = cfg.vocab_size * cfg.dim * _stored_bytes(spec, "model.embed_tokens", bits)
    norms = (2 * cfg.n_layers + 1) * cfg.dim * (bits / 8 if bits and bits >= 16 else 2)
    return int(round(heads + embed + norms))


def overhead_bytes(cfg) -> int:
    return RUNTIME_BYTES + PREFILL_CHUNK * (2 * cfg.ffn_dim + 4 * cfg.dim) * 4 + cfg.vocab_size * 4


def flops_per_token(cfg, context: int) -> float:
    linear = sum(o * i for o, i in linear_shapes(cfg).values())
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (context / 2)  # QK^T and AV, half the context
    return 2 * linear + attention


def compute_rate(profile: DeviceProfile, precision: str) -> tuple[str, float]:
    """The peak rate weights of `precision` compute at: theirs, else the next wider the device lists."""
    start = COMPUTE_FALLBACK.index(precision) if precision in COMPUTE_FALLBACK else 0
    for p in COMPUTE_FALLBACK[start:]:
        if p in profile.peak_flops:
            return p, profile.peak_flops[p]
    p = max(profile.peak_flops, key=profile.peak_flops.get)
    return p, profile.peak_flops[p]


@dataclass
class Plan:
    device: str
    model: str
    precision: str
    context: int
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    budget_bytes: int
    fits: bool
    max_context: int
    bytes_per_token: float  # read per decoded token at `context`
    decode_tok_s_bound: float
    prefill_tok_s_bound: float
    compute_precision: str
    recommended_format: str
    recommended_precision: str
    window_layers: int = 0  # sliding layers
    windows_kept: bool = False  # the recommended format keeps only their window (keeps_window)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(profile: DeviceProfile | str, model, context: int | None = None, bits: int | None = None,
         kv_bytes_per_element: float = 2) -> Plan:
    """Fit and speed bounds of `model` (ModelConfig, size name, public shape, checkpoint or artifact
    directory) on `profile` at `context` tokens (default: the model's max_seq_len, at most
    DEFAULT_CONTEXT), with weights at `bits` (default: as stored when quantized, else the device's
    recommended precision), batch 1, fp16 KV cache unless told."""
    profile = load_profile(profile) if isinstance(profile, str) else profile
    spec = resolve_model(model)
    cfg = spec.config
    if bits is not None and bits not in BITS:
        raise EdgesmithError(f"--bits {bits!r}; allowed: {', '.join(str(b) for b in BITS)}")
    if context is None:
        context = min(cfg.max_seq_len, DEFAULT_CONTEXT)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise EdgesmithError(f"--context {context!r} must be a positive integer")
    budget, overhead = profile.ram_budget_bytes, overhead_bytes(cfg)
    windows = keeps_window(profile.formats[0], cfg)  # the format the plan recommends
    kv = kv_cache_bytes(cfg, context, kv_bytes_per_element, windows=windows)

    def fits_at(b: int | None) -> bool:
        return weight_bytes(spec, b) + kv + overhead <= budget

    recommended = next((p for p in profile.precisions if fits_at(PRECISION_BITS[p])),
                       min(profile.precisions, key=PRECISION_BITS.get))
    if bits is None and not spec.quantized:
        bits = PRECISION_BITS[recommended] if spec.precision is None else PRECISION_BITS[spec.precision]
    precision = BITS[bits] if bits is not None else _stored_label(spec)
    weights = weight_bytes(spec, bits)
    room = budget - weights - overhead
    max_context = largest_context(cfg, room, kv_bytes_per_element, windows) if room > 0 else 0
    read = linear_read_bytes(spec, bits) + kv
    compute_precision, rate = compute_rate(profile, precision if precision in PRECISION_BITS else "int8")
    return Plan(device=profile.name, model=spec.name, precision=precision, context=context, weight_bytes=weights,
                kv_bytes=kv, overhead_bytes=overhead, total_bytes=weights + kv + overhead, budget_bytes=budget,
                fits=weights + kv + overhead <= budget, max_context=int(max_context), bytes_per_token=read,
                decode_tok_s_bound=profile.bandwidth_bytes_s / read,
                prefill_tok_s_bound=rate / flops_per_token(cfg, context), compute_precision=compute_precision,
                recommended_format=profile.formats[0], recommended_precision=recommended,
                window_layers=sum(cfg.window_of(i) is not None for i in range(cfg.n_layers)), windows_kept=windows)


def _stored_label(spec: ModelSpec) -> str:
    bits = {int(q["bits"]) for q in spec.quantized.values()}
    return BITS[bits.pop()] if len(bits) == 1 else "mixed"


def format_plan(p: Plan) -> str:
    def gb(n: float) -> str:
        return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"

    lines = [f"{p.model} on {p.device}: weights {p.precision}, context {p.context:,} tokens, batch 1",
             f"  weights            {p.weight_bytes:>16,} bytes  ({gb(p.weight_bytes)})",
             f"  KV cache           {p.kv_bytes:>16,} bytes  ({gb(p.kv_bytes)})"
             + (f"  ({p.window_layers} sliding layers {'keep their window' if p.windows_kept else 'hold the whole context'}"
                f" in {p.recommended_format})" if p.window_layers else ""),
             f"  runtime overhead   {p.overhead_bytes:>16,} bytes  ({gb(p.overhead_bytes)})",
             f"  total              {p.total_bytes:>16,} bytes  ({gb(p.total_bytes)}) of a "
             f"{gb(p.budget_bytes)} budget: {'fits' if p.fits else 'does NOT fit'}",
             f"  largest context that fits: {p.max_context:,} tokens",
             f"  decode bound       {p.decode_tok_s_bound:>10,.1f} tok/s  (bandwidth / {gb(p.bytes_per_token)} "
             "read per token)",
             f"  prefill bound      {p.prefill_tok_s_bound:>10,.1f} tok/s  ({p.compute_precision} peak compute)",
             f"  recommended: {p.recommended_format}, {p.recommended_precision}"]
    return "\n".join(lines)


def target_verdict(device: str, artifact, fmt: str) -> str:
    """One line: does the artifact fit the device, its decode bound, and whether the device prefers this format
    (what `export --target` prints and the GUI's Export tab shows)."""
    profile = load_profile(device)
    p = plan(profile, str(artifact))
    fit = (f"fits ({p.total_bytes / 1e6:,.1f} MB of a {p.budget_bytes / 1e6:,.0f} MB budget at {p.context:,} "
           f"tokens)" if p.fits else f"does NOT fit ({p.total_bytes / 1e6:,.1f} MB of a {p.budget_bytes / 1e6:,.0f} "
           f"MB budget at {p.context:,} tokens; largest context that fits: {p.max_context:,})")
    prefers = "" if fmt in profile.formats else f"; {device} prefers {', '.join(profile.formats)}"
    return f"target {device:<12} {fit}, decode bound {p.decode_tok_s_bound:,.1f} tok/s{prefers}"
