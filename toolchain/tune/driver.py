"""`tune`: choose per-unit precisions for a device by building and measuring the candidates.

1. sensitivities (toolchain.tune.sensitivity, cached) -> the greedy frontier (toolchain.tune.search); with
   `drop_layers` N, structured pruning joins the search: up to N whole blocks removed (`prune:method=layers`
   with the blocks named, before the quantize pass), each priced by its measured KLD; with `heal_steps` M, a
   candidate that drops blocks is distilled M steps from the float model between the prune and quantize passes
   (the estimate prices the drop unhealed; the measured KLD decides);
2. uniform 4-bit is built and measured first; its measured file size and speed correct the estimates (the
   size by the overhead the estimate leaves out, the speed by how it scales with the weight bytes), and the
   other candidates are spread over the frontier points the corrected estimates say meet the limits. The widths
   searched are those the first format stores at their own size (FormatSpec.code_bits): 4 and 8 bits, and 5 in
   GGUF (Q5_0: 5.5 bits per weight; the other formats hold 5-bit codes as 8-bit, at 8 bits' size). Each: `compress` with the candidate's
   rules, `export` to each format (parity
   checked there), mean / median / 99% KLD and same top p through the first format's own runtime against the
   float checkpoint on the validation split, and speed from `bench` on the target (the `local` profile here,
   ssh/adb devices when named) — or, where the device cannot be reached, the planner's bandwidth bound, and
   the result says which. Each candidate's result is written under `DIR/candidates/<key>/` when it is
   complete, so a killed tune resumes where it stopped and a second run measures nothing again;
3. one measured refinement: the estimates corrected by every candidate measured, the largest unbuilt
   frontier point they say meets the limits is built too, when it is larger than the best one that did;
4. the choice: the lowest measured mean KLD among candidates meeting every limit; `DIR/pareto.json`,
   `DIR/best/` (its checkpoint), `DIR/recipe.toml` (rebuilds it with `edgesmith run`) and
   `DIR/report.html` (toolchain.tune.report). Limits no candidate meets are one line naming the limit and
   the best point reached (exit 2), after the outputs are written.
This module does not choose how a unit is quantized (the compress methods do) nor time anything itself.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import runtimes
from devices.bench import bench
from devices.profiles import load_profile
from devices.roofline import decode_bound
from models.atomic import replace_dir, temp_dir_for, write_text_atomic
from models.checkpoint import lineage_path, load_checkpoint
from models.confine import read_json
from models.errors import EdgesmithError
from runtimes.artifact import read_manifest
from toolchain.compress import calibration_tokens, config_class
from toolchain.compress.driver import compress_checkpoint
from toolchain.compress.passes.distill import Distill
from toolchain.compress.passes.prune import Prune
from toolchain.compress.quality import compare_sessions
from toolchain.data import load_corpus, tokenize_corpus
from toolchain.export import ExportConfig, export
from toolchain.export.spec import get_format
from toolchain.recipe import to_toml
from toolchain.tune.report import write_tune_report
from toolchain.tune.search import Assignment, frontier, pick, uniform
from toolchain.tune.sensitivity import sensitivities

METHODS = ("gptq", "awq", "rtn")
GROUP_SIZE = 32


def heal_config(steps: int, seq_len: int) -> dict:
    """The distill pass that heals a model after dropped blocks: the KL to the float model alone at temperature 1 (the
    KLD tune measures), at a fine-tuning learning rate. Measured on micro with layers.1 dropped, 60 steps (KLD on 8k
    validation tokens): none 0.064; the pass's defaults (T=2, half cross-entropy, lr 1e-3) 0.075, worse; KL at T=1,
    lr 1e-3 0.036; at lr 3e-4 0.026."""
    return {"steps": steps, "seq_len": seq_len, "temperature": 1.0, "lm_weight": 0.0, "lr": 3e-4}


def _check(value, flag: str, low: float = 0.0) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low):
        raise EdgesmithError(f"{flag}: {value!r} must be a number > {low:g}")


def tune(checkpoint: str | Path, target: str, out: str | Path, *, max_size_mb: float | None = None,
         min_decode_tok_s: float | None = None, max_kld: float | None = None, formats: list[str] | None = None,
         method: str = "gptq", budget_minutes: float | None = None, candidates: int = 4, seed: int = 0,
         drop_layers: int = 0, heal_steps: int = 0,
         data: str = "stdlib", calib_windows: int = 16, calib_seq_len: int = 128, eval_seq_len: int = 128,
         eval_tokens: int = 16 * 1024, bench_args: dict | None = None, log=print) -> dict:
    """Search, build, measure and choose; returns the pareto document (also `out/pareto.json`)."""
    t0 = time.monotonic()
    out = Path(out)
    for value, flag in ((max_size_mb, "--max-size-mb"), (min_decode_tok_s, "--min-decode-tok-s"),
                        (max_kld, "--max-kld"), (budget_minutes, "--budget-minutes")):
        _check(value, flag)
    if method not in METHODS:
        raise EdgesmithError(f"--method: {method!r}; allowed: {', '.join(METHODS)}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise EdgesmithError(f"--candidates: {candidates!r} must be an integer >= 1")
    if isinstance(drop_layers, bool) or not isinstance(drop_layers, int) or drop_layers < 0:
        raise EdgesmithError(f"--drop-layers: {drop_layers!r} must be an integer >= 0")
    if isinstance(heal_steps, bool) or not isinstance(heal_steps, int) or heal_steps < 0:
        raise EdgesmithError(f"--heal-steps: {heal_steps!r} must be an integer >= 0")
    if heal_steps and not drop_layers:
        raise EdgesmithError("--heal-steps: heals a model after dropped blocks; give --drop-layers N too")
    profile = load_profile(target)
    formats = list(formats or [next((f for f in profile.formats if f in ("gguf", "onnx", "executorch")), "gguf")])
    ckpt = load_checkpoint(checkpoint)
    if ckpt.meta.get("quantization"):
        raise EdgesmithError(f"{checkpoint}: already quantized; tune starts from the float checkpoint it came from")
    tokens = tokenize_corpus(load_corpus(data), ckpt.tokenizer)
    calib = calibration_tokens(tokens.train, calib_windows, min(calib_seq_len, ckpt.config.max_seq_len), seed)
    sha = ckpt.meta["files"]["model.safetensors"]["sha256"]
    widths = get_format(formats[0]).code_bits  # the widths whose size the first format stores (GGUF: 5 too, Q5_0)
    sens = sensitivities(ckpt.model, calib, method, GROUP_SIZE, sha, out / "cache", ckpt.tokenizer,
                         drop=drop_layers > 0, bits=widths)
    log(f"sensitivity: {len(sens['units'])} units x {'/'.join(map(str, widths))} bits"
        f"{' and blocks dropped' if drop_layers else ''} "
        f"({'cached' if sens['cached'] else 'measured'}, {method}, {calib.shape[0]} calibration windows of "
        f"{calib.shape[1]})")
    path = frontier(sens, drop_layers)
    max_bytes = None if max_size_mb is None else max_size_mb * 1e6
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "weights_sha256": sha, "method": method,
                "group_size": GROUP_SIZE, "formats": formats, "target": profile.name, "seed": seed, "data": data,
                "calibration": list(calib.shape), "eval_seq_len": eval_seq_len, "eval_tokens": eval_tokens,
                "drop_layers": drop_layers, **({"heal_steps": heal_steps} if heal_steps else {})}
    job = _Job(Path(checkpoint), out, settings, formats, profile, tokens, ckpt, bench_args or {}, log)
    n_todo = candidates
    results = [job.candidate(uniform(path), f"1/{n_todo} (uniform 4-bit, the baseline)")]
    for i, a in enumerate(_plan(path, results, candidates, max_bytes, min_decode_tok_s, max_kld), start=2):
        if budget_minutes is not None and time.monotonic() - t0 > 60 * budget_minutes:
            log(f"budget of {budget_minutes:g} min reached: {len(results)} of {n_todo} candidates built")
            break
        results.append(job.candidate(a, f"{i}/{n_todo}"))
    extra = _refinement(path, results, max_bytes, min_decode_tok_s)
    if extra is not None and (budget_minutes is None or time.monotonic() - t0 <= 60 * budget_minutes):
        results.append(job.candidate(extra, "refinement"))
    return _finish(job, results, sens, max_size_mb, min_decode_tok_s, max_kld, time.monotonic() - t0)


def _corrected(a: Assignment, results: list[dict]) -> tuple[float, float]:
    """(size bytes, decode tok/s) of `a` as the built candidates say the estimates err: the size off by the
    largest measured overhead (metadata, tokenizer, float norms), decode by the most pessimistic measured ratio
    (decode reads every weight once per token, so it scales with the inverse of the weight bytes)."""
    overhead = max(r["size_bytes"] - r["est_bytes"] for r in results)
    base = results[0]
    ratio = min((r["decode_tok_s"] * r["est_bytes"]) / (base["decode_tok_s"] * base["est_bytes"]) for r in results)
    return a.est_bytes + overhead, base["decode_tok_s"] * base["est_bytes"] / a.est_bytes * ratio


def _fits(a: Assignment, results: list[dict], max_bytes, min_decode) -> bool:
    size, speed = _corrected(a, results)
    return (max_bytes is None or size <= max_bytes) and (min_decode is None or speed >= min_decode)


def _plan(path, results, candidates, max_bytes, min_decode, max_kld) -> list[Assignment]:
    """The candidates after the baseline: spread over the frontier points the corrected estimates say fit."""
    feasible = [a for a in path if _fits(a, results, max_bytes, min_decode)]
    built = {tuple(r["bits"].items()) for r in results}
    return [a for a in pick(feasible or path[:1], candidates, None, max_kld) if a.bits not in built]


def _refinement(path: list[Assignment], results: list[dict], max_bytes, min_decode) -> Assignment | None:
    """With a limit given: the largest frontier point not yet built that the estimates, corrected by everything
    measured so far, say fits, when it is larger than the best fitting candidate built."""
    if max_bytes is None and min_decode is None:
        return None
    built = {tuple(r["bits"].items()) for r in results}
    fitting = [r["est_bytes"] for r in results if (max_bytes is None or r["size_bytes"] <= max_bytes)
               and (min_decode is None or r["decode_tok_s"] >= min_decode)]
    fits = [a for a in path if a.bits not in built and _fits(a, results, max_bytes, min_decode)]
    best = max(fits, key=lambda a: a.est_bytes, default=None)
    return best if best is not None and best.est_bytes > max(fitting, default=0) else None


class _Job:
    def __init__(self, checkpoint, out, settings, formats, profile, tokens, ckpt, bench_args, log):
        self.checkpoint, self.out, self.settings, self.formats = checkpoint, out, settings, formats
        self.profile, self.tokens, self.ckpt, self.bench_args, self.log = profile, tokens, ckpt, bench_args, log
        self.reference = None

    def candidate(self, a: Assignment, label: str) -> dict:
        heal = self.settings.get("heal_steps", 0) if a.dropped() else 0
        build = {"rules": a.rules(), **({"drop": list(a.dropped())} if a.dropped() else {}),
                 **({"heal_steps": heal} if heal else {})}
        key = hashlib.sha256(json.dumps({**self.settings, **build}, sort_keys=True).encode()).hexdigest()
        cdir = self.out / "candidates" / key[:12]
        done = cdir / "result.json"
        if done.is_file():
            result = read_json(done)
            self.log(f"candidate {label}: {a.label()} — measured before (cached)")
            return result
        self.log(f"candidate {label}: {a.label()} (estimated {a.est_bytes / 1e6:.2f} MB, KLD {a.est_kld:.4g})")
        cfg = config_class(self.settings["method"])(bits=4, group_size=GROUP_SIZE, rules=tuple(map(tuple, a.rules())),
                                                    n_calib=self.settings["calibration"][0])
        prune = [Prune(method="layers", drop=a.dropped(), n_calib=self.settings["calibration"][0])] if a.dropped() \
            else []
        prune += [Distill(**heal_config(heal, self.settings["calibration"][1]))] if heal else []
        report = compress_checkpoint(self.checkpoint, cdir / "checkpoint", [*prune, cfg], self.settings["data"],
                                     self.settings["calibration"][1], self.settings["eval_seq_len"],
                                     self.settings["eval_tokens"], self.settings["seed"], force=True)
        for fmt in self.formats:
            export(cdir / "checkpoint", cdir / fmt, ExportConfig(format=fmt, target=self.profile.name, force=True),
                   log=lambda line: None)
        artifact = cdir / self.formats[0]
        manifest = read_manifest(artifact, verify=False)
        quality = self._kld(artifact)
        speed = self._speed(artifact, manifest)
        result = {"key": key[:12], "bits": a.by_unit, "rules": a.rules(), "dropped": list(a.dropped()),
                  "heal_steps": heal, "label": a.label() + (f", healed {heal} steps" if heal else ""),
                  "est_kld": a.est_kld, "est_bytes": a.est_bytes, "format": self.formats[0],
                  "size_bytes": (artifact / manifest["entry"]).stat().st_size,
                  "size_mb": round((artifact / manifest["entry"]).stat().st_size / 1e6, 4),
                  "parity": {f: read_manifest(cdir / f, verify=False).get("parity", {}).get("passed")
                             for f in self.formats},
                  "torch_quality": {k: report["quality"].get(k) for k in ("kl", "top1", "perplexity")},
                  **quality, **speed, "path": lineage_path(cdir, self.out)}
        write_text_atomic(done, json.dumps(result, indent=2) + "\n")
        self.log(f"  {result['size_mb']:.3f} MB, mean KLD {result['kld_mean']:.4g}, same top p "
                 f"{100 * result['same_top_p']:.2f} %, decode {result['decode_tok_s']:.1f} tok/s "
                 f"({result['speed_source']})")
        return result

    def _kld(self, artifact: Path) -> dict:
        if self.reference is None:
            self.reference = runtimes.load(self.checkpoint, backend="torch")
        session = runtimes.load(artifact)
        q = compare_sessions(session, self.reference, self.tokens.val, self.settings["eval_seq_len"],
                             self.settings["eval_tokens"], progress=True)
        session.close()
        return {"kld_mean": q["kl"], "kld_median": q["kld_median"], "kld_p99": q["kld_p99"],
                "same_top_p": q["top1"], "rms_dp": q["dp_rms"], "perplexity": q["perplexity"],
                "reference_perplexity": q["reference_perplexity"], "kld_through": session.backend}

    def _speed(self, artifact: Path, manifest: dict) -> dict:
        args = {"prompt_len": 64, "gen_len": 64, "repeat": 3, **self.bench_args}
        p = self.profile
        if p.name != "local" and p.transport == "local":  # a placeholder transport: this machine is not that device
            return self._bound(manifest, args, f"{p.name} has no transport to measure on")
        try:
            (r,) = bench([artifact], p.name, **args)
        except EdgesmithError as e:  # an unreachable device: the planner's bound, and the result says so
            return self._bound(manifest, args, f"{p.name} not reachable: {str(e)[:120]}")
        return {"decode_tok_s": r["decode_tok_s"]["median"], "prefill_tok_s": r["prefill_tok_s"]["median"],
                "peak_rss_mb": (r.get("peak_rss_mb") or {}).get("median"),
                "speed_source": f"measured on {p.name} ({r['backend']}, median of {args['repeat']})"}

    def _bound(self, manifest: dict, args: dict, why: str) -> dict:
        bound, _ = decode_bound(manifest, self.profile.bandwidth_bytes_s, args["prompt_len"], args["gen_len"])
        return {"decode_tok_s": bound, "prefill_tok_s": None, "peak_rss_mb": None,
                "speed_source": f"planner bound ({why})"}


def _meets(r: dict, max_size_mb, min_decode, max_kld) -> list[str]:
    """The limits a measured candidate misses (empty: it meets them all)."""
    missed = []
    if max_size_mb is not None and r["size_mb"] > max_size_mb:
        missed.append(f"--max-size-mb {max_size_mb:g}")
    if min_decode is not None and r["decode_tok_s"] < min_decode:
        missed.append(f"--min-decode-tok-s {min_decode:g}")
    if max_kld is not None and r["kld_mean"] > max_kld:
        missed.append(f"--max-kld {max_kld:g}")
    return missed


def _finish(job: _Job, results: list[dict], sens: dict, max_size_mb, min_decode, max_kld, seconds: float) -> dict:
    for r in results:
        r["misses"] = _meets(r, max_size_mb, min_decode, max_kld)
    ok = [r for r in results if not r["misses"]]
    best = min(ok, key=lambda r: (r["kld_mean"], r["size_bytes"]), default=None)
    for r in results:
        r["chosen"] = r is best
    doc = {"settings": job.settings, "limits": {"max_size_mb": max_size_mb, "min_decode_tok_s": min_decode,
                                                "max_kld": max_kld},
           "sensitivity": {"units": sens["units"], "bytes": sens["bytes"]}, "candidates": results,
           "chosen": best["key"] if best else None, "seconds": round(seconds, 1)}
    job.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(job.out / "pareto.json", json.dumps(doc, indent=2) + "\n")
    write_tune_report(job.out, doc)
    if best is None:
        nearest = min(results, key=lambda r: (len(r["misses"]), r["kld_mean"]))
        raise EdgesmithError(
            f"tune: no candidate meets {', '.join(sorted({m for r in results for m in r['misses']}))}; best reached: "
            f"{nearest['label']} at {nearest['size_mb']:.3f} MB, mean KLD {nearest['kld_mean']:.4g}, decode "
            f"{nearest['decode_tok_s']:.1f} tok/s (misses {', '.join(nearest['misses'])}; {job.out / 'pareto.json'})")
    _write_best(job, best)
    return doc


def _write_best(job: _Job, best: dict) -> None:
    src = job.out / best["path"] / "checkpoint"
    tmp = temp_dir_for(job.out / "best")
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    replace_dir(tmp, job.out / "best")
    recipe = {"name": f"tuned-{job.profile.name}",
              "description": f"edgesmith tune: {best['label']}, mean KLD {best['kld_mean']:.4g} measured through "
                             f"{best['kld_through']}",
              "source": {"checkpoint": str(job.checkpoint.resolve())},
              "pass": [*([{"kind": "prune", "method": "layers", "drop": best["dropped"]}] if best.get("dropped")
                         else []),
                       *([{"kind": "distill", **heal_config(best["heal_steps"], job.settings["calibration"][1])}]
                         if best.get("heal_steps") else []),
                       {"kind": "quantize", "method": job.settings["method"], "bits": 4, "group_size": GROUP_SIZE,
                        "rules": best["rules"]}],
              "export": {"formats": job.formats}, "target": {"device": job.profile.name}}
    write_text_atomic(job.out / "recipe.toml", to_toml(recipe))
