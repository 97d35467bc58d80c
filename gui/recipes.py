"""The job tabs as recipes: each form becomes a recipe (toolchain/recipe.py), written into the workspace
and run by `edgesmith run RECIPE.toml --out RUN_DIR` as a background job, so every tab gets the
pipeline's caching, resume, stage progress with an ETA, and the run's report.

Train is `[source.train]` alone; Compress is `[source] checkpoint` plus `[[pass]]` tables and
`[compress]`; Export is `[source] checkpoint` plus `[export]` (and `[target] device`, not benched).
The recipe is validated here, in the request (`parse_recipe`: one line naming the key), before a job
starts; its file is `recipes/<run name>.toml` in the workspace, so the Runs tab can run it again.
Paths in it are relative to the workspace, the jobs' working directory. The readers at the end find
what a run left (loss metrics, pass reports, manifests). Nothing here trains, compresses or exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gui.workspace import Workspace
from models.atomic import write_text_atomic
from models.errors import EdgesmithError
from models.llama import SIZES
from toolchain.compress import config_to_dict, kind_of, parse_pass
from toolchain.compress.rules import parse_rules
from toolchain.recipe import Recipe, parse_recipe, to_toml

RECIPES_DIR = "recipes"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def number(value, what: str, low: int = 1) -> int:
    """A whole number >= `low` from a form field, or one line naming the field."""
    try:
        n = int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise EdgesmithError(f"{what}: {value!r} is not a number") from None
    if n < low or n != float(value):
        raise EdgesmithError(f"{what}: {value!r} must be a whole number >= {low}")
    return n


def run_dir(ws: Workspace, out: str, default: str) -> tuple[Path, str]:
    """(absolute run directory, its name) for the form's output field; the name names the recipe."""
    path = ws.resolve((out or "").strip() or default, "output directory")
    if path == ws.root or not RUN_NAME.fullmatch(path.name):
        raise EdgesmithError(f"output directory: {ws.rel(path)!r} must end in a name of letters, digits, '.', '_' "
                             "or '-' (it names the run and its recipe)")
    return path, path.name


def run_stem(ckpt: Path) -> str:
    """A short name for a checkpoint: its run's name (runs/demo/checkpoints/01-quantize-rtn -> demo), else its own."""
    return ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name


def corpus(ws: Workspace, data: str, what: str = "corpus") -> str:
    data = (data or "").strip()
    return "stdlib" if data in ("", "stdlib") else ws.rel(ws.resolve(data, what, must_exist=True))


def checkpoint(ws: Workspace, path: str, out: Path) -> str:
    """A source checkpoint (must exist, in the workspace, and not inside the run directory: a run
    removes the checkpoints it did not make)."""
    ckpt = ws.resolve(path, "checkpoint", must_exist=True)
    if not (ckpt / "edgesmith.json").is_file():
        raise EdgesmithError(f"checkpoint: {ws.rel(ckpt)} has no edgesmith.json (not a checkpoint)")
    if ckpt == out or out in ckpt.parents:
        raise EdgesmithError(f"output directory: {ws.rel(out)} holds the source checkpoint {ws.rel(ckpt)}; "
                             "choose another run directory")
    return ws.rel(ckpt)


# ----------------------------------------------------------------------------- the tabs' recipes


def train_doc(ws: Workspace, name: str, model: str, data: str, steps, nproc, batch_size, seq_len) -> dict:
    model = (model or "").strip()
    model = model if model in SIZES else ws.rel(ws.resolve(model, "model config", must_exist=True))
    return {"name": name, "description": f"Train tab: {model}",
            "source": {"train": {"model": model, "data": corpus(ws, data), "nproc": number(nproc, "processes"),
                                 "steps": number(steps, "steps"), "batch_size": number(batch_size, "batch size"),
                                 "seq_len": number(seq_len, "sequence length")}},
            "target": {"bench": False}}


