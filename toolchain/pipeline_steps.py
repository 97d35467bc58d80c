"""The steps of a recipe run, planned before any work: what each one does, its key, where it lands.

A `Step` is one unit of a run: its cache key (`digest` of its input's key and its own configuration),
its output path and its completion marker. `plan(recipe, run_dir)` returns the ordered steps (train,
one per pass, one per export format, the bench, the report) with their keys chained from the source;
toolchain/pipeline.py executes them.
Multi-process steps (training with nproc > 1, distill / qat with compress.nproc > 1) re-run
`edgesmith run --step-job FILE` as torchrun ranks, the way `edgesmith train --nproc` re-runs itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.checkpoint import read_json, write_text_atomic
from models.errors import EdgesmithError
from models.registry import METHODS
from toolchain.compress import QUANTIZE, config_to_dict, kind_of
from toolchain.compress.driver import REPORT, compress_checkpoint, training_kinds
from toolchain.data import load_corpus
from toolchain.export import ExportConfig, export
from toolchain.export.spec import get_format
from toolchain.pipeline_bench import bench_run, measurable
from toolchain.recipe import Recipe, float_precision
from toolchain.report import write_report
from toolchain.train.run import TrainJob, resolve_model_config, run_train
from toolchain.train.state import list_states

REPORT_VERSION = 1
# Rough seconds per unit on a 2-core CPU, only for the ETA (the display rescales by measured pace).
TOKENS_PER_S = {"nano": 8000.0, "micro": 2200.0, "small": 600.0}
MARKER = ".step.json"
STAGES = ("source", "compress", "export", "bench", "report")
FILE_STAGES = ("bench", "report")  # steps whose output is a file; their marker lies beside it


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Step:
    stage: str  # one of STAGES
    name: str  # "00-train", "01-quantize-gptq", "gguf", "local", "report"
    key: str
    out: Path  # the step's final directory (or file, for bench)
    run: Callable[[Path], dict]  # writes the step's output at the given temporary path; returns facts
    estimate_s: float
    describe: str = ""
    info: dict = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0  # spent in this run
    made_s: float = 0.0  # spent making the output (this run, or the one that made the cached output)

    @property
    def marker(self) -> Path:
        return self.out / MARKER if self.stage not in FILE_STAGES else self.out.parent / f".{self.out.name}{MARKER}"

    def done(self) -> bool:
        if not self.out.exists() or not self.marker.is_file():
            return False
        try:
            return json.loads(self.marker.read_text()).get("key") == self.key
        except (json.JSONDecodeError, OSError):
            return False


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def optional_formats(recipe: Recipe) -> tuple[list[str], list[dict]]:
    """The formats to export: every listed one, plus each optional one whose toolkit imports here."""
    formats, skipped = list(recipe.export.formats), []
    for f in recipe.export.optional:
        toolkit = get_format(f).toolkit
        if importable(toolkit):
            formats.append(f)
        else:
            skipped.append({"format": f, "reason": f"optional; `{toolkit}` does not import here"})
    return formats, skipped


def plan(recipe: Recipe, run_dir: Path) -> tuple[list[Step], list[dict]]:
    steps: list[Step] = []
    if recipe.source.train is not None:
        src = _train_step(recipe, run_dir)
        steps.append(src)
        key, ckpt = src.key, src.out
    else:
        key, ckpt = _source_checkpoint(recipe.source.checkpoint)
    source_ckpt = ckpt
    for i, cfg in enumerate(recipe.passes):
        step = _compress_step(recipe, run_dir, i, cfg, key, ckpt, source_ckpt)
        steps.append(step)
        key, ckpt = step.key, step.out
    formats, skipped = optional_formats(recipe)
    precision = float_precision(recipe, _quantized(recipe))
    exports = [_export_step(recipe, run_dir, f, precision, key, ckpt) for f in formats]
    steps += exports
    if recipe.target.bench and exports:
        steps.append(_bench_step(recipe, run_dir, exports, ckpt))
    steps.append(_report_step(run_dir, steps))
    return steps, skipped


# ----------------------------------------------------------------------------- source


def _source_checkpoint(path: str) -> tuple[str, Path]:
    ckpt = Path(path)
    try:
        meta = read_json(ckpt / "edgesmith.json")
        config = read_json(ckpt / "config.json")
    except EdgesmithError as e:
        raise EdgesmithError(f"source.checkpoint: {ckpt} is not a checkpoint ({e}); a bundled device recipe reads "
                             "the demo's: run `edgesmith run` first, or --set source.checkpoint=DIR") from None
    return digest({"checkpoint": meta.get("files"), "config": config}), ckpt


def _model_config(ts):
    cfg = resolve_model_config(ts.model)
    return cfg if ts.vocab_size is None else dataclasses.replace(cfg, vocab_size=ts.vocab_size)


def _train_step(recipe: Recipe, run_dir: Path) -> Step:
    ts = recipe.source.train
    model_cfg = _model_config(ts)
    if ts.train.seq_len > model_cfg.max_seq_len:
        raise EdgesmithError(f"source.train.seq_len: {ts.train.seq_len} exceeds the model's max_seq_len "
                             f"{model_cfg.max_seq_len}")
    ts.train.micro_batch(ts.nproc)
    try:
        corpus = load_corpus(ts.data)
    except EdgesmithError as e:
        raise EdgesmithError(f"source.train.data: {e}") from None
    key = digest({"step": "train", "model": model_cfg.to_dict(), "corpus": corpus.fingerprint(),
                  "train": asdict(ts.train), "nproc": ts.nproc})
    c = ts.train
    tokens = c.steps * c.batch_size * c.seq_len
    estimate = 20.0 + tokens / TOKENS_PER_S.get(ts.model, 2000.0)

    def run(tmp: Path) -> dict:
        return _run_train(ts, model_cfg, run_dir / ".work" / f"train-{key[:16]}", tmp)

    return Step("source", "00-train", key, run_dir / "checkpoints" / "00-train", run, estimate,
                f"train {ts.model} on {ts.data}, {c.steps} steps of {c.batch_size} x {c.seq_len} tokens, "
                f"{ts.nproc} process(es)")


def _run_train(ts, model_cfg, work: Path, tmp: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    spec = ts.model
    if ts.vocab_size is not None or ts.model.endswith(".json"):
        spec = str(work / "model.json")
        write_text_atomic(Path(spec), json.dumps(model_cfg.to_dict(), indent=2) + "\n")
    cfg = ts.train
    if cfg.save_every == 0:  # resumable state, so a killed run continues the training where it stopped
        cfg = dataclasses.replace(cfg, save_every=max(1, cfg.steps // 4))
    finished = (work / "summary.json").is_file() and (work / "checkpoint" / "edgesmith.json").is_file()
    resumed = None
    if not finished:
        states = list_states(work)
        resumed = states[-1].name if states else None
        job = TrainJob(model=spec, data=ts.data, out=str(work), train=cfg, nproc=ts.nproc,
                       resume="latest" if states else None)
        argv = []
        if ts.nproc > 1:
            job_file = work / "job.json"
            body = {"kind": "train", "job": {**asdict(job), "train": asdict(cfg)}}
            argv = ["run", "--step-job", str(job_file)]
            write_text_atomic(job_file, json.dumps({**body, "argv": argv}, indent=2) + "\n")
        run_train(job, argv)
    summary = read_json(work / "summary.json")
    # Killed after this rename, the next run finds no checkpoint and resumes from the final training state
    # (zero steps left, the metrics still there): `work` stays whole until the run ends (pipeline._remove_stale).
    (work / "checkpoint").rename(tmp)
    for name, dest in (("metrics.jsonl", "train_metrics.jsonl"), ("loss.png", "loss.png"),
                       ("summary.json", "train_summary.json")):
        if (work / name).exists():
            shutil.copyfile(work / name, tmp / dest)
    return {"final_loss": summary["final_loss"], "val_perplexity": summary.get("val_perplexity"),
            "tokens_per_s": summary["tokens_per_s"], "world_size": summary["world_size"],
            "steps": summary["steps"], "resumed_from": resumed, "params": None}


# ----------------------------------------------------------------------------- passes


def _pass_name(cfg) -> str:
    kind = kind_of(cfg)
    method = config_to_dict(cfg).get("method")
    return f"{kind}-{method}".replace(":", "") if method else kind


def _compress_step(recipe: Recipe, run_dir: Path, i: int, cfg, in_key: str, src: Path, source_ckpt: Path) -> Step:
    kind = kind_of(cfg)
    keyed = config_to_dict(cfg)
    if kind == "distill" and cfg.teacher is None:  # the run's source is the teacher, as in one compress run
        cfg = dataclasses.replace(cfg, teacher=str(source_ckpt))
        keyed["teacher"] = "source"
    s = recipe.compress
    settings = {"data": recipe.data, "calib_seq_len": s.calib_seq_len, "eval_seq_len": s.eval_seq_len,
                "eval_tokens": s.eval_tokens, "seed": s.seed}
    nproc = s.nproc if kind in training_kinds() else 1
    key = digest({"step": "pass", "input": in_key, "kind": kind, "config": keyed, "settings": settings,
                  "nproc": nproc})
    name = f"{i + 1:02d}-{_pass_name(cfg)}"
    train_s = getattr(cfg, "steps", 0) * getattr(cfg, "batch_size", 0) * getattr(cfg, "seq_len", 0) / 6000.0
    quant_s = METHODS.get(keyed["method"]).meta.get("estimate_s", 10.0) if "method" in keyed and kind == QUANTIZE else 10.0
    estimate = 10.0 + quant_s + train_s

    def run(tmp: Path) -> dict:
        argv = None
        if nproc > 1:
            job_file = run_dir / ".work" / f"compress-{key[:16]}.json"
            job_file.parent.mkdir(parents=True, exist_ok=True)
            argv = ["run", "--step-job", str(job_file)]
            body = {"kind": "compress", "argv": argv, "job": {
                "src": str(src), "out": str(tmp), "pass": {"kind": kind, **config_to_dict(cfg)}, "nproc": nproc,
                **settings}}
            write_text_atomic(job_file, json.dumps(body, indent=2) + "\n")
        compress_checkpoint(src, tmp, [cfg], nproc=nproc, argv=argv, **settings)
        r = read_json(tmp / REPORT)
        p = r["passes"][0]
        return {"kind": kind, "config": config_to_dict(cfg), "before": p["before"], "after": p["after"],
                "quality": r["quality"], "pass_seconds": p["seconds"], "warnings": p["report"].get("warnings", [])}

    return Step("compress", name, key, run_dir / "checkpoints" / name, run, estimate,
                f"{kind} {json.dumps(keyed, default=str)}")


# ----------------------------------------------------------------------------- exports, bench, report


def _quantized(recipe: Recipe) -> bool:
    """Whether the final checkpoint holds quantized weights (a weight-quantizing pass, or such a source)."""
    if any(kind_of(c) in ("quantize", "qat") and getattr(c, "bits", None) for c in recipe.passes):
        return True
    if recipe.source.checkpoint is not None:
        meta = read_json(Path(recipe.source.checkpoint) / "edgesmith.json")
        return bool((meta.get("quantization") or {}).get("weights"))
    return False


def _export_step(recipe: Recipe, run_dir: Path, fmt: str, precision: str, in_key: str, ckpt: Path) -> Step:
    e = recipe.export
    options = {"format": fmt, "precision": precision, "max_seq_len": e.max_seq_len, "fuse": e.fuse,
               **({"exact": True} if e.exact and fmt == "executorch" else {}),
               **({"portable_embedding": True} if e.portable_embedding and fmt == "executorch" else {})}
    key = digest({"step": "export", "input": in_key, **options})

    def run(tmp: Path) -> dict:
        m = export(ckpt, tmp, ExportConfig(**options))
        return {"format": fmt, "precision": m["precision"], "bytes": sum(f["bytes"] for f in m["files"].values()),
                "export_s": m["export_s"], "parity": m["parity"]}

    slow = fmt == "executorch" and _quantized(recipe)  # one XNNPACK partition per quantized Linear
    estimate = get_format(fmt).estimate_s * (3 if slow else 1)  # x3 for quantized ExecuTorch
    return Step("export", fmt, key, run_dir / "artifacts" / fmt, run, estimate,
                f"export {fmt} ({precision} floats; quantized weights keep their codes), parity in its runtime")


def _bench_step(recipe: Recipe, run_dir: Path, exports: list[Step], ckpt: Path) -> Step:
    t = recipe.target
    why_not = measurable(t)
    key = digest({"step": "bench", "inputs": [s.key for s in exports], **asdict(t), "measured": why_not is None})
    suffix = ".json" if why_not is None else ".plan.json"
    out = run_dir / "bench" / f"{t.device}{suffix}"
    per = t.repeat * (t.prompt_len + t.gen_len) / 400.0 + 3.0
    estimate = len(exports) * per if why_not is None else 2.0

    def run(tmp: Path) -> dict:
        return bench_run(t, [s.out for s in exports], ckpt, tmp, why_not)

    what = (f"bench {len(exports)} artifact(s) on {t.device}: prompt {t.prompt_len}, {t.gen_len} new tokens, "
            f"{t.repeat} repeats" if why_not is None else f"plan for {t.device} (not measured: {why_not})")
    return Step("bench", out.name, key, out, run, estimate, what)


def _report_step(run_dir: Path, steps: list[Step]) -> Step:
    key = digest({"step": "report", "inputs": [s.key for s in steps], "version": REPORT_VERSION})

    def run(tmp: Path) -> dict:
        write_report(run_dir)
        return {"html": "report.html", "md": "report.md"}

    return Step("report", "report.html", key, run_dir / "report.html", run, 5.0,
                "report.html (self-contained) and report.md")
