"""Checkpoints in the Hugging Face layout, plus `edgesmith.json` for lineage and versions.

A checkpoint directory holds `config.json` (HF Llama fields), `model.safetensors` (HF tensor
names), `tokenizer.json` + `tokenizer_config.json`, and `edgesmith.json`. `transformers`
loads an unquantized one as it is. Writes go to a temporary directory renamed into place, so a
crash never leaves half a checkpoint; reads verify the weights' sha256 and name the file at fault.
Every file read is a regular file inside the directory (models.confine) and the safetensors header is
checked against the file's size before a tensor is allocated (models.headers).
Nothing is loaded with pickle. This module does not train, quantize or export.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.atomic import replace_dir, temp_dir_for, write_text_atomic  # noqa: F401 (re-exported)
from models.confine import confined, read_json, sha256_file  # noqa: F401 (re-exported)
from models.errors import EdgesmithError
from models.layout import fuse_hf, split_hf
from models.headers import check_safetensors
from models.llama import ModelConfig, Transformer, check_rope_scaling, rope_tables
from models.lowrank import apply_lowrank_meta_, lowrank_meta
from models.quant import apply_quantization_meta_, quantization_meta, quantized_numel
from models.tokenizer import Tokenizer
from models.version import versions

FORMAT = "edgesmith-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- HF config mapping


# family -> (transformers architecture, fields its config.json has beyond Llama's, with our values)
HF_FAMILIES = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}),
    "qwen3": ("Qwen3ForCausalLM", {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}),
    "phi3": ("Phi3ForCausalLM", {"sliding_window": None, "partial_rotary_factor": 1.0, "resid_pdrop": 0.0,
                                 "embd_pdrop": 0.0}),
    "gemma2": ("Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3ForCausalLM", {"use_bidirectional_attention": False}),
}
MODEL_TYPES = {"gemma3": "gemma3_text"}  # family -> config.json model_type, where they differ
GEMMA = ("gemma2", "gemma3")


def to_hf_config(cfg: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict:
    """The config.json transformers loads as the checkpoint's own family (Llama, Mistral, Qwen2, Qwen3, Phi-3)."""
    arch, extra = HF_FAMILIES[cfg.family]
    d = {
        "architectures": [arch],
        "model_type": MODEL_TYPES.get(cfg.family, cfg.family),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        **extra,
    }
    if cfg.family == "qwen2":  # Qwen2's q/k/v always carry a bias: its config has no field for it
        del d["attention_bias"], d["mlp_bias"]
    if cfg.family == "phi3":  # the context its RoPE was trained for (Phi3Config requires it)
        d["original_max_position_embeddings"] = cfg.max_seq_len
    if cfg.family in GEMMA:
        del d["hidden_act"], d["mlp_bias"]
        d.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
                 attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                 sliding_window=cfg.max_seq_len, layer_types=["full_attention"] * cfg.n_layers)
        if cfg.family == "gemma3":
            d["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    if cfg.sliding_window is not None:
        d.update(hf_window_fields(cfg))
    return d


def hf_window_fields(cfg: ModelConfig) -> dict:
    """A sliding window as the family's config writes it: Mistral's on every layer, Qwen's per layer."""
    if cfg.family in ("mistral", "phi3"):
        return {"sliding_window": cfg.sliding_window}
    types = ["sliding_attention" if cfg.window_of(i) else "full_attention" for i in range(cfg.n_layers)]
    if cfg.family in GEMMA:
        return {"sliding_window": cfg.sliding_window, "layer_types": types}
    return {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "layer_types": types,
            "max_window_layers": types.index("sliding_attention")}


# The largest value each size field may take: far beyond any model this tool deploys (a 405B Llama has
# dim 16384, 126 layers, vocab 128256, 131072 positions), small enough that a hostile config cannot ask for
# terabytes before its tensors are checked against it.
_MAX_SIZE = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
             "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10, "head_dim": 1 << 12, "num_key_value_heads": 1 << 10,
             "max_position_embeddings": 1 << 21}

# Fields of a HF config our model cannot represent, with the one value it can.
_FIXED = {"hidden_act": "silu", "mlp_bias": False, "partial_rotary_factor": 1.0}
# family -> the switches its architecture implies
_IMPLIED = {"llama": {}, "mistral": {}, "qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True}, "phi3": {},
            "gemma2": {}, "gemma3": {"qk_norm": True}}
_GEMMA_FIXED = {"hidden_activation": "gelu_pytorch_tanh", "use_bidirectional_attention": False}


