"""The bench stage of a recipe run: measure the artifacts on the target, or say why not and predict.

`local` (and a device given a transport URI in `target.uri`) is measured through devices.bench, each
artifact in the runtime options its manifest records (the configuration its export verified, as every
user path runs it); the results file is the one devices.bench.write_results writes, and each row keeps
the `run_options` it really ran with. A device profile with no way to reach it
(no `target.uri`) is not measured: the stage writes `<device>.plan.json` with the planner's
prediction (devices.planner.plan) for the final checkpoint and the reason, and the report shows it
as a prediction. No figure here is ever presented as measured that was not.
"""

from __future__ import annotations

import json
from pathlib import Path

from devices.bench import bench, write_results
from devices.planner import plan
from devices.profiles import load_profile
from models.checkpoint import read_json, write_text_atomic


def measurable(target) -> str | None:
    """None when the target can be measured from here, else why not (one line)."""
    if target.device == "local" or target.uri is not None:
        return None
    p = load_profile(target.device)
    return (f"no target.uri given for {p.name} (its profile names {p.transport}, which is not tried without one; "
            f"--set target.uri=ssh://... or adb://SERIAL measures it); figures are the planner's prediction")


def bench_run(target, artifacts: list[Path], ckpt: Path, tmp: Path, why_not: str | None) -> dict:
    if why_not is None:
        return _measure(target, artifacts, tmp)
    profile = load_profile(target.device)
    p = plan(profile, str(ckpt), context=target.prompt_len + target.gen_len)
    record = {"measured": False, "device": target.device, "reason": why_not, "checkpoint": str(ckpt),
              "context": target.prompt_len + target.gen_len, "plan": p.as_dict(),
              "artifacts": [_artifact_summary(a) for a in artifacts]}
    write_text_atomic(tmp, json.dumps(record, indent=2, default=str) + "\n")
    return {"measured": False, "reason": why_not, "plan": p.as_dict()}


def _artifact_summary(a: Path) -> dict:
    m = read_json(a / "manifest.json")
    return {"artifact": str(a), "format": m.get("format"), "precision": m.get("precision"),
            "bytes": sum(f["bytes"] for f in m.get("files", {}).values())}


def _measure(target, artifacts: list[Path], tmp: Path) -> dict:
    device = target.uri if target.uri is not None else target.device
    results = bench([str(a) for a in artifacts], device, prompt_len=target.prompt_len, gen_len=target.gen_len,
                    repeat=target.repeat, progress=_progress_line)
    write_results(results, tmp)
    return {"measured": True, "device": target.device, "results": [
        {"format": r.get("format"), "precision": r.get("precision"),
         "decode_tok_s": (r.get("decode_tok_s") or {}).get("median"),
         "prefill_tok_s": (r.get("prefill_tok_s") or {}).get("median"),
         "roofline_fraction": r.get("roofline_fraction"), "run_options": r.get("run_options")} for r in results]}


def _progress_line(done: int, total: int, label: str) -> None:
    print(f"    bench {done}/{total} {label}", flush=True)
