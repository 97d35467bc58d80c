"""ONNX Runtime backend for an ONNX artifact directory (fused or plain decoder graph).

Checks the manifest's sha256 values, opens `model.onnx` on the CPU provider and exposes the minimal
backend contract: `prefill(ids) -> (T, V)` logits of every position, `decode(id) -> (V,)`,
`reset()`. It also runs decoder graphs written by optimum (`text-generation-with-past`: the same
cache names plus `attention_mask` and `position_ids`). The fused graph keeps its KV cache in
preallocated `max_seq_len` buffers bound through IOBinding as both `past_*` input and `present_*`
output, so GroupQueryAttention writes in place and nothing is copied or concatenated per token. The
plain graph (standard ops) hands its `present` tensors back as the next `past`. Batch size 1; no
sampling, no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import EdgesmithError
from runtimes.artifact import read_manifest

RUNTIME_PACKAGE = "onnxruntime"
_NP = {"fp32": np.float32, "fp16": np.float16}


class OnnxRuntimeBackend:
    def __init__(self, directory: str | Path, n_threads: int = 1, fmt: str = "onnx"):
        import onnxruntime as ort

        self.ort = ort
        directory = Path(directory)
        self.manifest = read_manifest(directory, fmt)
        opts = self.manifest["options"]
        self.graph = opts["graph"]
        self.max_seq_len = int(opts["max_seq_len"])
        self.dtype = _NP[self.manifest["precision"]]
        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        # ORT fuses DequantizeLinear+MatMul into MatMulNBits with accuracy level 4 (int8 activations)
        # unless told otherwise; level 0 computes what the plain graph says: dequantize, float matmul.
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.session = ort.InferenceSession(str(directory / opts["onnx_file"]), so, providers=["CPUExecutionProvider"])
        self.vocab_size = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits")
        inputs = {i.name: i for i in self.session.get_inputs()}
        # Graphs from other exporters (optimum) also take an attention mask and explicit positions.
        self.extra_inputs = {"attention_mask", "position_ids"} & set(inputs)
        self.empty_past = {}  # (1, n_kv, 0, head_dim) per cache input, as the graph declares it
        for name, info in inputs.items():
            if name.startswith("past_key_values."):
                dtype = np.float16 if "float16" in info.type else np.float32
                shape = (1, info.shape[1], 0, info.shape[3])
                self.empty_past[name.removeprefix("past_key_values.")] = np.zeros(shape, dtype)
        self.names = list(self.empty_past)
        if self.graph == "fused":
            self.cache = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, e.shape[1], self.max_seq_len, e.shape[3]),
                                                                      self.dtype)) for n, e in self.empty_past.items()}
            self.binding = self.session.io_binding()
            for n, buf in self.cache.items():
                self.binding.bind_ortvalue_input(f"past_key_values.{n}", buf)
                self.binding.bind_ortvalue_output(f"present.{n}", buf)  # the same buffer: written in place
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        if self.graph != "fused":
            self.past = dict(self.empty_past)

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run `ids` from an empty cache; logits `(T, V)` of every position."""
        if not ids:
            raise EdgesmithError("prefill: empty prompt (at least one token is needed)")
        self.reset()
        return self._run(np.array([ids], dtype=np.int64))

    def decode(self, token: int) -> np.ndarray:
        """Feed one token at the next position; its logits `(V,)`."""
        return self._run(np.array([[int(token)]], dtype=np.int64))[0]

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        T = input_ids.shape[1]
        if self.pos + T > self.max_seq_len:
            raise EdgesmithError(f"{self.pos + T} tokens exceed the artifact's max_seq_len {self.max_seq_len}")
        if self.graph == "fused":
            total = self.pos + T
            # bind_cpu_input binds the arrays' memory without copying: keep them alive until the run ends.
            self._inputs = (input_ids, np.array([total - 1], dtype=np.int32), np.array(total, dtype=np.int32))
            for name, value in zip(("input_ids", "seqlens_k", "total_sequence_length"), self._inputs):
                self.binding.bind_cpu_input(name, value)
            out = self.ort.OrtValue.ortvalue_from_shape_and_type((1, T, self.vocab_size), np.float32)
            self.binding.bind_ortvalue_output("logits", out)
            self.session.run_with_iobinding(self.binding)
            logits = out.numpy()
        else:
            feeds = {"input_ids": input_ids, **{f"past_key_values.{n}": v for n, v in self.past.items()}}
            if "attention_mask" in self.extra_inputs:
                feeds["attention_mask"] = np.ones((1, self.pos + T), dtype=np.int64)
            if "position_ids" in self.extra_inputs:
                feeds["position_ids"] = np.arange(self.pos, self.pos + T, dtype=np.int64)[None]
            out = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))
            self.past = {n: out[f"present.{n}"] for n in self.names}
            logits = out["logits"]
        self.pos += T
        return logits[0].astype(np.float32)
