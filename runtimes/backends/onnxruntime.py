"""ONNX Runtime backend for an ONNX artifact directory (fused or plain decoder graph, or optimum's).

Checks the manifest's sha256 values and the graph's external-data references (runtimes.headers:
confined to the directory, listed in the manifest, inside their files), and opens the graph on the
CPU provider with its options set on purpose: `intra_op_num_threads` (one for tiny models, else one
per core; see `runtimes.session.default_threads`), one inter-op thread, sequential execution and
`ORT_ENABLE_ALL` graph optimizations.

- **fused** graph (GroupQueryAttention): the KV cache is one preallocated `max_seq_len` OrtValue
  per layer and kind, bound through IOBinding as both the `past_*` input and the `present_*` output,
  so GroupQueryAttention writes each new position in place: nothing is copied or concatenated per
  token. `seqlens_k` / `total_sequence_length` say how much of it is valid, so `rewind` is free.
  The decode logits go to one preallocated OrtValue.
- **plain** graph (standard ops) and optimum's `text-generation-with-past` graph (extra
  `attention_mask` / `position_ids`): the graph itself concatenates, `present` becomes the next
  `past`; `rewind` slices it.

MatMulNBits accuracy level. The exporter writes `accuracy_level=0` (dequantize, float matmul: what
the fake-quant reference computes, so the manifest's parity is held to float thresholds). ORT's
fast CPU path for 4-bit weights is `accuracy_level=4`: int8 activations, integer dot products.
`accuracy_level=4` here rewrites the attribute of every MatMulNBits node in memory before the
session is created (and sets the QDQ fusion level for the plain graph), leaving the artifact as
checked. It changes the numerics: activations are rounded to int8 per block, as llama.cpp's
Q4_0 x Q8_0 dot products do (tests/runtimes check it against the int4 parity threshold).
Batch size 1; no sampling (the Session does it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import EdgesmithError
from models.registry import BACKENDS
from runtimes.artifact import artifact_bytes, read_manifest
from runtimes.headers import read_onnx
from runtimes.session import Session, default_threads

RUNTIME_PACKAGE = "onnxruntime"
_NP = {"fp32": np.float32, "fp16": np.float16}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: unset (as stored), fp32, fp16, bf16, int8 activations


def graph_with_accuracy_level(model, level: int) -> bytes | None:
    """The graph (an onnx.ModelProto parsed without its external data, which stays on disk) with every
    MatMulNBits node's `accuracy_level` set, or None when it has none. Edits `model`."""
    from onnx import helper

    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return None
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
    return model.SerializeToString()


