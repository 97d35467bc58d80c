"""The Devices and Benchmark tabs: device profiles and the planner (`devices.profiles`,
`devices.planner`), and benchmarks run as `edgesmith bench` jobs whose results file is read back.

The planner is quick, so it runs in the request; a benchmark is long work, so it is a background job
like training. Figures come from `devices`; this module only lays them out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from gui import views
from gui.workspace import Workspace
from models.errors import EdgesmithError
from models.llama import SIZES


def profiles() -> list[str]:
    from devices.profiles import list_profiles

    return list_profiles()


def _model_arg(ws: Workspace, model: str):
    model = (model or "").strip()
    return model if model in SIZES else ws.resolve(model, "model", must_exist=True)


def plan(ws: Workspace, device: str, model: str, context, bits) -> tuple[str, pd.DataFrame]:
    """(verdict markdown, plan table) of `model` (size name, or a checkpoint / artifact in the
    workspace) on `device` at `context` tokens with weights at `bits` (empty: the planner's choice)."""
    from devices.planner import plan as plan_

    try:
        context = int(context) if context not in (None, "", 0) else None
        bits = int(bits) if bits not in (None, "", "auto") else None
        p = plan_(device, _model_arg(ws, model), context=context, bits=bits)
    except (EdgesmithError, ValueError) as e:
        return views.refused(e), pd.DataFrame()
    verdict = (f"**{p.model} on {p.device}: {'fits' if p.fits else 'does NOT fit'}** at {p.context:,} tokens "
               f"({p.precision} weights): {p.total_bytes / 1e9:.3f} GB of a {p.budget_bytes / 1e9:.2f} GB budget. "
               f"Largest context that fits: **{p.max_context:,}** tokens. Predicted decode at most "
               f"**{p.decode_tok_s_bound:,.1f} tok/s**, prefill at most {p.prefill_tok_s_bound:,.0f} tok/s. "
               f"Recommended: {p.recommended_format}, {p.recommended_precision}.")
    rows = [[k, _fmt(v)] for k, v in p.as_dict().items()]
    return verdict, pd.DataFrame(rows, columns=["quantity", "value"])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def plan_artifact(device: str, directory: Path) -> str:
    """One line: does this artifact fit on `device`, and its decode bound there."""
    from devices.planner import plan as plan_

    try:
        p = plan_(device, directory)
    except EdgesmithError as e:
        return f"- {directory.name}: {e}"
    return (f"- `{directory.name}` on **{device}**: {'fits' if p.fits else 'does NOT fit'} "
            f"({p.total_bytes / 1e6:,.1f} MB of {p.budget_bytes / 1e9:.1f} GB), max context {p.max_context:,}, "
            f"decode ≤ {p.decode_tok_s_bound:,.0f} tok/s")


def profile_table(name: str) -> pd.DataFrame:
    from devices.profiles import load_profile

    try:
        d = load_profile(name).as_dict()
    except EdgesmithError as e:
        return pd.DataFrame([["error", str(e)]], columns=["field", "value"])
    return pd.DataFrame([[k, json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v)] for k, v in d.items()
                         if k != "measured"], columns=["field", "value"])


# ----------------------------------------------------------------------------- benchmark


def bench_table(results: list[dict] | None) -> pd.DataFrame:
    cols = ["artifact", "format", "precision", "device", "MB", "prefill tok/s", "decode tok/s", "TTFT ms",
            "peak RSS MB", "decode bound tok/s", "roofline fraction"]
    rows = []
    for r in results or []:
        med = lambda k: r.get(k, {}).get("median") if isinstance(r.get(k), dict) else r.get(k)  # noqa: E731
        rows.append([Path(str(r.get("artifact", ""))).name, r.get("format"), r.get("precision"), r.get("device"),
                     f"{(r.get('bytes') or 0) / 1e6:.2f}", _num(med("prefill_tok_s")), _num(med("decode_tok_s")),
                     _num(med("ttft_ms")), _num(med("peak_rss_mb")), _num(r.get("decode_bound_tok_s")),
                     _num(r.get("roofline_fraction"), ".3f")])
    return pd.DataFrame(rows, columns=cols)


def _num(v, spec: str = ",.1f") -> str:
    return "-" if v is None else format(float(v), spec)
