"""The one model: a Llama-compatible decoder with a static KV cache.

RMSNorm, rotary embeddings (Hugging Face's rotate-half convention, so HF Llama weights load with
no permutation), grouped-query attention, SwiGLU MLP, optional tied embeddings; the families' switches
(ModelConfig: Qwen's biases and q/k norms, sliding windows, Gemma's GELU-tanh, four norms, soft-caps and local
RoPE base) change a step, never add a second model. Module names mirror
`transformers.LlamaForCausalLM` (`layers.0.self_attn.q_proj`, ...) so a checkpoint key is ours with
`model.` in front. Training, compression, export and the torch runtime all use this definition;
backend variants are module swaps applied by a pass. The layers name the steps a variant replaces
(`Attention.project / rotate / read_kv / attend`, `MLP.gate_up / act`, `Block.add_norm`), so a swap
overrides one method, never a copy of forward: kernels/modules.py's fused subclasses call custom ops
there. In eager mode a cached forward reads only the live part of the static cache; traced graphs
(torch.compile, torch.export) keep static shapes and read all of it through the mask. This module
knows nothing about tokenizers, files, devices or kernels (it imports nothing of ours but models/).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import EdgesmithError
from models.kv_cache import KVCache, traced
from models.rope import (ROPE_SCALINGS, apply_rope, check_rope_scaling,  # noqa: F401 (re-exported)
                         rope_frequencies, rope_tables)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Width of one attention head when it is not dim // n_heads (HF Llama's `head_dim`): structured
    # head pruning removes heads but keeps their width. None: dim // n_heads.
    head_dim_override: int | None = None
    # Model families (DESIGN.md): the same module with a switch where a family differs. `family` names the
    # architecture a checkpoint's config.json keeps (transformers loads it as that family); Qwen2 adds a bias
    # to the q/k/v projections, Qwen3 an RMSNorm over each query and key head before the rotation.
    family: str = "llama"
    attention_bias: bool = False
    qk_norm: bool = False
    # RoPE frequency scaling as transformers' config writes it, held as sorted (key, value) pairs (a frozen
    # config): rope_type "linear" (factor) or "llama3" (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings: Llama-3.1 / 3.2). None: plain RoPE.
    rope_scaling: tuple | None = None
    # Sliding-window attention (Mistral, Phi-3, Qwen2's upper layers): a layer in `sliding_layers` (None: every
    # layer) attends to the last `sliding_window` positions, itself included, as transformers masks it. With a
    # static cache this is a mask (a cache no longer than the window needs none). None: full attention.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None
    # Gemma-2 / Gemma-3: GELU-tanh gated MLP ("gelu_tanh"; else "silu"), the embedding scaled by sqrt(dim), a norm
    # after attention and after the MLP too ("sandwich"), queries scaled by query_pre_attn_scalar ** -0.5 (None:
    # head_dim ** -0.5), tanh soft-capping of attention scores and of the final logits (None: off), and (Gemma-3)
    # another RoPE base for the sliding layers. Gemma's norms compute x * (1 + w): a checkpoint holds w, our
    # RMSNorm holds 1 + w (models/layout.py), so every runtime's norm is Llama's.
    hidden_act: str = "silu"
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    rope_local_theta: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise EdgesmithError(f"ModelConfig.family: {self.family!r}; allowed: {', '.join(FAMILIES)}")
        for name in ("attention_bias", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise EdgesmithError(f"ModelConfig.{name}: {getattr(self, name)!r} must be true or false")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EdgesmithError(f"ModelConfig.{name}: {value!r} must be a positive integer")
        for name in ("dim", "ffn_dim"):
            if getattr(self, name) % 32:
                raise EdgesmithError(
                    f"ModelConfig.{name}: {getattr(self, name)} is not a multiple of 32 "
                    "(quantization blocks are 32 wide)")
        if self.head_dim_override is not None:
            hd = self.head_dim_override
            if isinstance(hd, bool) or not isinstance(hd, int) or hd <= 0:
                raise EdgesmithError(f"ModelConfig.head_dim_override: {hd!r} must be a positive integer or None")
            if (self.n_heads * hd) % 32:
                raise EdgesmithError(f"ModelConfig.head_dim_override: n_heads x head_dim = {self.n_heads * hd} is "
                                     "not a multiple of 32 (quantization blocks are 32 wide)")
        elif self.dim % self.n_heads:
            raise EdgesmithError(f"ModelConfig.n_heads: {self.n_heads} does not divide dim {self.dim}; "
                                 f"allowed: {_divisors(self.dim)}")
        if self.n_heads % self.n_kv_heads:
            raise EdgesmithError(f"ModelConfig.n_kv_heads: {self.n_kv_heads} does not divide n_heads "
                                 f"{self.n_heads}; allowed: {_divisors(self.n_heads)}")
        if self.head_dim % 2:
            raise EdgesmithError(f"ModelConfig.n_heads: head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.rope_theta > 0:
            raise EdgesmithError(f"ModelConfig.rope_theta: {self.rope_theta!r} must be positive")
        if not 0 < self.norm_eps < 1:
            raise EdgesmithError(f"ModelConfig.norm_eps: {self.norm_eps!r} must be in (0, 1)")
        if self.rope_scaling is not None:
            check_rope_scaling(dict(self.rope_scaling))
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise EdgesmithError(f"ModelConfig.sliding_window: {w!r} must be a positive integer or None")
        if w is not None and self.family not in WINDOWED:
            raise EdgesmithError(f"ModelConfig.sliding_window: the {self.family} family has none; allowed for: "
                                 f"{', '.join(WINDOWED)}")
        if self.sliding_layers is not None:
            layers = self.sliding_layers
            if self.family in ("mistral", "phi3"):
                raise EdgesmithError(f"ModelConfig.sliding_layers: the {self.family} family's window is on every "
                                     "layer (None)")
            if w is None:
                raise EdgesmithError("ModelConfig.sliding_layers: set without a sliding_window")
            if (not isinstance(layers, tuple) or any(type(i) is not int or not 0 <= i < self.n_layers for i in layers)
                    or list(layers) != sorted(set(layers))):
                raise EdgesmithError(f"ModelConfig.sliding_layers: {layers!r:.60} must be increasing layer indices "
                                     f"in 0..{self.n_layers - 1}")

        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise EdgesmithError(f"ModelConfig.hidden_act: {self.hidden_act!r}; allowed: silu, gelu_tanh")
        for name in ("embed_scale", "sandwich_norms"):
            if not isinstance(getattr(self, name), bool):
                raise EdgesmithError(f"ModelConfig.{name}: {getattr(self, name)!r} must be true or false")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "rope_local_theta"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise EdgesmithError(f"ModelConfig.{name}: {v!r} must be a positive number or None")

    @property
    def attn_scale(self) -> float:
        """What each query-key product is multiplied by."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to the whole context."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("head_dim_override", "family", "attention_bias", "qk_norm", "rope_scaling", "sliding_window",
                     "sliding_layers", *GEMMA_FIELDS):  # defaults: as before
            if d[name] == FIELD_DEFAULTS[name]:
                del d[name]
        if "rope_scaling" in d:
            d["rope_scaling"] = dict(self.rope_scaling)
        if "sliding_layers" in d:
            d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise EdgesmithError(f"{source}: unknown ModelConfig field {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
        if isinstance(d.get("rope_scaling"), dict):
            d = {**d, "rope_scaling": tuple(sorted(d["rope_scaling"].items()))}
        if isinstance(d.get("sliding_layers"), list):
            d = {**d, "sliding_layers": tuple(d["sliding_layers"])}
        return cls(**d)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
WINDOWED = ("mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
GEMMA_FIELDS = ("hidden_act", "embed_scale", "sandwich_norms", "query_pre_attn_scalar", "attn_softcap", "final_softcap",
                "rope_local_theta")  # families whose config.json holds a sliding window
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def _divisors(n: int) -> str:
    return ", ".join(str(i) for i in range(1, n + 1) if n % i == 0)


SIZES: dict[str, ModelConfig] = {
    "nano": ModelConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "micro": ModelConfig(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=768),
    "small": ModelConfig(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536),
}


def config_for(size: str) -> ModelConfig:
    if size not in SIZES:
        raise EdgesmithError(f"unknown model size {size!r}; allowed: {', '.join(SIZES)}")
    return SIZES[size]


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF LlamaRMSNorm does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def softcapped_attention(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Grouped-query attention with the scores soft-capped, `cap * tanh(s / cap)` before the mask (transformers'
    Gemma-2). mask: bool `(..., T, >= S)` or None (causal, the last T of S positions)."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    T, S = q.shape[2], k.shape[2]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T) if mask is None else mask[..., :S]
    bias = torch.where(mask, 0.0, float("-inf"))  # additive, from the mask alone: the exporters' graphs keep the
    # score ops in one piece (a masked_fill between them splits an XNNPACK partition around it)
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / cap) * cap + bias  # (B, nh, T, S)
    return scores.float().softmax(-1).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window_of(layer)  # sliding window (None: the whole context); the mask comes with it
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.kv_cache: KVCache | None = None

    def project(self, x):
        """q `(B, nh, T, hd)`, k and v `(B, nkv, T, hd)` projected from x `(B, T, C)` (a variant may run the
        three projections as one matmul)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def norm_qk(self, q, k):
        """Qwen3's RMSNorm over each query and key head (the last dim), before the rotation; else q, k as they are."""
        if not hasattr(self, "q_norm"):
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def rotate(self, q, k, cos, sin):
        """q `(B, nh, T, hd)` and k `(B, nkv, T, hd)` rotated by the rows cos/sin `(T, hd)`."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def read_kv(self, input_pos, k, v):
        """The keys and values attention reads: these ones (no cache) or the static cache after writing
        these at `input_pos`: its live prefix `(B, nkv, max(input_pos) + 1, hd)` in eager mode, the whole
        `(B, nkv, S, hd)` when traced (models/kv_cache.py). Variants (an int8 cache) override this."""
        if input_pos is None:
            return k, v
        return self.kv_cache.update(input_pos, k, v)

    def attend(self, q, k, v, input_pos, mask):
        """Causal grouped-query attention of q `(B, nh, T, hd)` over k/v as read_kv returns them -> `(B, nh, T, hd)`."""
        n_rep = self.n_heads // self.n_kv_heads
        if self.softcap is not None:  # Gemma-2: SDPA has no soft-capping
            return softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        if input_pos is not None and not traced():
            # Eager, cached: k/v are the live prefix. SDPA reads each KV head once for its query group
            # (enable_gqa: the same kernel and sums as over repeated K/V); one query at the last live
            # position sees every key, so it needs no mask.
            # A sliding layer's one query sees the window's last keys: a slice of the live prefix, no mask either.
            last = q.shape[2] == 1 and k.shape[2] == int(input_pos[-1]) + 1
            if last and self.window is not None:
                k, v = k[:, :, -self.window:], v[:, :, -self.window:]
            mask = None if last else mask[..., : k.shape[2]]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_rep > 1, scale=self.scale)
        if n_rep > 1:  # training, evaluation and traced graphs: the plain ops every exporter knows
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        q, k = self.rotate(*self.norm_qk(q, k), cos, sin)
        k, v = self.read_kv(input_pos, k, v)
        y = self.attend(q, k, v, input_pos, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gelu = cfg.hidden_act == "gelu_tanh"

    def gate_up(self, x):
        """The gate and up projections of x (a variant may run them as one matmul)."""
        return self.gate_proj(x), self.up_proj(x)

    def act(self, gate, up):
        """SwiGLU: silu(gate) * up (Gemma: gelu_tanh(gate) * up)."""
        return (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up

    def forward(self, x):
        return self.down_proj(self.act(*self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        if cfg.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention's output instead
            self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def add_norm(self, a, x):
        """(post_attention_layernorm(x + a), x + a): the attention's residual add and the norm after it."""
        x = x + a
        return self.post_attention_layernorm(x), x

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        if hasattr(self, "pre_feedforward_layernorm"):  # Gemma's four norms
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        h, x = self.add_norm(self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask), x)
        return x + self.mlp(h)


# ----------------------------------------------------------------------------- model


def window_mask(S: int, window: int | None, device=None) -> torch.Tensor | None:
    """`(S, S)` bool: key j visible to query i iff i - window < j <= i (transformers' sliding-window mask); None
    where no sliding window or it never binds (window >= S: plain causal)."""
    if window is None or window >= S:
        return None
    return torch.ones(S, S, dtype=torch.bool, device=device).tril().triu(1 - window)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        for name, table in self.rope_buffers().items():
            self.register_buffer(name, table, persistent=False)
        self.causal_mask: torch.Tensor | None = None
        self.window_mask: torch.Tensor | None = None  # (S, S): causal and within the sliding window
        self.apply(self._init_weights)

    def rope_buffers(self) -> dict[str, torch.Tensor]:
        """The rope tables (computed, never stored): rope_cos / rope_sin, and for Gemma-3's sliding layers
        rope_cos_local / rope_sin_local from their own base (no scaling)."""
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        tables = {"rope_cos": cos, "rope_sin": sin}
        if cfg.rope_local_theta is not None:
            tables["rope_cos_local"], tables["rope_sin_local"] = rope_tables(cfg.head_dim, cfg.max_seq_len,
                                                                             cfg.rope_local_theta)
        return tables

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None):
        """Preallocate the KV cache of every layer; `forward(..., input_pos)` then reads and writes it."""
        S = max_seq_len or self.config.max_seq_len
        if S > self.config.max_seq_len:
            raise EdgesmithError(f"max_seq_len {S} exceeds the model's max_seq_len {self.config.max_seq_len}")
        dtype = dtype or self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, attn.n_kv_heads, S, attn.head_dim, dtype).to(device)
        self.causal_mask = torch.tril(torch.ones(S, S, dtype=torch.bool, device=device))
        self.window_mask = window_mask(S, self.config.sliding_window, device)

    def reset_cache(self) -> None:
        for layer in self.layers:
            if layer.self_attn.kv_cache is not None:
                layer.self_attn.kv_cache.reset()

    @property
    def cache_len(self) -> int:
        """Positions the cache holds (0 when no cache is set up)."""
        return 0 if self.causal_mask is None else self.causal_mask.shape[0]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """tokens `(B, T)` -> logits `(B, T, vocab)`.

        `input_pos=None` is a full causal forward that touches no cache (training, evaluation).
        With `input_pos` `(T,)` the call is a prefill of T tokens or a one-token decode: keys and
        values are written into the static cache at those positions and attention reads the cache.
        """
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        if self.config.embed_scale:  # Gemma: sqrt(dim), rounded to the activations' dtype as transformers does
            x = x * torch.tensor(self.config.dim ** 0.5, dtype=x.dtype)
        local = hasattr(self, "rope_cos_local")
        if input_pos is None:
            if T > self.config.max_seq_len:
                raise EdgesmithError(f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
            window = window_mask(T, self.config.sliding_window, tokens.device)  # None: causal over T
            cos_l, sin_l = (self.rope_cos_local[:T], self.rope_sin_local[:T]) if local else (cos, sin)
        else:
            if self.causal_mask is None:
                raise EdgesmithError("forward with input_pos needs a KV cache: call setup_cache() first")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = self.causal_mask[input_pos].view(1, 1, T, -1)  # (1, 1, T, S): key j visible iff j <= pos
            window = mask if self.window_mask is None else self.window_mask[input_pos].view(1, 1, T, -1)
            cos_l, sin_l = (self.rope_cos_local[input_pos], self.rope_sin_local[input_pos]) if local else (cos, sin)
        for layer in self.layers:
            if layer.self_attn.window is None:
                x = layer(x, cos, sin, input_pos, mask)
            else:  # a sliding layer: its window, and Gemma-3's local rope
                x = layer(x, cos_l, sin_l, input_pos, window)
        logits = self.lm_head(self.norm(x))
        if self.config.final_softcap is not None:  # Gemma-2: cap * tanh(logits / cap)
            c = self.config.final_softcap
            logits = torch.tanh(logits / c) * c
        return logits

