"""Structured pruning: remove attention heads (or whole KV groups), MLP channels or whole blocks, and
return a smaller model with a smaller ModelConfig.

Uniform across layers, by decision: ModelConfig, the HF Llama config.json, GGUF's llama architecture
and our ONNX graphs all hold one n_heads, n_kv_heads and ffn_dim for every layer. So every layer
loses the same number of heads or channels, and each layer chooses *which* ones by its own importance.
The result stays a plain Llama config that every exporter and `transformers.LlamaForCausalLM` accept.
A removed head keeps the width of the others: head_dim is then written explicitly (config.json
`head_dim`, ModelConfig.head_dim_override), and n_heads x head_dim must stay a multiple of 32.

Importance, measured on calibration sequences from the train split:
- heads: a head's share of the attention output, sum over tokens of ||y_h W_o[:, h]^T||^2 with y_h
  the head's output (its slice of o_proj's input). A KV group's importance is the sum of its query
  heads'. Grouped-query attention stays consistent: removing a KV group removes its query heads, and
  `unit=heads` removes the same number of query heads from every group.
- channels: sum over tokens of a_j^2 ||W_down[:, j]||^2, a = silu(gate) * up (down_proj's input).
- layers: block influence, the mean over tokens of 1 - cos(block input, block output) (ShortGPT,
  Men et al. 2024, arXiv:2403.03853): the blocks that change the residual stream least go first.

Counts and tolerance: `unit=groups` removes round(ratio x n_kv_heads) groups, `unit=heads`
round(ratio x n_heads / n_kv_heads) heads per group, `channels` keeps ffn_dim x (1 - ratio) rounded
to a multiple of 32, `layers` removes round(ratio x n_layers) blocks. The realized share is within half
a unit of the request (1/(2 n_kv_heads), n_kv_heads/(2 n_heads), 16/ffn_dim, 1/(2 n_layers)) and is
reported; a ratio that removes nothing or everything is an error. This module does not fine-tune:
chain a `distill` pass to recover quality.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from models.errors import EdgesmithError
from models.llama import Transformer
from toolchain.compress.common import capture_inputs, require_calibration


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up: round(0.5) would be 0


# ----------------------------------------------------------------------------- importance


@torch.no_grad()
def head_importance(model: Transformer, calib: torch.Tensor) -> torch.Tensor:
    """`(n_layers, n_heads)`: each head's summed squared contribution to its attention output."""
    cfg = model.config
    imp = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)

    def add(name: str, x: torch.Tensor) -> None:
        i = int(name.split(".")[1])
        W = model.get_submodule(name).weight.detach().float().view(cfg.dim, cfg.n_heads, cfg.head_dim)
        y = x.view(-1, cfg.n_heads, cfg.head_dim)  # (N, nh, hd)
        imp[i] += torch.einsum("nhd,ohd->nho", y, W).pow(2).sum((0, 2)).double()

    capture_inputs(model, [f"layers.{i}.self_attn.o_proj" for i in range(cfg.n_layers)], calib, add)
    return imp


@torch.no_grad()
def channel_importance(model: Transformer, calib: torch.Tensor) -> torch.Tensor:
    """`(n_layers, ffn_dim)`: each MLP channel's summed squared contribution to the MLP output."""
    cfg = model.config
    imp = torch.zeros(cfg.n_layers, cfg.ffn_dim, dtype=torch.float64)

    def add(name: str, x: torch.Tensor) -> None:
        i = int(name.split(".")[1])
        col_norm = model.get_submodule(name).weight.detach().float().pow(2).sum(0)  # (ffn,)
        imp[i] += (x.pow(2).sum(0) * col_norm).double()

    capture_inputs(model, [f"layers.{i}.mlp.down_proj" for i in range(cfg.n_layers)], calib, add)
    return imp


