"""The torch backend: our Transformer in eager mode with its static KV cache, optionally with the
one-token decode step compiled by `torch.compile`.

Loads an edgesmith checkpoint (weights verified against `edgesmith.json`) or a plain Hugging Face
Llama directory (`config.json` + safetensors, converted in memory). Quantized Linears (weight-only
codes) are dequantized once at load into float Linears holding exactly the fake-quant weights, so
the numerics are the checkpoint's and no call re-dequantizes; Linears that also quantize their
activations (SmoothQuant) are kept as they are. The cache is the model's own (`setup_cache`), written
by position, so `rewind` is free. The tokenizer is the checkpoint's `tokenizer.json`.

Kernels (`kernels="fused"`): the session applies `kernels.fuse_` to its own model once, at construction
(fused RMSNorm, RoPE, SwiGLU, flash / split-KV decode attention), and weight-only quantized Linears are
kept as codes so the int4/int8 matmul kernel reads them instead of a dequantized float weight.
"reference" is the model's own PyTorch (`fuse_(model, "reference")` puts back a model that came in
fused; its cached attention also reads only the live keys, models/llama.py). `from_path` (what
`runtimes.load(checkpoint)`, `generate`, `eval`, `bench` and the GUI run) defaults to "fused" wherever the
fused implementation exists for the device (the CPU library built, `default_kernels`): tests/kernels
checks it gives the reference's greedy tokens and logits; `kernels="reference"` asks for the exact path.
A model handed to the constructor is the caller's: it runs "reference" unless told otherwise. The
choice lives in the model's modules, so sessions in one process (a speculative draft and its target,
two threads) never see each other's.

Compilation (`compile=True`) wraps only the decode step, with static shapes: prefill and multi-token
calls stay eager (gpt-fast compiles the hot function only). It is compiled on the first decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kernels import check_mode, cpu, fuse_
from models.checkpoint import from_hf_config, load_checkpoint, load_state_dict_, read_json
from models.errors import EdgesmithError
from models.hf import read_hf_weights
from models.llama import Transformer
from models.registry import BACKENDS
from models.tokenizer import Tokenizer
from models.quant import QuantizedLinear, replace_module_
from runtimes.session import Session

RUNTIME_PACKAGE = "torch"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dequantize_linears_(model: nn.Module) -> list[str]:
    """Swap each weight-only QuantizedLinear for an nn.Linear holding `scale * code`; names swapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.act_bits is None]
    for name in names:
        q = model.get_submodule(name)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device)
        linear.weight = nn.Parameter(q.dequantize(torch.float32), requires_grad=False)
        if q.bias is not None:  # Qwen2's q/k/v
            linear.bias = nn.Parameter(q.bias.detach().float(), requires_grad=False)
        replace_module_(model, name, linear)
    return names


def load_model(path: Path):
    """(model, tokenizer) from an edgesmith checkpoint or a transformers-saved Llama directory."""
    if (path / "edgesmith.json").is_file():
        ckpt = load_checkpoint(path)
        return ckpt.model, ckpt.tokenizer
    config = from_hf_config(read_json(path / "config.json"), str(path / "config.json"))
    model = Transformer(config)
    load_state_dict_(model, read_hf_weights(path), path)
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    return model.eval(), tokenizer


def default_kernels() -> str:
    """The kernels a checkpoint runs by default: "fused" where the fused CPU library is available (the
    session runs on the CPU), else "reference" (the fused ops would fall back to their slow references)."""
    return "fused" if cpu.available() else "reference"


@BACKENDS.register("torch", formats=())
class TorchSession(Session):
    backend = "torch"

    def __init__(self, model: Transformer, tokenizer=None, max_seq_len: int | None = None, compile: bool = False,
                 dtype: str | None = None, path=None, kernels: str = "reference"):
        if dtype is not None and dtype not in DTYPES:
            raise EdgesmithError(f"torch session dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        self.kernels = check_mode(kernels)
        S = max_seq_len or model.config.max_seq_len
        if not 1 <= S <= model.config.max_seq_len:
            raise EdgesmithError(f"max_seq_len {S}: must be in 1..{model.config.max_seq_len} (the model's)")
        super().__init__(S, model.config.vocab_size, tokenizer, path=path)
        self.run_options = {"n_threads": torch.get_num_threads(), "kernels": self.kernels}
        self.model = (model if dtype is None else model.to(DTYPES[dtype])).eval()  # None: as it is
        fuse_(self.model, self.kernels)  # this model's modules only; "reference" unfuses one that came fused
        model.setup_cache(1, S)  # zeros, in the model's dtype
        self.compiled = compile
        self._decode_step = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step

    @classmethod
    def from_path(cls, path: str | Path, compile: bool = False, dtype: str = "fp32", max_seq_len: int | None = None,
                  n_threads: int | None = None, kernels: str | None = None) -> TorchSession:
        """Load a checkpoint directory. `n_threads` sets torch's (process-wide) intra-op thread count;
        `kernels` None: `default_kernels()`."""
        path = Path(path)
        if n_threads is not None:
            if n_threads < 1:
                raise EdgesmithError(f"n_threads: {n_threads} must be >= 1")
            torch.set_num_threads(n_threads)
        kernels = default_kernels() if kernels is None else check_mode(kernels)
        model, tokenizer = load_model(path)
        if kernels == "reference":  # fused: the weight-only kernel reads the codes
            dequantize_linears_(model)
        return cls(model, tokenizer, max_seq_len=max_seq_len, compile=compile, dtype=dtype, path=path, kernels=kernels)

    def _step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos)

    @torch.inference_mode()
    def _forward(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        tokens = torch.tensor([ids], dtype=torch.long)
        input_pos = torch.arange(start, start + len(ids))
        step = self._decode_step if len(ids) == 1 else self._step
        logits = step(tokens, input_pos)[0]
        return (logits if all_logits else logits[-1:]).float().numpy()

    def _rewind(self, n: int) -> None:
        if n == 0:  # a fresh start leaves nothing of the previous run in memory
            self.model.reset_cache()
