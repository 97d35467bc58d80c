"""ExecuTorch export: `torch.export` + `to_edge_transform_and_lower` with the XNNPACK partitioner.

The model is our one Transformer with its static KV cache set up at `max_seq_len`: the cache
buffers become mutable buffers of the program, written by index at `input_pos`, so the .pte keeps
its cache between calls. The forward takes `tokens (1, T)` and `input_pos (T,)` with T dynamic in
[1, max_seq_len]: one method does the prefill and the one-token decodes. Export runs under
`torch.no_grad()`. `model.pte` is written with `tokenizer.json` beside it. Float only here
(fp32, fp16): a quantized checkpoint is refused with one line naming the first quantized tensor,
until the 8da4w/8da8w path (our codes as torchao's affine-quantized weights) lands.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.checkpoint import Checkpoint
from models.errors import EdgesmithError
from models.llama import Transformer
from models.quant import QuantizedLinear
from toolchain.export.registry import FormatSpec, refuse_int8_kv_cache, register_format

FILE = "model.pte"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class CachedDecoder(nn.Module):
    """`forward(tokens, input_pos) -> logits (1, T, V)` in fp32 through the model's static cache."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos).float()


def export_program(model: Transformer, precision: str, max_seq_len: int):
    """The lowered ExecuTorch program manager (call `.buffer` for the .pte bytes)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    model = model.to(_DTYPES[precision]).eval()
    model.setup_cache(1, max_seq_len)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    example = (torch.zeros(1, 3, dtype=torch.long), torch.arange(3))
    with torch.no_grad():
        exported = torch.export.export(CachedDecoder(model), example,
                                       dynamic_shapes=({1: seq}, {0: seq}), strict=False)
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        # Mutated buffers are serialized without contents unless marked: the cache starts as the zeros
        # the torch model starts with, never as whatever the memory held (0 x NaN would leak through
        # the masked softmax).
        return edge.to_executorch(ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])]))


def write(ckpt: Checkpoint, cfg, tmp: Path, max_seq_len: int) -> dict:
    refuse_int8_kv_cache(ckpt.model, "executorch")
    for name, m in ckpt.model.named_modules():
        if isinstance(m, QuantizedLinear):
            raise EdgesmithError(f"{name}.weight: {m.bits}-bit weights cannot be exported to ExecuTorch yet "
                                 "(8da4w/8da8w from our codes is not implemented); export a float checkpoint")
    model = Transformer(ckpt.config)
    model.load_state_dict(ckpt.model.state_dict())
    program = export_program(model, cfg.precision, max_seq_len)
    (tmp / FILE).write_bytes(program.buffer)
    return {"entry": FILE, "options": {"backend": "xnnpack", "method": "forward"}}


def _backend(directory: Path):
    from runtimes.executorch import ExecuTorchBackend

    return ExecuTorchBackend(directory)


register_format(FormatSpec(name="executorch", precisions=("fp32", "fp16"), write=write, backend=_backend,
                           runtime_package="executorch"))
