"""ONNX export of Hugging Face decoders our model family cannot represent, through optimum.

A directory saved by `transformers` (no `edgesmith.json`: Qwen2, Phi, Gemma, ...) goes through
optimum's ONNX exporter with the `text-generation-with-past` task: a decoder whose KV cache is
explicit inputs/outputs, plus `attention_mask` and `position_ids`. It gets the same manifest
(`exporter` says optimum) and the same parity check, against `transformers` as the reference,
through `runtimes.backends.onnxruntime`. fp32 only: optimum exports fp16 only on a GPU. Weights are read
from safetensors only. This module does not convert or optimize the graph.
"""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import lineage_path, read_json, replace_dir, sha256_file, temp_dir_for
from models.errors import EdgesmithError
from models.version import versions
from runtimes.artifact import MANIFEST_FORMAT
from runtimes.backends.onnxruntime import OnnxRuntimeBackend
from toolchain.export.manifest import MANIFEST_VERSION, package_version, write_manifest
from toolchain.export.parity import PARITY_TEXT, check_parity

EXPORTER = "optimum (text-generation-with-past)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def is_hf_directory(path: Path) -> bool:
    """A transformers-saved directory rather than an edgesmith checkpoint."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / "edgesmith.json").exists()


class HFReference(nn.Module):
    """transformers' model as the parity reference: ids `(1, T)` -> logits `(1, T, V)`."""

    def __init__(self, src: Path):
        super().__init__()
        from transformers import AutoModelForCausalLM

        if not any(src.glob("*.safetensors")):
            raise EdgesmithError(f"{src}: no safetensors weights (pickle weights are never loaded)")
        self.hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, use_safetensors=True).eval()
        self.config = self.hf.config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(tokens, use_cache=False).logits


def parity_prompt(src: Path, vocab_size: int, positions: int) -> list[int]:
    """The parity text through the directory's tokenizer.json, or fixed ids when it has none."""
    if (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(PARITY_TEXT).ids
    else:
        ids = list(range(1, vocab_size, max(1, vocab_size // 97)))
    return [i for i in (ids * (positions // max(1, len(ids)) + 1)) if i < vocab_size][:positions]


def export_hf(src: Path, out: Path, cfg, log=print) -> dict:
    if cfg.format != "onnx":
        raise EdgesmithError(f"{src}: a Hugging Face directory (no edgesmith.json) exports only with --format onnx "
                             "(through optimum); import it with `edgesmith import-hf` (Llama, Mistral, Qwen2, Qwen3) for the other formats")
    if cfg.precision != "fp32" or not cfg.fuse:
        raise EdgesmithError(f"{src}: optimum's ONNX export here is fp32 with its own graph; allowed: "
                             "--precision fp32, without --no-fuse")
    from optimum.exporters.onnx import main_export

    hf_config = read_json(src / "config.json")
    max_seq_len = cfg.max_seq_len or int(hf_config.get("max_position_embeddings", 2048))
    tmp = temp_dir_for(out)
    try:
        reference = HFReference(src)
        t0 = time.perf_counter()
        main_export(str(src), output=str(tmp), task="text-generation-with-past", do_validation=False)
        export_s = time.perf_counter() - t0
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy(src / name, tmp / name)
        manifest = hf_manifest(src, out, hf_config, max_seq_len)
        manifest["export_s"] = round(export_s, 3)
        write_manifest(tmp, manifest)
        vocab = int(hf_config["vocab_size"])
        prompt = parity_prompt(src, vocab, cfg.parity_positions)
        manifest["parity"] = check_parity(reference, OnnxRuntimeBackend(tmp), None, "fp32", greedy_steps=cfg.greedy_steps,
                                          prompt=prompt)
        manifest["parity"].update(runtime="onnxruntime", reference="transformers fp32")
        write_manifest(tmp, manifest)
        if not manifest["parity"]["passed"]:
            raise EdgesmithError("onnx (optimum): parity below threshold: " + "; ".join(manifest["parity"]["failures"]))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def hf_manifest(src: Path, out: Path, hf_config: dict, max_seq_len: int) -> dict:
    return {
        "manifest": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "format": "onnx",
        "exporter": EXPORTER,
        "entry": "model.onnx",
        "precision": "fp32",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": {"graph": "optimum", "onnx_file": "model.onnx", "max_seq_len": max_seq_len},
        "model": hf_config,
        "tokenizer": {"file": "tokenizer.json"} if (src / "tokenizer.json").is_file() else None,
        "quantization": None,
        "lineage": {"hf_source": lineage_path(src, out), "config_sha256": sha256_file(src / "config.json")},
        "target_device": None,
        "files": {},
        "parity": None,
        "versions": {**versions(), **{p: package_version(p) for p in ("onnxruntime", "optimum", "optimum-onnx",
                                                                       "transformers")}},
    }

