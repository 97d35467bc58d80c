"""Checkpoint in, compressed checkpoint out: the library behind `edgesmith compress` and
`edgesmith eval --reference`.

Loads the checkpoint, draws calibration sequences from the corpus's TRAIN split, runs the passes in
order (each with the unquantized model as reference), measures quality on the VALIDATION split and
per-layer SQNR on the calibration sequences, and writes a checkpoint with `compress_report.json`
inside it, atomically. Every pass's entry records parameters, deployed size and validation perplexity
before and after it. With `nproc > 1` (training passes: distill, qat) the command re-runs itself as
DDP ranks under torchrun; every rank runs every pass (the others are deterministic), rank 0 writes.
It does not export or benchmark.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from models.registry import PASSES
from toolchain.compress import Context, apply, calibration_tokens, config_to_dict, kind_of
from toolchain.compress.quality import compare, layer_sqnr
from toolchain.data import load_corpus, tokenize_corpus
from toolchain.train.launch import shutdown, under_torchrun
from toolchain.train.run import launch

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
    return tokenize_corpus(load_corpus(data), tokenizer)


def deployed_bytes(model) -> int:
    """Weight bytes as deployed: 2 per float parameter (fp16), b/8 per code + 2 per fp16 group scale for
    quantized modules -- GGUF F16 / Q4_0 / Q8_0 sizes; low-rank factors counted as ONNX / ExecuTorch keep
    them. Zeros of unstructured pruning count in full: they are stored."""
    codes = sum(m.qweight.numel() * m.bits // 8 + 2 * m.scales.numel() for m in _quantized(model))
    return 2 * model.num_params() + codes


def _quantized(model) -> list:
    """Modules holding canonical codes (QuantizedLinear, quantized embeddings): `qweight` + `scales` + `bits`."""
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("qweight", "scales", "bits"))]


def model_stats(model, val, seq_len: int, eval_tokens: int) -> dict:
    params = model.num_params() + sum(m.qweight.numel() for m in _quantized(model))
    return {"params": params, "size_mb": round(deployed_bytes(model) / 1e6, 4),
            "perplexity": compare(model, None, val, seq_len, eval_tokens)["perplexity"]}


def training_kinds() -> list[str]:
    """The pass kinds that train (registered with trains=True): the ones --nproc applies to."""
    return [e.name for e in PASSES.entries() if e.meta.get("trains")]


def compress_checkpoint(src: str | Path, out: str | Path, passes: list, data: str = "stdlib",
                        calib_seq_len: int = 128, eval_seq_len: int = 128, eval_tokens: int = 32 * 1024,
                        seed: int = 0, force: bool = False, nproc: int = 1,
                        argv: list[str] | None = None) -> dict | None:
    """Run `passes` (configs) on checkpoint `src`; write `out`; return the report.

    `nproc > 1` re-runs `argv` (the `edgesmith` command line) under torchrun, as `edgesmith train` does:
    rank 0 writes the checkpoint (with its report) and returns the report; the other ranks and the
    launcher return None."""
    out = Path(out)
    if not passes:
        raise EdgesmithError("--pass: give at least one pass, e.g. quantize:method=rtn,bits=4")
    if out.exists() and any(out.iterdir()) and not force:
        raise EdgesmithError(f"{out}: already exists (pass --force to replace it)")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise EdgesmithError(f"--nproc: {nproc!r} must be an integer >= 1")
    if nproc > 1 and not any(kind_of(cfg) in training_kinds() for cfg in passes):
        raise EdgesmithError(f"--nproc {nproc}: no pass trains (only {', '.join(training_kinds())} do); "
                             "leave --nproc out")
    if nproc > 1 and argv is None:
        raise EdgesmithError("--nproc: the ranks re-run the command line; call this from `edgesmith compress`")
    env, prepared = None, None
    if nproc > 1 or under_torchrun():
        env, prepared = launch(nproc, argv, lambda: _prepare(src, data))
        if env is None:  # the launcher: the ranks ran, rank 0 wrote the checkpoint and printed its report
            return None
    job = _Job(str(src), data, calib_seq_len, eval_seq_len, eval_tokens, seed)
    try:
        parent, tokens = prepared or _prepare(src, data)
        return _run(parent, tokens, out, passes, job, env)
    finally:
        if env is not None:
            shutdown(env)


def _prepare(src, data):
    parent = load_checkpoint(src)
    return parent, _tokens(data, parent.tokenizer)


@dataclass(frozen=True)
class _Job:
    src: str
    data: str
    calib_seq_len: int
    eval_seq_len: int
    eval_tokens: int
    seed: int


def _run(parent, tokens, out: Path, passes: list, job: _Job, env) -> dict | None:
    t0 = time.perf_counter()
    main = env is None or env.is_main  # other ranks run the passes (distill, qat train with rank 0) and stop
    model, tok = parent.model, parent.tokenizer
    reference = copy.deepcopy(model)
    seq_len = min(job.calib_seq_len, parent.config.max_seq_len)
    eval_len, eval_tokens = min(job.eval_seq_len, parent.config.max_seq_len), job.eval_tokens
    n_calib = max(getattr(cfg, "n_calib", 1) for cfg in passes)
    calib = calibration_tokens(tokens.train, n_calib, seq_len, job.seed)
    steps, lineage = [], None
    before = model_stats(model, tokens.val, eval_len, eval_tokens) if main else None
    for cfg in passes:
        ctx = Context(tokenizer=tok, calibration=calib, reference=reference, report={},
                      train_tokens=tokens.train, val_tokens=tokens.val, env=env)
        t = time.perf_counter()
        model = apply(model, cfg, ctx)
        seconds = round(time.perf_counter() - t, 2)
        after = model_stats(model, tokens.val, eval_len, eval_tokens) if main else None
        step = {"kind": kind_of(cfg), "config": config_to_dict(cfg)}
        steps.append({**step, "seconds": seconds, "before": before, "after": after, "report": ctx.report})
        before = after
        lineage = child_lineage(parent, step) if lineage is None else {
            "parent": lineage["parent"], "passes": lineage["passes"] + [step]}
    if not main:
        return None
    quality = compare(model, reference, tokens.val, eval_len, eval_tokens)
    # Per-layer SQNR compares layers by name: meaningless once blocks were removed or the width changed.
    same_layers = (model.config.n_layers, model.config.dim) == (reference.config.n_layers, reference.config.dim)
    report = {
        "source": job.src, "data": job.data,
        "calibration": {"split": "train", "sequences": n_calib, "seq_len": seq_len, "seed": job.seed},
        "passes": steps,
        "quality": {"split": "validation", **quality},
        "layer_sqnr_db": layer_sqnr(model, reference, calib) if same_layers else {},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    report = _finite(report)
    save_checkpoint(model, tok, out, lineage, extra_files={REPORT: json.dumps(report, indent=2) + "\n"})
    return report


def evaluate(checkpoint: str | Path, reference: str | Path | None = None, data: str = "stdlib",
             seq_len: int = 256, max_tokens: int = 64 * 1024, n_calib: int = 8, seed: int = 0) -> dict:
    """Validation perplexity; with a reference also the KLD statistics and per-layer SQNR (the latter
    only when both have the same blocks: a pruned model is compared with its parent by its outputs)."""
    ckpt = load_checkpoint(checkpoint)
    ref = load_checkpoint(reference) if reference is not None else None
    if ref is not None and ref.config.vocab_size != ckpt.config.vocab_size:
        raise EdgesmithError(f"--reference {reference}: vocab_size {ref.config.vocab_size} differs from "
                             f"{checkpoint}'s {ckpt.config.vocab_size}")
    if ref is not None and ref.tokenizer.fingerprint != ckpt.tokenizer.fingerprint:
        raise EdgesmithError(f"--reference {reference}: tokenizer differs from {checkpoint}")
    tokens = _tokens(data, ckpt.tokenizer)
    seq_len = min(seq_len, ckpt.config.max_seq_len)
    result = compare(ckpt.model, ref.model if ref else None, tokens.val, seq_len, max_tokens)
    result["seq_len"] = seq_len
    if ref is not None:
        calib = calibration_tokens(tokens.train, n_calib, seq_len, seed)
        same = (ckpt.config.n_layers, ckpt.config.dim) == (ref.config.n_layers, ref.config.dim)
        result["layer_sqnr_db"] = layer_sqnr(ckpt.model, ref.model, calib) if same else {}
    return result
