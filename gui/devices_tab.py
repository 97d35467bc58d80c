"""The Devices and Benchmark tabs' figures: device profiles and the planner (`devices.profiles`,
`devices.planner`), and the table of a benchmark's results file (gui/bench_tab.py runs the job).

The planner is quick, so it runs in the request. A model is a size, a public shape (`devices.shapes`:
llama-3.2-1b, ...) or a checkpoint / artifact in the workspace, as `edgesmith devices plan` takes it.
Figures and verdicts come from `devices`; this module only lays them out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from devices.planner import plan as plan_
from devices.planner import target_verdict
from devices.profiles import list_profiles, load_profile
from devices.shapes import model_names
from gui import views
from gui.workspace import Workspace
from models.errors import EdgesmithError
from runtimes.options import describe

PLAN_COLUMNS = ["quantity", "value"]


def profiles() -> list[str]:
    return list_profiles()


def shapes() -> list[str]:
    """Named sizes and public shapes the planner knows without a file (nano, ..., llama-3.2-1b, ...)."""
    return model_names()


def _model_arg(ws: Workspace, model: str):
    model = (model or "").strip()
    if not model:
        raise EdgesmithError(f"model: empty; give a size or public shape ({', '.join(shapes())}) or a checkpoint "
                             "or artifact in the workspace")
    if model in shapes():
        return model
    path = ws.resolve(model, "model")
    if not path.exists():
        raise EdgesmithError(f"model: {model!r} is not a size or public shape ({', '.join(shapes())}) nor a "
                             "checkpoint or artifact in the workspace")
    return str(path)


def plan(ws: Workspace, device: str, model: str, context, bits) -> tuple[str, pd.DataFrame]:
    """(verdict markdown, plan table) of `model` (size name, or a checkpoint / artifact in the
    workspace) on `device` at `context` tokens with weights at `bits` (empty: the planner's choice)."""
    try:
        if not (device or "").strip():
            raise EdgesmithError(f"device: choose a profile ({', '.join(profiles())})")
        context = int(context) if context not in (None, "", 0) else None
        bits = int(bits) if bits not in (None, "", "auto") else None
        p = plan_(device, _model_arg(ws, model), context=context, bits=bits)
    except (EdgesmithError, ValueError) as e:
        return views.refused(e), pd.DataFrame(columns=PLAN_COLUMNS)
    verdict = (f"**{p.model} on {p.device}: {'fits' if p.fits else 'does NOT fit'}** at {p.context:,} tokens "
               f"({p.precision} weights): {p.total_bytes / 1e9:.3f} GB of a {p.budget_bytes / 1e9:.2f} GB budget. "
               f"Largest context that fits: **{p.max_context:,}** tokens. Predicted decode at most "
               f"**{p.decode_tok_s_bound:,.1f} tok/s**, prefill at most {p.prefill_tok_s_bound:,.0f} tok/s. "
               f"Recommended: {p.recommended_format}, {p.recommended_precision}.")
    rows = [[k, _fmt(v)] for k, v in p.as_dict().items()]
    return verdict, pd.DataFrame(rows, columns=PLAN_COLUMNS)


def _fmt(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:  # a byte count held as a float
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:,.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def plan_artifact(device: str, directory: Path, fmt: str) -> str:
    """One line: the planner's verdict for this artifact on `device` (the same line `export --target` prints)."""
    try:
        return f"- `{directory.name}`: {target_verdict(device, directory, fmt)}"
    except EdgesmithError as e:
        return f"- `{directory.name}`: {e}"


def profile_table(name: str) -> pd.DataFrame:
    try:
        d = load_profile(name).as_dict()
    except EdgesmithError as e:
        return pd.DataFrame([["error", str(e)]], columns=["field", "value"])
    return pd.DataFrame([[k, json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v)] for k, v in d.items()
                         if k != "measured"], columns=["field", "value"])


# ----------------------------------------------------------------------------- benchmark


def bench_table(results: list[dict] | None) -> pd.DataFrame:
    cols = ["artifact", "format", "precision", "options", "device", "MB", "prefill tok/s", "decode tok/s", "TTFT ms",
            "peak RSS MB", "decode bound tok/s", "roofline fraction"]
    rows = []
    for r in results or []:
        med = lambda k: r.get(k, {}).get("median") if isinstance(r.get(k), dict) else r.get(k)  # noqa: E731
        ran = describe(r["run_options"]) if r.get("run_options") is not None else "not recorded"
        rows.append([Path(str(r.get("artifact", ""))).name, r.get("format"), r.get("precision"), ran, r.get("device"),
                     f"{(r.get('bytes') or 0) / 1e6:.2f}", _num(med("prefill_tok_s")), _num(med("decode_tok_s")),
                     _num(med("ttft_ms")), _num(med("peak_rss_mb")), _num(r.get("decode_bound_tok_s")),
                     _num(r.get("roofline_fraction"), ".3f")])
    return pd.DataFrame(rows, columns=cols)


def _num(v, spec: str = ",.1f") -> str:
    return "-" if v is None else format(float(v), spec)
