"""Quality attribution of a compressed model against its unquantized reference.

- `compare`: on validation tokens, perplexity of both models, mean KL(reference || model) of the
  next-token distributions, and top-1 agreement (same argmax).
- `layer_sqnr`: per layer, SQNR in dB of that layer's output in the compressed model against the same
  layer's output in the reference, both run on the same calibration tokens. Layers are the token
  embedding (`embed_tokens`), every attention block (`layers.N.self_attn`, output of o_proj), every
  MLP (`layers.N.mlp`) and `lm_head`:
  outputs whose meaning no method changes (AWQ/SmoothQuant fold scales *inside* them), so a user sees
  where quality was lost and how the loss compounds through depth.
This module does not quantize anything and does not load files.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import EdgesmithError
from models.llama import MLP, Attention
from models.quant import QuantizedEmbedding


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) in dB; inf when identical."""
    noise = (ref.float() - out.float()).pow(2).sum().item()
    signal = ref.float().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def _windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    n_windows = n // seq_len
    if n_windows == 0:
        raise EdgesmithError(f"evaluation needs more than {seq_len} tokens, got {len(tokens)}")
    rows = [np.asarray(tokens[w * seq_len: w * seq_len + seq_len + 1], dtype=np.int64) for w in range(n_windows)]
    return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def compare(model: nn.Module, reference: nn.Module | None, tokens: np.ndarray, seq_len: int,
            max_tokens: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity of `model`; with a reference also its perplexity, mean KL and top-1 agreement."""
    data = _windows(tokens, seq_len, max_tokens)
    nll = ref_nll = kl = agree = 0.0
    count = 0
    for i in range(0, data.shape[0], batch_size):
        batch = data[i:i + batch_size]
        x, y = batch[:, :-1], batch[:, 1:].flatten()
        logp = F.log_softmax(model(x).flatten(0, 1).float(), dim=-1)
        nll += F.nll_loss(logp, y, reduction="sum").item()
        if reference is not None:
            ref_logp = F.log_softmax(reference(x).flatten(0, 1).float(), dim=-1)
            ref_nll += F.nll_loss(ref_logp, y, reduction="sum").item()
            kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()  # KL(ref || model)
            agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        count += y.numel()
    out = {"tokens": count, "perplexity": math.exp(nll / count)}
    if reference is not None:
        out.update(reference_perplexity=math.exp(ref_nll / count), kl=kl / count, top1=agree / count)
    return out


def attribution_layers(model: nn.Module) -> list[str]:
    kinds = (nn.Embedding, QuantizedEmbedding, Attention, MLP)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    return names + (["lm_head"] if hasattr(model, "lm_head") else [])


@torch.no_grad()
def layer_sqnr(model: nn.Module, reference: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Per-layer output SQNR (dB) of `model` against `reference` on the calibration tokens."""
    names = attribution_layers(reference)
    acc = {n: [0.0, 0.0] for n in names}
    outs: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "q": {}}

    def grab(which, name):
        return lambda mod, inp, out: outs[which].__setitem__(name, out.detach().float())

    hooks = [reference.get_submodule(n).register_forward_hook(grab("ref", n)) for n in names]
    hooks += [model.get_submodule(n).register_forward_hook(grab("q", n)) for n in names]
    try:
        for i in range(0, calib.shape[0], batch_size):
            reference(calib[i:i + batch_size])
            model(calib[i:i + batch_size])
            for n in names:
                r, q = outs["ref"][n], outs["q"][n]
                acc[n][0] += r.pow(2).sum().item()
                acc[n][1] += (r - q).pow(2).sum().item()
    finally:
        for h in hooks:
            h.remove()
    return {n: (math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)) for n, (sig, noise) in acc.items()}


def format_table(sqnr_db: dict[str, float]) -> str:
    lines = [f"{'layer':<28} {'SQNR dB':>8}"]
    lines += [f"{n:<28} {v:>8.1f}" for n, v in sqnr_db.items()]
    return "\n".join(lines)
