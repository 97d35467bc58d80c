"""Import a Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-2 or Gemma-3 directory saved by Hugging Face `transformers` as an edgesmith checkpoint.

Reads `config.json`, the safetensors weights (one file or shards with an index) and
`tokenizer.json`; refuses pickle weights. Exporting the other way needs no code: our checkpoints
are already in the HF layout. This module does not import `transformers`.
"""

from __future__ import annotations

from pathlib import Path

from models.checkpoint import (from_hf_config, load_state_dict_, read_json, read_safetensors,
                               save_checkpoint, sha256_file)
from models.confine import confined
from models.errors import EdgesmithError
from models.layout import NORM_OFFSET
from models.llama import RMSNorm, Transformer
from models.tokenizer import Tokenizer


def read_hf_weights(src: Path) -> dict:
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.exists() or single.is_symlink():
        return read_safetensors(confined(src, single.name, what="weights"))
    if index.exists() or index.is_symlink():
        weight_map = read_json(confined(src, index.name, what="weights index")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise EdgesmithError(f"{index}: no 'weight_map' object")
        shards = [confined(src, shard, holder=index, what="shard") for shard in sorted(set(map(str, weight_map.values())))]
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(shard))
        return tensors
    pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
    if pickles:
        raise EdgesmithError(f"{src / pickles[0]}: pickle weights are never loaded; re-save the model with "
                             "save_pretrained(..., safe_serialization=True)")
    raise EdgesmithError(f"{single}: missing (no safetensors weights in {src})")


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Convert a transformers-saved directory of a supported family into a checkpoint at `out` (its family kept)."""
    src = Path(src)
    if not src.is_dir():
        raise EdgesmithError(f"{src}: no such directory")
    config = from_hf_config(read_json(confined(src, "config.json", what="file")), str(src / "config.json"))
    tokenizer = Tokenizer.load(src)
    if tokenizer.vocab_size > config.vocab_size:
        raise EdgesmithError(f"{src / 'tokenizer.json'}: {tokenizer.vocab_size} tokens but config.json "
                             f"vocab_size is {config.vocab_size}")
    tensors = read_hf_weights(src)
    model = Transformer(config)
    load_state_dict_(model, tensors, src)
    dtype = next(iter(tensors.values())).dtype
    model = model.to(dtype)
    if config.family in NORM_OFFSET:  # Gemma's 1 + w stays in fp32, the value transformers computes at run time
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.float()
    step = {"kind": "import-hf", "source": str(src.resolve()),
            "config_sha256": sha256_file(src / "config.json")}
    return save_checkpoint(model, tokenizer, out, lineage={"parent": None, "passes": [step]})