def from_hf_config(d: dict, source: str) -> ModelConfig:
    """Map a HF config.json of a supported family to ModelConfig; name the field when ours cannot represent it."""
    model_types = {MODEL_TYPES.get(f, f): f for f in HF_FAMILIES}
    if d.get("model_type") not in model_types:
        raise EdgesmithError(f"{source}: model_type={d.get('model_type')!r:.40} is not supported; allowed: "
                             f"{', '.join(repr(t) for t in model_types)}")
    model_type = model_types[d["model_type"]]  # our family name from here on
    # attention_bias in Llama, Mistral and Qwen3 biases o_proj too; our switch is Qwen2's (q/k/v only)
    fixed = _FIXED if model_type == "qwen2" else {**_FIXED, "attention_bias": False}
    if model_type in GEMMA:  # Gemma names its activation hidden_activation
        fixed = {**{k: v for k, v in fixed.items() if k != "hidden_act"}, **_GEMMA_FIXED}
    for key, allowed in fixed.items():
        if d.get(key, allowed) != allowed:
            raise EdgesmithError(f"{source}: {key}={d[key]!r:.60} is not supported; allowed: {allowed!r}")
    switches = {**_IMPLIED[model_type], **window_switches(d, model_type, source), **gemma_switches(d, model_type)}
    scaling = d.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise EdgesmithError(f"{source}: rope_scaling={scaling!r:.60} must be an object or null")
        scaling = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}  # older configs: "type"
        if scaling.get("rope_type") == "default":
            scaling = None
        else:
            try:
                check_rope_scaling(scaling)
            except EdgesmithError as e:
                raise EdgesmithError(f"{source}: {e}") from None
            switches["rope_scaling"] = tuple(sorted(scaling.items()))
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in required:
        if key not in d:
            raise EdgesmithError(f"{source}: missing field {key!r}")
    for key in (*required, "head_dim", "num_key_value_heads", "max_position_embeddings"):
        value = d.get(key)
        if (value is not None or key in required) and (type(value) is not int or not 1 <= value <= _MAX_SIZE[key]):
            raise EdgesmithError(f"{source}: {key}={value!r:.40} must be an integer in 1..{_MAX_SIZE[key]}")
    for key in ("rope_theta", "rms_norm_eps"):
        value = d.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise EdgesmithError(f"{source}: {key}={value!r:.40} must be a positive finite number")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    # A head width other than hidden_size / heads (a head-pruned model) is kept explicitly.
    override = None if head_dim * heads == d["hidden_size"] else head_dim
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"], dim=d["hidden_size"], n_layers=d["num_hidden_layers"],
            n_heads=heads, n_kv_heads=d.get("num_key_value_heads") or heads, ffn_dim=d["intermediate_size"],
            max_seq_len=_or(d.get("max_position_embeddings"), 2048), rope_theta=float(_or(d.get("rope_theta"), 10000.0)),
            norm_eps=float(_or(d.get("rms_norm_eps"), 1e-6)), tie_embeddings=bool(d.get("tie_word_embeddings", model_type in GEMMA)),
            head_dim_override=override, family=model_type, **switches,  # a missing tie_word_embeddings is the
            # family's default in transformers (True for Gemma: save_pretrained drops it then)
        )
    except EdgesmithError as e:
        raise EdgesmithError(f"{source}: {e}") from None


def window_switches(d: dict, model_type: str, source: str) -> dict:
    """`sliding_window` and `sliding_layers` from a HF config: Mistral's window is on every layer; Qwen's only with
    use_sliding_window, on the layers `layer_types` names (or those from max_window_layers on, as older configs say)."""
    window = d.get("sliding_window")
    every_layer = model_type in ("mistral", "phi3")
    if window is None or model_type == "llama" or (model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window")):
        return {}
    if type(window) is not int or window <= 0:
        raise EdgesmithError(f"{source}: sliding_window={window!r:.40} must be a positive integer or null")
    n = d.get("num_hidden_layers")
    types = d.get("layer_types")
    if types is None and model_type in GEMMA:  # older configs: every 2nd layer (Gemma-2) or 6th (Gemma-3) is full
        pattern = 2 if model_type == "gemma2" else d.get("sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n if type(n) is int else 0)]
    if types is None and not every_layer:
        first = d.get("max_window_layers") or 0
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n if type(n) is int else 0)]
    if types is None:
        return {"sliding_window": window}
    if not isinstance(types, list) or len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise EdgesmithError(f"{source}: layer_types={types!r:.60} must list 'sliding_attention' or 'full_attention' "
                             "for each of num_hidden_layers")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if not layers:
        return {}
    return {"sliding_window": window, "sliding_layers": None if len(layers) == n else layers}


def gemma_switches(d: dict, family: str) -> dict:
    """Gemma-2/3's switches from their config (models/llama.py ModelConfig)."""
    if family not in GEMMA:
        return {}
    switches = {"hidden_act": "gelu_tanh", "embed_scale": True, "sandwich_norms": True,
                "query_pre_attn_scalar": d.get("query_pre_attn_scalar"), "attn_softcap": d.get("attn_logit_softcapping"),
                "final_softcap": d.get("final_logit_softcapping")}
    if family == "gemma3":
        switches["rope_local_theta"] = _or(d.get("rope_local_base_freq"), 10000.0)
    return switches