@torch.no_grad()
def layer_importance(model: Transformer, calib: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """`(n_layers,)`: block influence, mean over tokens of 1 - cos(block input, block output)."""
    acc = torch.zeros(len(model.layers), dtype=torch.float64)
    count = [0]

    def hook(i):
        def fn(mod, inp, out):
            acc[i] += (1 - F.cosine_similarity(inp[0].float(), out.float(), dim=-1)).sum().double()
            if i == 0:
                count[0] += out.shape[0] * out.shape[1]
        return fn

    hooks = [block.register_forward_hook(hook(i)) for i, block in enumerate(model.layers)]
    try:
        for b in range(0, calib.shape[0], batch_size):
            model(calib[b:b + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return acc / max(count[0], 1)


# ----------------------------------------------------------------------------- counts


def _count(ratio: float, units: int, what: str, per: str = "") -> int:
    k = _round(ratio * units)
    if k == 0:
        raise EdgesmithError(f"prune: ratio={ratio} removes no {what} ({units} {what}{per}); "
                             f"allowed: ratio >= {0.5 / units:.4g}")
    if k >= units:
        raise EdgesmithError(f"prune: ratio={ratio} would remove all {units} {what}{per}, leaving none; "
                             f"allowed: ratio < {(units - 0.5) / units:.4g}")
    return k


def _drop_lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices kept (in their original order) after removing the k lowest scores."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[k:].tolist())


def _rows(w: torch.Tensor, units: list[int], width: int) -> torch.Tensor:
    idx = torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])
    return w[idx]


# ----------------------------------------------------------------------------- methods


def plan_heads(model: Transformer, cfg, calib: torch.Tensor):
    """(kept query heads, kept KV heads) per layer, and the per-layer importance."""
    mc = model.config
    n_rep = mc.n_heads // mc.n_kv_heads
    imp = head_importance(model, calib)
    kept_q, kept_kv = [], []
    if cfg.unit == "groups":
        k = _count(cfg.ratio, mc.n_kv_heads, "KV groups", " per layer")
        for i in range(mc.n_layers):
            groups = _drop_lowest(imp[i].view(mc.n_kv_heads, n_rep).sum(1), k)
            kept_kv.append(groups)
            kept_q.append([g * n_rep + j for g in groups for j in range(n_rep)])
    else:
        k = _count(cfg.ratio, n_rep, "query heads", " per KV group")
        for i in range(mc.n_layers):
            heads = []
            for g in range(mc.n_kv_heads):
                heads += [g * n_rep + j for j in _drop_lowest(imp[i, g * n_rep:(g + 1) * n_rep], k)]
            kept_q.append(heads)
            kept_kv.append(list(range(mc.n_kv_heads)))
    n_q = len(kept_q[0])
    if (n_q * mc.head_dim) % 32:
        raise EdgesmithError(f"prune heads: ratio={cfg.ratio} leaves {n_q} heads x head_dim {mc.head_dim} = "
                             f"{n_q * mc.head_dim}, not a multiple of 32 (quantization blocks are 32 wide)")
    return kept_q, kept_kv, imp


def pruned_heads_state(model: Transformer, kept_q, kept_kv) -> tuple[dict, dict]:
    mc, hd = model.config, model.config.head_dim
    state = dict(model.state_dict())
    for i, (q, kv) in enumerate(zip(kept_q, kept_kv)):
        p = f"layers.{i}.self_attn"
        state[f"{p}.q_proj.weight"] = _rows(state[f"{p}.q_proj.weight"], q, hd)
        state[f"{p}.k_proj.weight"] = _rows(state[f"{p}.k_proj.weight"], kv, hd)
        state[f"{p}.v_proj.weight"] = _rows(state[f"{p}.v_proj.weight"], kv, hd)
        state[f"{p}.o_proj.weight"] = _rows(state[f"{p}.o_proj.weight"].T, q, hd).T
        for proj, units in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):  # Qwen2: a bias per output row
            if f"{p}.{proj}.bias" in state:
                state[f"{p}.{proj}.bias"] = _rows(state[f"{p}.{proj}.bias"], units, hd)
    changes = {"n_heads": len(kept_q[0]), "n_kv_heads": len(kept_kv[0]), "head_dim_override": hd}
    if changes["n_heads"] * hd == mc.dim:
        changes["head_dim_override"] = None
    return state, changes