def pass_tables(specs: list[str], rules: str) -> list[dict]:
    """`kind:key=value,...` lines (as `--pass` takes them) as [[pass]] tables; `REGEX=4|5|8|skip` rule lines
    go to every pass that has rules."""
    pairs = []
    for line in (rules or "").splitlines():
        if line.strip():
            pattern, eq, value = line.strip().rpartition("=")
            if not eq or not pattern:
                raise EdgesmithError(f"rule {line.strip()!r}: expected REGEX=4, REGEX=5, REGEX=8 or REGEX=skip")
            pairs.append((pattern, value.strip()))
    pairs = parse_rules(pairs)
    tables = []
    for spec in specs:
        cfg = parse_pass(spec, pairs)
        table = {k: list(v) if isinstance(v, tuple) else v for k, v in config_to_dict(cfg).items() if v is not None}
        tables.append({"kind": kind_of(cfg), **table})
    return tables


def compress_doc(ws: Workspace, name: str, out: Path, ckpt: str, specs: list[str], rules: str, data: str,
                 seq_len, eval_tokens) -> dict:
    if not specs:
        raise EdgesmithError("passes: choose a quantization method or add a pass (one per line)")
    seq = number(seq_len, "sequence length")
    return {"name": name, "description": f"Compress tab: {len(specs)} pass(es) on {ckpt}",
            "source": {"checkpoint": checkpoint(ws, ckpt, out)}, "pass": pass_tables(specs, rules),
            "compress": {"data": corpus(ws, data, "calibration corpus"), "calib_seq_len": seq, "eval_seq_len": seq,
                         "eval_tokens": number(eval_tokens, "validation tokens", 64)},
            "target": {"bench": False}}


def export_doc(ws: Workspace, name: str, out: Path, ckpt: str, formats: list[str], precision: str, max_seq_len,
               target: str) -> dict:
    if not formats:
        raise EdgesmithError("formats: choose at least one")
    export = {"formats": list(formats), "precision": precision or "fp32"}
    if max_seq_len not in (None, "", 0, "0"):
        export["max_seq_len"] = number(max_seq_len, "KV cache length")
    return {"name": name, "description": f"Export tab: {', '.join(formats)} of {ckpt}",
            "source": {"checkpoint": checkpoint(ws, ckpt, out)}, "export": export,
            "target": {"device": (target or "").strip() or "local", "bench": False}}


def write(ws: Workspace, doc: dict) -> tuple[str, Recipe]:
    """Validate the recipe and write it to recipes/<name>.toml; returns (its workspace path, the recipe)."""
    path = ws.resolve(f"{RECIPES_DIR}/{doc['name']}.toml", "recipe")
    recipe = parse_recipe(doc, origin=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_toml(doc))
    return ws.rel(path), recipe


def run_argv(recipe: str, out: str, overrides: list[str] = ()) -> list[str]:
    argv = ["run", recipe, "--out", out]
    for o in overrides:
        argv += ["--set", o]
    return argv


# ----------------------------------------------------------------------------- what a run left


def metrics_file(run: Path) -> Path:
    """The loss log of a run's training: its checkpoint's copy once done, the trainer's while it runs."""
    done = run / "checkpoints" / "00-train" / "train_metrics.jsonl"
    if done.is_file():
        return done
    live = sorted((run / ".work").glob("train-*/metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    return live[-1] if live else done


def pass_reports(run: Path) -> list[dict]:
    """compress_report.json of each pass checkpoint the run made so far, in order."""
    found = []
    for p in sorted((run / "checkpoints").glob("[0-9][0-9]-*/compress_report.json")):
        try:
            report = json.loads(p.read_text())
        except (OSError, ValueError):  # being written by another process: shown on the next poll
            continue
        if isinstance(report, dict):
            found.append(report)
    return found


def merged_report(reports: list[dict]) -> dict | None:
    """One report over the passes of a run: every pass's before/after, the quality of the last
    against its input, and the per-layer SQNR of the last pass that measured it."""
    if not reports:
        return None
    sqnr = next((r["layer_sqnr_db"] for r in reversed(reports) if r.get("layer_sqnr_db")), {})
    return {"passes": [p for r in reports for p in r.get("passes", [])], "quality": reports[-1].get("quality", {}),
            "layer_sqnr_db": sqnr,
            "quality_of": "total vs reference" if len(reports) == 1 else "last pass vs its input"}


def manifests(run: Path) -> dict[str, dict]:
    """{format: manifest} of the artifacts a run exported so far."""
    found = {}
    for p in sorted((run / "artifacts").glob("*/manifest.json")):
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict):
            found[p.parent.name] = m
    return found