def _or(value, default):
    """`value`, or `default` where the field is missing or null (transformers reads null as its default too)."""
    return default if value is None else value


def hf_name(name: str) -> str:
    """Our state-dict key -> the HF LlamaForCausalLM key."""
    return name if name.startswith("lm_head.") else f"model.{name}"


# ----------------------------------------------------------------------------- writing


def lineage_path(target: str | Path, holder: str | Path) -> str:
    """`target` as a lineage entry of the directory `holder`: a POSIX path relative to `holder`, so a run
    copied or moved as a whole keeps its lineage inside it (never an absolute path of the machine it ran on)."""
    return Path(os.path.relpath(Path(target).resolve(), Path(holder).resolve())).as_posix()


def resolve_lineage(holder: str | Path, entry: str) -> Path:
    """The directory a lineage entry of `holder` names (relative to `holder`; older absolute entries as they are)."""
    p = Path(entry)
    return p if p.is_absolute() else (Path(holder) / p).resolve()


def child_lineage(parent: Checkpoint | None, step: dict) -> dict:
    """Lineage of a checkpoint made from `parent` (None: made from scratch) by one more step."""
    passes = list(parent.meta["lineage"]["passes"]) if parent else []
    return {"parent": str(parent.path) if parent else None, "passes": passes + [step]}


