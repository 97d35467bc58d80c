"""Artifacts of one tiny trained checkpoint, exported once per test session on first use.

Session fixtures shared by the whole suite: tests/conftest.py imports them, so every package
(runtimes, kernels, devices, gui, reliability) reuses one training and one export per format.

`artifact(name)` exports the float checkpoint (or its RTN 4-bit child) to the named format and
returns the directory; every runtime test then loads it through `runtimes.load`. Trained rather
than random (see tests/toolchain/export/conftest.py): greedy comparisons need peaked logits.
"""

import numpy as np
import pytest
import torch

from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.llama import Transformer
from models.quant import quantize_linear_
from tests.conftest import TEXT
from tests.toolchain.export.conftest import fit
from toolchain.export import ExportConfig, export
from toolchain.export.parity import PARITY_TEXT, torch_threads

# name -> (checkpoint, export config)
ARTIFACTS = {
    "gguf": ("float", ExportConfig(format="gguf")),
    "onnx": ("float", ExportConfig(format="onnx")),
    "onnx-plain": ("float", ExportConfig(format="onnx", fuse=False)),
    "executorch": ("float", ExportConfig(format="executorch")),
    "tensorrt": ("float", ExportConfig(format="tensorrt")),
    "gguf-q4": ("q4", ExportConfig(format="gguf")),
    "onnx-q4": ("q4", ExportConfig(format="onnx")),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer, tiny_config):
    """{"float": trained tiny checkpoint, "q4": its RTN 4-bit group-32 child, "draft": a barely
    trained model with the same tokenizer (a poor draft: many rejections)}."""
    root = tmp_path_factory.mktemp("runtime-ckpts")
    tokens = np.array(tokenizer.encode(TEXT + PARITY_TEXT * 20), dtype=np.uint16)
    paths = {}
    for name, steps in (("float", 40), ("draft", 3)):
        torch.manual_seed(1 if name == "draft" else 0)
        model = Transformer(tiny_config)
        with torch_threads(1):
            fit(model, tokens, steps=steps)
        paths[name] = save_checkpoint(model, tokenizer, root / name, lineage={"parent": None, "passes": []})
    ckpt = load_checkpoint(paths["float"])
    quantize_linear_(ckpt.model, 4, 32)
    paths["q4"] = save_checkpoint(ckpt.model, tokenizer, root / "q4",
                                  child_lineage(ckpt, {"kind": "quantize", "method": "rtn", "bits": 4}))
    return paths


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("runtime-artifacts")
    made = {}

    def get(name: str):
        if name not in made:
            source, cfg = ARTIFACTS[name]
            with torch_threads(1):
                export(checkpoints[source], root / name, cfg, log=lambda line: None)
            made[name] = root / name
        return made[name]

    return get


@pytest.fixture(scope="session")
def prompt(tokenizer):
    return [tokenizer.bos_id, *tokenizer.encode(PARITY_TEXT[:60])]