def pruned_channels_state(model: Transformer, cfg, calib: torch.Tensor):
    mc = model.config
    new_ffn = _round(mc.ffn_dim * (1 - cfg.ratio) / 32) * 32
    if new_ffn >= mc.ffn_dim:
        raise EdgesmithError(f"prune: ratio={cfg.ratio} removes no channels: ffn_dim {mc.ffn_dim} x (1 - ratio) rounds "
                             f"to {new_ffn} (multiples of 32); allowed: ratio >= {16 / mc.ffn_dim:.4g}")
    if new_ffn <= 0:
        raise EdgesmithError(f"prune: ratio={cfg.ratio} would remove all {mc.ffn_dim} MLP channels, leaving none; "
                             f"allowed: ratio < {1 - 16 / mc.ffn_dim:.4g}")
    imp = channel_importance(model, calib)
    state = dict(model.state_dict())
    kept = []
    for i in range(mc.n_layers):
        keep = _drop_lowest(imp[i], mc.ffn_dim - new_ffn)
        kept.append(keep)
        p = f"layers.{i}.mlp"
        idx = torch.tensor(keep)
        state[f"{p}.gate_proj.weight"] = state[f"{p}.gate_proj.weight"][idx]
        state[f"{p}.up_proj.weight"] = state[f"{p}.up_proj.weight"][idx]
        state[f"{p}.down_proj.weight"] = state[f"{p}.down_proj.weight"][:, idx]
    return state, {"ffn_dim": new_ffn}, imp, kept


def pruned_layers_state(model: Transformer, cfg, calib: torch.Tensor):
    n = model.config.n_layers
    imp = layer_importance(model, calib)
    if cfg.drop is not None:  # the blocks named
        if max(cfg.drop) >= n or len(cfg.drop) >= n:
            raise EdgesmithError(f"prune: drop={list(cfg.drop)} must name some, not all, of blocks 0..{n - 1}")
        keep = [i for i in range(n) if i not in cfg.drop]
    else:
        keep = _drop_lowest(imp, _count(cfg.ratio, n, "layers"))
    state = {}
    for key, v in model.state_dict().items():
        if not key.startswith("layers."):
            state[key] = v
            continue
        _, i, rest = key.split(".", 2)
        if int(i) in keep:
            state[f"layers.{keep.index(int(i))}.{rest}"] = v
    changes = {"n_layers": len(keep)}
    if model.config.sliding_layers is not None:  # the kept sliding layers under their new indices
        windowed = tuple(keep.index(i) for i in sorted(keep) if i in model.config.sliding_layers)
        changes.update(sliding_layers=windowed or None, sliding_window=model.config.sliding_window if windowed else None)
    return state, changes, imp, keep


def _component_params(model: Transformer, method: str) -> int:
    if method == "heads":
        mods = [b.self_attn for b in model.layers]
    elif method == "channels":
        mods = [b.mlp for b in model.layers]
    else:
        mods = list(model.layers)
    return sum(p.numel() for m in mods for p in m.parameters())


def prune_structured(model: Transformer, cfg, ctx) -> Transformer:
    """Heads, channels or layers: a new, smaller Transformer with the kept weights copied in."""
    calib = require_calibration(ctx, cfg, f"prune {cfg.method}")
    model.eval()
    if cfg.method == "heads":
        kept_q, kept_kv, imp = plan_heads(model, cfg, calib)
        state, changes = pruned_heads_state(model, kept_q, kept_kv)
        kept = {"query_heads": kept_q, "kv_heads": kept_kv}
    elif cfg.method == "channels":
        state, changes, imp, kept = pruned_channels_state(model, cfg, calib)
    else:
        state, changes, imp, kept = pruned_layers_state(model, cfg, calib)
    new_cfg = dataclasses.replace(model.config, **changes)
    new = Transformer(new_cfg).to(model.embed_tokens.weight.dtype)
    new.load_state_dict(state)
    before, after = _component_params(model, cfg.method), _component_params(new, cfg.method)
    ctx.report.update({
        "method": cfg.method, "unit": cfg.unit if cfg.method == "heads" else None,
        "config_changes": {k: [getattr(model.config, k), v] for k, v in changes.items()},
        "requested_ratio": cfg.ratio,
        "component": {"heads": "attention", "channels": "mlp", "layers": "blocks"}[cfg.method],
        "component_params": [before, after], "component_removed_share": round(1 - after / before, 4),
        "params": [model.num_params(), new.num_params()],
        "params_removed_share": round(1 - new.num_params() / model.num_params(), 4),
        "kept": kept,
    })
    if cfg.method != "channels":  # per-head / per-layer scores; per-channel ones would swamp the report
        ctx.report["importance"] = [[round(float(v), 6) for v in row] for row in imp] if imp.dim() > 1 else \
            [round(float(v), 6) for v in imp]
    return new.eval()
