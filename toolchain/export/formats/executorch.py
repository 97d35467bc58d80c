"""ExecuTorch export: `torch.export` + `to_edge_transform_and_lower` with the XNNPACK partitioner.

The program is what ExecuTorch's own Llama export writes, from our one Transformer through module swaps
(toolchain/export/executorch_lowering.py):

- attention and the static KV cache through ExecuTorch's LLM custom ops (`llama::update_cache`, written in
  place; `llama::custom_sdpa`, causal and grouped-query from the start position); the cache is a mutable
  buffer of the program and persists between calls;
- `forward(tokens (1, T), input_pos (1,))`, T dynamic in [1, max_seq_len], `input_pos[0]` the first position
  (the convention of ExecuTorch's Llama runner), plus the runner's metadata methods (`get_max_seq_len`,
  `get_vocab_size`, `use_kv_cache`, `use_sdpa_with_kv_cache`, `enable_dynamic_shape`, `get_bos_id`,
  `get_eos_ids`, `get_n_layers`, `get_max_context_len`);
- quantized Linears (fp32 activations) as XNNPACK's 8da4w kernel from our codes, never re-quantized: one int4
  plane for 4 bits, two for 8; codes outside what the kernel holds are clamped (the fast default, each clamp
  counted and the largest weight change measured) or, with `--exact`, held by one more plane. The manifest's
  `quantization.stored_as` says per tensor what it became and `quantization.deviation` the measured max |dw|
  (bf16 group scales included); codes quantized with `target=xnnpack` go through bit for bit;
- a quantized token embedding through ExecuTorch's quantized kernels (`quantized_decomposed::embedding_4bit` /
  `embedding_byte`; `options.custom_ops` then names "quantized"), or with `--portable-embedding` as a lookup in
  portable ops, for a runtime built without them.

The parity check compares the program with the fake-quant model of the checkpoint (our codes), so what
clamping changes is measured there, against the unchanged int4 / int8 thresholds. The runtime loads the custom
ops' kernels before the program (runtimes/backends/executorch.py). Export prints a bar over its stages
(prepare, export, lower, serialize). fp16 with quantized weights is refused (not built); int8 KV caches are
refused by name. `model.pte` is written with `tokenizer.json` beside it.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from kernels import refuse_fused
from models.checkpoint import Checkpoint
from models.errors import EdgesmithError
from models.llama import Transformer
from models.lowrank import LowRankLinear
from models.quant import QuantizedEmbedding, QuantizedLinear, _hf
from runtimes.backends.executorch import ExecuTorchBackend
from runtimes.probe import remember
from toolchain.export.executorch_lowering import StartPosDecoder, ring_layers, swap_attention_, swap_quantized_
from toolchain.export.heap import freed_memory_returned
from toolchain.export.spec import FormatSpec, quantization_scheme, refuse_int8_kv_cache, register_format

FILE = "model.pte"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
STAGES = ("prepare", "export", "lower", "serialize")
# Tokens per call: prompts are prefilled in chunks of this many. The program's activations (the (1, T, vocab)
# logits first: 131 MB at vocab 32000 and T 1024) are planned for it rather than for the whole cache.
MAX_TOKENS_PER_CALL = 128
EMBEDDING_STORED_AS = {(4, False): "packed int4: quantized_decomposed::embedding_4bit (fp32 group scales)",
                       (8, False): "int8: quantized_decomposed::embedding_byte (fp32 group scales)",
                       (4, True): "packed int4 lookup in portable ops (fp32 group scales)",
                       (8, True): "int8 lookup in portable ops (fp32 group scales)"}


def stored_as(bits: int, info: dict) -> str:
    """What one quantized Linear became, in words, with its measured deviation."""
    kind = "8da4w: XNNPACK qd8-qb4w" if bits == 4 else "8da8w: XNNPACK qd8-qb4w, 16*hi + lo planes"
    extra = f", {info['clamped_codes']} codes clamped" if info["clamped_codes"] else ""
    return f"{kind} ({info['planes']} plane{'s' if info['planes'] > 1 else ''}, bf16 scales{extra}; " \
           f"max |dw| {info['max_abs_dw']:.3g})"


def metadata(model: Transformer, tokenizer, max_seq_len: int) -> dict:
    """The constant methods ExecuTorch's Llama runner reads: `get_max_seq_len` is the most tokens per call (its
    prefiller chunks longer prompts), `get_max_context_len` the cache's length."""
    return {"get_max_seq_len": min(MAX_TOKENS_PER_CALL, max_seq_len), "get_max_context_len": max_seq_len,
            "get_n_layers": model.config.n_layers, "get_vocab_size": model.config.vocab_size,
            "use_kv_cache": True, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
            "get_bos_id": tokenizer.bos_id, "get_eos_ids": [tokenizer.eos_id]}


