"""Quality attribution of a compressed model against its unquantized reference.

- `compare`: on validation tokens, perplexity of both models and the statistics llama.cpp's
  `llama-perplexity --kl-divergence` prints: KL(reference || model) of the next-token distributions per
  token (mean, median, 99th percentile), how often both pick the same top token ("same top p"), and
  the RMS of Δp, the change in the probability of the token that came next. `compare_sessions` does the
  same through two `runtimes` sessions, so an exported artifact is judged as its own runtime runs it.
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


class KLDStats:
    """Accumulates, window by window, what `llama-perplexity --kl-divergence` reports."""

    def __init__(self):
        self.nll = self.ref_nll = 0.0
        self.kl: list[torch.Tensor] = []
        self.dp: list[torch.Tensor] = []
        self.agree = self.count = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor, ref_logits: torch.Tensor | None = None) -> None:
        """`logits`, `ref_logits`: (N, V) next-token logits; `y`: (N,) the tokens that came next."""
        logp = F.log_softmax(logits.float(), dim=-1)
        self.nll += F.nll_loss(logp, y, reduction="sum").item()
        self.count += y.numel()
        if ref_logits is None:
            return
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
        self.ref_nll += F.nll_loss(ref_logp, y, reduction="sum").item()
        self.kl.append((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0))  # KL(ref || model) per token
        self.dp.append((logp.gather(1, y[:, None]).exp() - ref_logp.gather(1, y[:, None]).exp()).squeeze(1))
        self.agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()

    def result(self) -> dict:
        out = {"tokens": self.count, "perplexity": math.exp(self.nll / self.count)}
        if self.kl:
            kl, dp = torch.cat(self.kl), torch.cat(self.dp)
            out.update(reference_perplexity=math.exp(self.ref_nll / self.count), kl=kl.mean().item(),
                       top1=self.agree / self.count, kld_median=kl.median().item(),
                       kld_p99=torch.quantile(kl, 0.99).item(), kld_max=kl.max().item(),
                       dp_mean=dp.mean().item(), dp_rms=dp.pow(2).mean().sqrt().item())
        return out


@torch.no_grad()
def compare(model: nn.Module, reference: nn.Module | None, tokens: np.ndarray, seq_len: int,
            max_tokens: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity of `model`; with a reference also its perplexity and the KLD statistics (`kl` is the mean KLD,
    `top1` the same-top-token rate)."""
    data = _windows(tokens, seq_len, max_tokens)
    stats = KLDStats()
    for i in range(0, data.shape[0], batch_size):
        batch = data[i:i + batch_size]
        x, y = batch[:, :-1], batch[:, 1:].flatten()
        stats.add(model(x).flatten(0, 1), y, reference(x).flatten(0, 1) if reference is not None else None)
    return stats.result()


def compare_sessions(session, reference, tokens: np.ndarray, seq_len: int, max_tokens: int | None = None,
                     progress: bool = False) -> dict:
    """`compare` through two runtime sessions (`runtimes.Session`): each window prefilled from an empty cache in
    both, the logits each runtime produces compared."""
    data = _windows(tokens, seq_len, max_tokens)
    rows = range(data.shape[0])
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc=f"KLD ({session.backend} vs {reference.backend})", unit="window", leave=False)
    stats = KLDStats()
    for w in rows:
        ids = data[w].tolist()
        logits = torch.from_numpy(np.asarray(session.prefill(ids[:-1])))
        ref_logits = torch.from_numpy(np.asarray(reference.prefill(ids[:-1])))
        stats.add(logits, data[w, 1:], ref_logits)
    session.reset()
    reference.reset()
    return stats.result()


def format_kld(q: dict) -> str:
    """The statistics as llama-perplexity prints them (so the figures read side by side with its own)."""
    lines = [f"Mean PPL(Q)    : {q['perplexity']:.4f}", f"Mean PPL(base) : {q['reference_perplexity']:.4f}",
             f"Mean KLD:   {q['kl']:.6f}", f"Median KLD: {q['kld_median']:.6f}", f"99.0% KLD:  {q['kld_p99']:.6f}",
             f"Maximum KLD: {q['kld_max']:.6f}", f"Same top p: {100 * q['top1']:.3f} %",
             f"Mean    Δp: {100 * q['dp_mean']:.3f} %", f"RMS Δp    : {100 * q['dp_rms']:.3f} %"]
    return "\n".join(lines)


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