def save_checkpoint(model: Transformer, tokenizer: Tokenizer, out: str | Path, lineage: dict,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint directory atomically; returns its path.

    A quantized model (models/quant.py modules) stores `<hf name>.qweight` (int8) and `<hf name>.scales`
    (float16) and its scheme in edgesmith.json "quantization"; `extra_files` (name -> text, e.g. a
    compression report) are written inside the same atomic directory.
    """
    out = Path(out)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise EdgesmithError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}")
    tmp = temp_dir_for(out)
    try:
        state = model.state_dict()
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # HF stores a tied head once, as the embedding (a quantized
            # tied head, models.quant.TiedQuantizedHead, has no tensors of its own)
        tensors = fuse_hf({hf_name(k): v.detach().contiguous().cpu() for k, v in state.items()}, model.config)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        dtype = model.embed_tokens.weight.dtype
        (tmp / "config.json").write_text(json.dumps(to_hf_config(model.config, tokenizer, dtype), indent=2) + "\n")
        tokenizer.save(tmp)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "num_params": model.num_params() + quantized_numel(model),
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size},
            "files": {WEIGHTS: {"sha256": sha256_file(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size}},
            "quantization": quantization_meta(model),
            **({"lowrank": lowrank_meta(model)} if lowrank_meta(model) else {}),
            "lineage": {**lineage, "parent": lineage_path(lineage["parent"], out)} if lineage.get("parent") else lineage,
            "versions": versions(),
        }
        (tmp / "edgesmith.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    meta: dict = field(default_factory=dict)
    model: Transformer | None = None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file fails with one line naming it. The header is
    checked against the file's size first (models.headers), so no count in it can ask for more than the file holds."""
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgesmithError(f"{path}: truncated or corrupt safetensors file ({str(e).strip()})") from None


def load_state_dict_(model: Transformer, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy HF-named tensors into the model, naming any missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    tensors = split_hf(tensors, model.config, source)  # Phi-3's qkv_proj / gate_up_proj (models/layout.py)
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # some writers store it anyway
    by_hf = {hf_name(k): k for k in expected}
    for name in tensors:
        if name not in by_hf and not name.endswith("rotary_emb.inv_freq"):
            raise EdgesmithError(f"{source}: unexpected tensor {name!r}")
    state = {}
    for name, ours in by_hf.items():
        if name not in tensors:
            raise EdgesmithError(f"{source}: missing tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != tuple(expected[ours].shape):
            raise EdgesmithError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(expected[ours].shape)}")
        state[ours] = t
    model.load_state_dict(state, strict=False, assign=False)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, with_model: bool = True) -> Checkpoint:
    """Read a checkpoint directory, verify it, and build the model (unless `with_model=False`)."""
    path = Path(path)
    if not path.is_dir():
        raise EdgesmithError(f"{path}: not a checkpoint directory (no such directory)")
    meta = read_json(confined(path, "edgesmith.json", what="file"))
    if meta.get("format") != FORMAT:
        raise EdgesmithError(f"{path / 'edgesmith.json'}: not an edgesmith checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EdgesmithError(f"{path / 'edgesmith.json'}: format_version={meta.get('format_version')!r} is not "
                             f"supported; allowed: {FORMAT_VERSION}")
    config = from_hf_config(read_json(confined(path, "config.json", what="file")), str(path / "config.json"))
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise EdgesmithError(f"{path / 'tokenizer.json'}: {tokenizer.vocab_size} tokens but config.json "
                             f"vocab_size is {config.vocab_size}")
    ckpt = Checkpoint(path=path, config=config, tokenizer=tokenizer, meta=meta)
    if with_model:
        ckpt.model = build_model(path, config, meta, dtype)
    return ckpt


def build_model(path: Path, config: ModelConfig, meta: dict, dtype: torch.dtype) -> Transformer:
    weights = confined(path, WEIGHTS, what="file")
    files = meta.get("files", {})
    recorded = files.get(WEIGHTS, {}) if isinstance(files, dict) else None
    if not isinstance(recorded, dict):
        raise EdgesmithError(f"{path / 'edgesmith.json'}: files must be a table of file name -> {{sha256, bytes}}")
    size = weights.stat().st_size
    if recorded.get("bytes") is not None and size != recorded["bytes"]:
        raise EdgesmithError(f"{weights}: {size} bytes, edgesmith.json records "
                             f"{recorded['bytes']} (truncated or replaced)")
    if recorded.get("sha256") and sha256_file(weights, limit=size) != recorded["sha256"]:
        raise EdgesmithError(f"{weights}: sha256 does not match edgesmith.json (corrupt or replaced)")
    # the header's names, dtypes and shapes against the model config.json describes, before either is allocated
    compare_tensors(weights, check_safetensors(weights), expected_tensors(config, meta, str(path / "edgesmith.json")))
    tensors = read_safetensors(weights)
    with torch.device("meta"):  # the float Linears a quantized checkpoint replaces are never allocated
        model = Transformer(config)
        # low-rank factors first: they may be quantized
        apply_lowrank_meta_(model, meta.get("lowrank"), str(path / "edgesmith.json"))
        apply_quantization_meta_(model, meta.get("quantization"), str(path / "edgesmith.json"))
    try:
        materialize_(model)
    except (RuntimeError, MemoryError) as e:  # a rope table of max_position_embeddings positions that does not fit
        raise EdgesmithError(f"{path / 'config.json'}: the model it describes cannot be allocated here "
                             f"({str(e).splitlines()[0][:120]})") from None
    load_state_dict_(model, tensors, weights)
    return model.to(dtype).eval()


def materialize_(model: Transformer) -> None:
    """Give a model built on the meta device CPU memory, uninitialised (every persistent tensor is loaded next),
    each shared tensor once (tied heads stay tied); the rope tables, which are computed rather than stored, are
    computed. Building on the meta device first means a 4-bit 336 M checkpoint never allocates, and randomly
    initialises, the 1.3 GB of float Linears its quantized modules replace."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device="cpu")
                    done[id(t)] = torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
                table[key] = done[id(t)]
    for name, table in model.rope_buffers().items():
        setattr(model, name, table)


# ----------------------------------------------------------------------------- the header against the config

_FLOAT_DTYPES = {"F32", "F16", "BF16"}


def expected_tensors(config: ModelConfig, meta: dict, source: str) -> dict[str, tuple[torch.dtype, tuple]]:
    """HF name -> (dtype, shape) of every tensor the checkpoint must hold, from a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(config)
        apply_lowrank_meta_(model, meta.get("lowrank"), source)
        apply_quantization_meta_(model, meta.get("quantization"), source)
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: (v.dtype, tuple(v.shape)) for k, v in fuse_hf({hf_name(k): v for k, v in state.items()}, config).items()}


_TORCH = {torch.int8: "I8", torch.float16: "F16"}


def compare_tensors(path: Path, found: dict[str, tuple[str, tuple]], expected: dict[str, tuple]) -> None:
    for name in found:
        if name not in expected and not name.endswith("rotary_emb.inv_freq") and name != "lm_head.weight":
            raise EdgesmithError(f"{path}: unexpected tensor {name!r}")
    for name, (dtype, shape) in expected.items():
        if name not in found:
            raise EdgesmithError(f"{path}: missing tensor {name!r}")
        got_dtype, got_shape = found[name]
        if tuple(got_shape) != shape:
            raise EdgesmithError(f"{path}: tensor {name!r} has shape {tuple(got_shape)}, expected {shape}")
        want = _TORCH.get(dtype) if dtype in (torch.int8,) or name.endswith(".scales") else None
        if want is not None and got_dtype != want:
            raise EdgesmithError(f"{path}: tensor {name!r} is {got_dtype}, expected {want}")
        if want is None and got_dtype not in _FLOAT_DTYPES:
            raise EdgesmithError(f"{path}: tensor {name!r} is {got_dtype}, expected a float type (F32, F16, BF16)")