@BACKENDS.register("onnxruntime", formats=("onnx",), also=("tensorrt",))
class OnnxRuntimeSession(Session):
    backend = "onnxruntime"

    def __init__(self, directory: str | Path, n_threads: int | None = None, fmt: str = "onnx",
                 accuracy_level: int | None = None, tokenizer=None):
        import onnxruntime as ort

        if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
            raise EdgesmithError(f"accuracy_level {accuracy_level!r}; allowed: {', '.join(map(str, ACCURACY_LEVELS))} "
                                 "(4: int8 activations for 4/8-bit weights)")
        self.ort = ort
        directory = Path(directory)
        manifest = read_manifest(directory, fmt)
        opts = manifest["options"]
        self.graph = opts["graph"]
        self.dtype = _NP.get(manifest["precision"], np.float32)
        self.n_threads = n_threads or default_threads(artifact_bytes(manifest))
        self.accuracy_level = accuracy_level
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.n_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT fuses DequantizeLinear+MatMul (plain graph) into MatMulNBits at this level; 0 computes
        # what the graph says (dequantize, float matmul).
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level or 0))
        onnx_path = directory / opts["onnx_file"]
        # before ONNX Runtime sees the file: every external-data location inside the directory, listed in
        # the manifest and long enough (parsed once: the accuracy level edits this parse)
        _, model = read_onnx(onnx_path, directory, files=list(manifest.get("files", {})))
        graph = graph_with_accuracy_level(model, accuracy_level) if accuracy_level else None
        del model
        try:  # a corrupt graph or external data file: ONNX Runtime's own exception types
            if graph is not None:
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
            self.session = ort.InferenceSession(graph if graph is not None else str(onnx_path), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:
            data = f" (external data {onnx_path}.data)" if opts.get("external_data") else ""
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise EdgesmithError(f"{onnx_path}{data}: ONNX Runtime could not load the graph ({reason})") from None
        del graph
        try:  # the graph's declared inputs and outputs size what this backend allocates: checked, not trusted
            vocab = next(o.shape[-1] for o in self.session.get_outputs() if o.name == "logits")
            super().__init__(int(opts["max_seq_len"]), int(vocab), tokenizer, manifest, directory)
            inputs = {i.name: i for i in self.session.get_inputs()}
            self.empty_past = {}  # (1, n_kv, 0, head_dim) per cache input, as the graph declares it
            for name, info in inputs.items():
                if name.startswith("past_key_values."):
                    n_kv, head_dim = int(info.shape[1]), int(info.shape[3])
                    if not (1 <= n_kv <= 1024 and 1 <= head_dim <= 4096):
                        raise ValueError(f"{name} declares {n_kv} heads of {head_dim}")
                    dtype = np.float16 if "float16" in info.type else np.float32
                    self.empty_past[name.removeprefix("past_key_values.")] = np.zeros((1, n_kv, 0, head_dim), dtype)
            if not 1 <= self.vocab_size <= 1 << 22:
                raise ValueError(f"logits of {self.vocab_size} tokens")
        except (StopIteration, TypeError, ValueError, IndexError) as e:
            raise EdgesmithError(f"{onnx_path}: not a decoder graph this backend runs (its inputs and outputs: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
        self.run_options = {"n_threads": self.n_threads, "accuracy_level": accuracy_level or 0}
        # Graphs from other exporters (optimum) also take an attention mask and explicit positions.
        self.extra_inputs = {"attention_mask", "position_ids"} & set(inputs)
        self.onnx_path = onnx_path
        state = ort.capi.onnxruntime_pybind11_state
        self.ort_errors = (RuntimeError, ValueError, *(getattr(state, n) for n in (
            "Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "NotImplemented", "EPFail")
            if hasattr(state, n)))
        self.names = list(self.empty_past)
        if self.graph == "fused":
            self._bind_fused_cache()
        self.reset()

    def _bind_fused_cache(self) -> None:
        ort, S = self.ort, self.max_seq_len
        self.cache = {n: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, e.shape[1], S, e.shape[3]), self.dtype))
                      for n, e in self.empty_past.items()}
        self.binding = self.session.io_binding()
        for n, buf in self.cache.items():
            self.binding.bind_ortvalue_input(f"past_key_values.{n}", buf)
            self.binding.bind_ortvalue_output(f"present.{n}", buf)  # the same buffer: written in place
        self._decode_logits = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, self.vocab_size), np.float32)

    def _rewind(self, n: int) -> None:
        if self.graph != "fused":
            self.past = (dict(self.empty_past) if n == 0 else
                         {name: np.ascontiguousarray(v[:, :, :n]) for name, v in self.past.items()})

    def _forward(self, ids: list[int], start: int, all_logits: bool) -> np.ndarray:
        input_ids = np.array([ids], dtype=np.int64)
        try:
            logits = self._run_fused(input_ids, start) if self.graph == "fused" else self._run_plain(input_ids, start)
        except KeyError as e:  # an output the graph lacks
            raise EdgesmithError(f"{self.onnx_path}: the graph has no output {e} (not a decoder this backend runs)") \
                from None
        except self.ort_errors as e:  # a graph that loaded but cannot run: ONNX Runtime's reason, in one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise EdgesmithError(f"{self.onnx_path}: ONNX Runtime could not run the graph ({reason})") from None
        return logits[0] if all_logits else logits[0, -1:]

    def _run_fused(self, input_ids: np.ndarray, start: int) -> np.ndarray:
        T = input_ids.shape[1]
        total = start + T
        # bind_cpu_input binds the arrays' memory without copying: keep them alive until the run ends.
        self._inputs = (input_ids, np.array([total - 1], dtype=np.int32), np.array(total, dtype=np.int32))
        for name, value in zip(("input_ids", "seqlens_k", "total_sequence_length"), self._inputs):
            self.binding.bind_cpu_input(name, value)
        out = (self._decode_logits if T == 1 else
               self.ort.OrtValue.ortvalue_from_shape_and_type((1, T, self.vocab_size), np.float32))
        self.binding.bind_ortvalue_output("logits", out)
        self.session.run_with_iobinding(self.binding)
        return out.numpy().copy()  # numpy() is a view; the decode buffer is reused by the next step

    def _run_plain(self, input_ids: np.ndarray, start: int) -> np.ndarray:
        T = input_ids.shape[1]
        feeds = {"input_ids": input_ids, **{f"past_key_values.{n}": v for n, v in self.past.items()}}
        if "attention_mask" in self.extra_inputs:
            feeds["attention_mask"] = np.ones((1, start + T), dtype=np.int64)
        if "position_ids" in self.extra_inputs:
            feeds["position_ids"] = np.arange(start, start + T, dtype=np.int64)[None]
        out = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))
        self.past = {n: out[f"present.{n}"] for n in self.names}
        return out["logits"].astype(np.float32, copy=False)


OnnxRuntimeBackend = OnnxRuntimeSession  # the name the exporters' parity checks use