def export_program(model: Transformer, precision: str, max_seq_len: int, exact: bool = False,
                   constant_methods: dict | None = None, progress: bool = True, portable_embedding: bool = False):
    """(the lowered program manager, {Linear name: what it became}); `.buffer` holds the .pte bytes."""
    refuse_fused(model, "executorch")  # torch.export would capture edgesmith::* ops no XNNPACK runtime has
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    bar = tqdm(total=len(STAGES), desc="executorch", unit="stage", disable=not progress, leave=False)
    bar.set_postfix_str(STAGES[0])
    dtype = _DTYPES[precision]
    model = model.to(dtype).eval()
    model.setup_cache(1, max_seq_len)  # the rope tables and the mask at this length
    swap_attention_(model, max_seq_len, dtype, min(MAX_TOKENS_PER_CALL, max_seq_len))
    linears = swap_quantized_(model, exact, portable_embedding)  # after setup_cache, which asks the embedding for its dtype
    # One greedy partitioner for every precision: the dynamically quantized Linears and the element-wise ops between
    # them share partitions (with the norms and the rotation in XNNPACK's ops, two per layer: a 6-layer 1024-wide
    # 4-bit model makes 13 delegate calls per token instead of 83 with a per-Linear quantized partitioner first,
    # lowering -30 %, decode the same or faster, the same logits bit for bit).
    partitioners = [XnnpackPartitioner()]
    seq = torch.export.Dim("seq", min=1, max=min(MAX_TOKENS_PER_CALL, max_seq_len))
    example = (torch.zeros(1, 3, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    with torch.no_grad():
        bar.update(); bar.set_postfix_str(STAGES[1])
        exported = torch.export.export(StartPosDecoder(model), example, dynamic_shapes=({1: seq}, None), strict=False)
        bar.update(); bar.set_postfix_str(STAGES[2])
        edge = to_edge_transform_and_lower(exported, partitioner=partitioners, constant_methods=constant_methods,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        bar.update(); bar.set_postfix_str(STAGES[3])
        # Mutated buffers are serialized without contents unless marked: the cache starts as the zeros
        # the torch model starts with, never as whatever the memory held (0 x NaN would leak through
        # the softmax).
        program = edge.to_executorch(ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])]))
        program.buffer  # noqa: B018 (serializes now, inside the bar)
    bar.update()
    bar.close()
    return program, linears


def write(ckpt: Checkpoint, cfg, tmp: Path, max_seq_len: int) -> dict:
    refuse_int8_kv_cache(ckpt.model, "executorch")
    quantized = [n for n, m in ckpt.model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    if quantized and cfg.precision != "fp32":
        raise EdgesmithError(f"--precision: {cfg.precision} is not supported for a quantized checkpoint "
                             f"({quantized[0]}.weight) by --format executorch; allowed: fp32")
    if cfg.precision == "fp32":
        # New modules over the checkpoint's own tensors (the parity reference keeps its modules): the swaps replace
        # modules and never write a tensor, and ExecuTorch's module-level passes keep the last graph they ran on,
        # constants included, until the next export: shared, they cost nothing (a copy cost 0.37 GB at 336 M).
        model = copy.deepcopy(ckpt.model, {id(t): t for t in [*ckpt.model.parameters(), *ckpt.model.buffers()]})
    elif quantized or any(isinstance(m, LowRankLinear) for m in ckpt.model.modules()):  # low-rank: both factors kept
        model = copy.deepcopy(ckpt.model)  # fp16 casts the copy's tensors
    else:
        model = Transformer(ckpt.config)
        model.load_state_dict(ckpt.model.state_dict())
    with freed_memory_returned():  # the swap's per-Linear temporaries would stay in the heap (heap.py)
        program, linears = export_program(model, cfg.precision, max_seq_len, cfg.exact,
                                          metadata(ckpt.model, ckpt.tokenizer, max_seq_len),
                                          portable_embedding=cfg.portable_embedding)
        data = program.buffer
        del program, model
    (tmp / FILE).write_bytes(data)
    remember(hashlib.sha256(data).hexdigest(), "export")  # ours: loaded in this process next (parity), no probe
    embedding = {bits: EMBEDDING_STORED_AS[bits, cfg.portable_embedding] for bits in (4, 8)}
    quant = quantization_scheme(ckpt, {4: "", 8: ""}, embedding)
    if quant:
        theirs = {n: quant["weights"][_hf(n)]["bits"] for n in linears}  # before widen_codes_ (5 -> 8)
        quant["stored_as"].update({_hf(n): stored_as(info["bits"], info) + (
            f", holding {theirs[n]}-bit codes" if theirs[n] != info["bits"] else "") for n, info in linears.items()})
        quant["deviation"] = {"max_abs_dw": max((i["max_abs_dw"] for i in linears.values()), default=0.0),
                              "clamped_codes": sum(i["clamped_codes"] for i in linears.values()),
                              "exact": cfg.exact}
    clamped = quant["deviation"]["clamped_codes"] if quant else 0
    notice = (f"executorch: {clamped} codes outside XNNPACK's int4 range were clamped (max |dw| "
              f"{quant['deviation']['max_abs_dw']:.3g}); --exact keeps them (one more plane per Linear), "
              f"quantize with target=xnnpack avoids them") if clamped else None
    kernels = isinstance(ckpt.model.embed_tokens, QuantizedEmbedding) and not cfg.portable_embedding
    per_call = min(MAX_TOKENS_PER_CALL, max_seq_len)
    options = {"backend": "xnnpack", "method": "forward", "input_pos": "start", "max_tokens_per_call": per_call,
               "custom_ops": ["llama", "quantized"] if kernels else ["llama"]}
    rings = ring_layers(ckpt.config, max_seq_len, per_call)
    if rings:  # sliding layers keep window + per_call positions (a rewind may go back per_call at most)
        options["ring_cache"] = {"layers": rings, "positions": ckpt.config.sliding_window + per_call}
    return {"entry": FILE, "notice": notice, "quantization": quant, "options": options}


register_format(FormatSpec(name="executorch", precisions=("fp32", "fp16"), write=write, backend=ExecuTorchBackend,
                           runtime_package="executorch",
                           toolkit="executorch", estimate_s=50.0))
