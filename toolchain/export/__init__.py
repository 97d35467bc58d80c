"""Export a checkpoint to ONNX, ExecuTorch, GGUF or TensorRT, parity-checked and with a manifest.

One format per file (onnx.py, executorch.py, gguf.py, tensorrt.py), found through `registry`;
`driver.export` is the one entry point; `parity` compares an artifact in its real runtime with
the torch reference; `manifest` writes the description every artifact directory carries.
"""

from toolchain.export.driver import ExportConfig, export

__all__ = ["ExportConfig", "export"]
