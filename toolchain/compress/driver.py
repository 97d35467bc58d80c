"""Checkpoint in, compressed checkpoint out: the library behind `edgesmith compress` and
`edgesmith eval --reference`.

Loads the checkpoint, draws calibration sequences from the corpus's TRAIN split, runs the passes in
order (each with the unquantized model as reference), measures quality on the VALIDATION split and
per-layer SQNR on the calibration sequences, and writes a checkpoint with `compress_report.json`
inside it, atomically. It does not export or benchmark.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from toolchain.compress import Context, apply, calibration_tokens, config_to_dict
from toolchain.compress.quality import compare, layer_sqnr

REPORT = "compress_report.json"


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no inf: an exact layer (SQNR = inf) is written as null
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _tokens(data: str, tokenizer):
    from toolchain.data import load_corpus, tokenize_corpus
    return tokenize_corpus(load_corpus(data), tokenizer)


def compress_checkpoint(src: str | Path, out: str | Path, passes: list, data: str = "stdlib",
                        calib_seq_len: int = 128, eval_seq_len: int = 128, eval_tokens: int = 32 * 1024,
                        seed: int = 0, force: bool = False) -> dict:
    """Run `passes` (configs) on checkpoint `src`; write `out`; return the report."""
    out = Path(out)
    if not passes:
        raise EdgesmithError("--pass: give at least one pass, e.g. quantize:method=rtn,bits=4")
    if out.exists() and any(out.iterdir()) and not force:
        raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
    t0 = time.perf_counter()
    parent = load_checkpoint(src)
    model, tok = parent.model, parent.tokenizer
    reference = copy.deepcopy(model)
    tokens = _tokens(data, tok)
    seq_len = min(calib_seq_len, parent.config.max_seq_len)
    n_calib = max(getattr(cfg, "n_calib", 1) for cfg in passes)
    calib = calibration_tokens(tokens.train, n_calib, seq_len, seed)
    steps, lineage = [], None
    for cfg in passes:
        ctx = Context(tokenizer=tok, calibration=calib, reference=reference, report={})
        t = time.perf_counter()
        model = apply(model, cfg, ctx)
        step = {"kind": "quantize", "config": config_to_dict(cfg)}
        steps.append({**step, "seconds": round(time.perf_counter() - t, 2), "report": ctx.report})
        lineage = child_lineage(parent, step) if lineage is None else {
            "parent": lineage["parent"], "passes": lineage["passes"] + [step]}
    quality = compare(model, reference, tokens.val, min(eval_seq_len, parent.config.max_seq_len), eval_tokens)
    report = {
        "source": str(src), "data": data,
        "calibration": {"split": "train", "sequences": n_calib, "seq_len": seq_len, "seed": seed},
        "passes": steps,
        "quality": {"split": "validation", **quality},
        "layer_sqnr_db": layer_sqnr(model, reference, calib),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    report = _finite(report)
    save_checkpoint(model, tok, out, lineage, extra_files={REPORT: json.dumps(report, indent=2) + "\n"})
    return report


def evaluate(checkpoint: str | Path, reference: str | Path | None = None, data: str = "stdlib",
             seq_len: int = 256, max_tokens: int = 64 * 1024, n_calib: int = 8, seed: int = 0) -> dict:
    """Validation perplexity; with a reference also KL, top-1 agreement and per-layer SQNR."""
    ckpt = load_checkpoint(checkpoint)
    ref = load_checkpoint(reference) if reference is not None else None
    if ref is not None and ref.config != ckpt.config:
        raise EdgesmithError(f"--reference {reference}: model config differs from {checkpoint}")
    if ref is not None and ref.tokenizer.fingerprint != ckpt.tokenizer.fingerprint:
        raise EdgesmithError(f"--reference {reference}: tokenizer differs from {checkpoint}")
    tokens = _tokens(data, ckpt.tokenizer)
    seq_len = min(seq_len, ckpt.config.max_seq_len)
    result = compare(ckpt.model, ref.model if ref else None, tokens.val, seq_len, max_tokens)
    result["seq_len"] = seq_len
    if ref is not None:
        calib = calibration_tokens(tokens.train, n_calib, seq_len, seed)
        result["layer_sqnr_db"] = layer_sqnr(ckpt.model, ref.model, calib)
    return result
