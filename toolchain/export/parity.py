"""Parity of an exported artifact against the torch reference of the same checkpoint.

The artifact runs in its real runtime (a backend with `prefill(ids) -> (T, V)`,
`decode(id) -> (V,)`, `reset()`); the reference is the checkpoint's torch model in fp32 (the
fake-quant model when the checkpoint is quantized), run as a full causal forward that touches no
cache. Three figures:

- max |logit diff| over every position the runtime produced (a prefill of `positions` tokens,
  then one-token decodes), with the reference's largest |logit| beside it for scale;
- argmax agreement over those positions;
- greedy tokens matched: the reference and the runtime each decode `greedy_steps` tokens from the
  same prompt; the count of leading tokens that agree.

Thresholds are per precision (THRESHOLDS): float formats must match every greedy token. This
module does not export anything or write manifests.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from models.errors import EdgesmithError
from models.llama import Transformer
from models.tokenizer import Tokenizer

# Python source, like the default corpus; any text works, this one only fixes the ids.
PARITY_TEXT = (
    "def moving_average(values, window):\n"
    "    \"\"\"Return the mean of each run of `window` values.\"\"\"\n"
    "    total = sum(values[:window])\n"
    "    out = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n"
    "    return out\n"
)


@dataclass(frozen=True)
class Threshold:
    max_rel_diff: float  # max |logit diff| / max |reference logit|
    min_argmax_agreement: float
    greedy_exact: bool  # every greedy token must match


# fp32: runtimes only reorder fp32 sums (measured 3-5e-7 relative in llama.cpp and ONNX Runtime on
# the test model). fp16: weights and activations rounded to 11 significant bits through every layer
# (measured 3e-4 relative). Quantized artifacts are compared with the
# fake-quant model, so what remains is the runtime's activation rounding (8-bit dynamic activations
# in ExecuTorch's 8da schemes, Q8_K activations in llama.cpp).
THRESHOLDS = {
    "fp32": Threshold(max_rel_diff=1e-4, min_argmax_agreement=1.0, greedy_exact=True),
    "fp16": Threshold(max_rel_diff=1e-2, min_argmax_agreement=0.98, greedy_exact=True),
    "int8": Threshold(max_rel_diff=5e-2, min_argmax_agreement=0.95, greedy_exact=False),
    "int4": Threshold(max_rel_diff=1e-1, min_argmax_agreement=0.90, greedy_exact=False),
}


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the reference on `n` threads, then restore: the parity workload is a few tiny
    forwards, where OpenMP spin-waiting on a busy machine costs 10x more than it gains."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parity_ids(tokenizer: Tokenizer, positions: int) -> list[int]:
    """`<|bos|>` then the parity text's tokens, repeated to `positions` ids."""
    text_ids = tokenizer.encode(PARITY_TEXT)
    ids = [tokenizer.bos_id]
    while len(ids) < positions:
        ids.extend(text_ids)
    return ids[:positions]


@torch.no_grad()
def reference_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids], dtype=torch.long))[0].float().numpy()


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(reference_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


def runtime_greedy(backend, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from the runtime and the logits it produced at every position `(P+steps-1, V)`."""
    backend.reset()
    rows = [backend.prefill(prompt)]
    out = []
    for i in range(steps):
        token = int(rows[-1][-1].argmax())
        out.append(token)
        if i + 1 < steps:
            rows.append(backend.decode(token)[None, :])
    return out, np.concatenate(rows, axis=0)


def check_parity(model: Transformer, backend, tokenizer: Tokenizer | None, kind: str, positions: int = 32,
                 greedy_steps: int = 32, prompt: list[int] | None = None) -> dict:
    """Compare `backend` with `model` (anything with `config.vocab_size` whose call maps ids `(1, T)`
    to logits `(1, T, V)`); returns the figures, the threshold and `passed`. The prompt is the
    parity text through `tokenizer`, unless given."""
    if kind not in THRESHOLDS:
        raise EdgesmithError(f"parity kind {kind!r}; allowed: {', '.join(THRESHOLDS)}")
    model = model.float().eval()
    prompt = prompt if prompt is not None else parity_ids(tokenizer, positions)
    t0 = time.perf_counter()
    tokens, got = runtime_greedy(backend, prompt, greedy_steps)
    runtime_s = time.perf_counter() - t0
    with torch_threads(1):
        ref = reference_logits(model, prompt + tokens[:-1])  # the reference on exactly the runtime's inputs
        expected = reference_greedy(model, prompt, greedy_steps)
    vocab = model.config.vocab_size
    got = got[:, :vocab]
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max())
    agreement = float((got.argmax(-1) == ref.argmax(-1)).mean())
    matched = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), greedy_steps)
    th = THRESHOLDS[kind]
    failures = []
    if diff > th.max_rel_diff * scale:
        failures.append(f"max |logit diff| {diff:.3g} > {th.max_rel_diff:g} x max |logit| {scale:.3g}")
    if agreement < th.min_argmax_agreement:
        failures.append(f"argmax agreement {agreement:.3f} < {th.min_argmax_agreement}")
    if th.greedy_exact and matched < greedy_steps:
        failures.append(f"greedy tokens matched {matched}/{greedy_steps} (float formats must match all)")
    return {
        "reference": "torch fp32 (full causal forward)",
        "kind": kind,
        "positions": int(got.shape[0]),
        "max_abs_logit_diff": diff,
        "max_abs_reference_logit": scale,
        "argmax_agreement": agreement,
        "greedy_steps": greedy_steps,
        "greedy_matched": matched,
        "runtime_s": round(runtime_s, 4),
        "threshold": {"max_rel_diff": th.max_rel_diff, "min_argmax_agreement": th.min_argmax_agreement,
                      "greedy_exact": th.greedy_exact},
        "passed": not failures,
        "failures": failures,
    }
