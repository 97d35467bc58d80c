"""How the GUI shows things: job status lines, progress bars, tables and plots built from the files
the `edgesmith` commands write (metrics.jsonl, compress_report.json, manifest.json).

Pure functions of their inputs, no Gradio import: the handlers in gui/actions.py return what these
build. Nothing here computes a result a command did not already write.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

import pandas as pd

from toolchain.jobs import Job

ERROR_PREFIX = ("edgesmith: error:", "edgesmith: internal error:")


def refused(error: Exception) -> str:
    return f"**Refused:** {error}"


def job_markdown(job: Job | None, log: str = "") -> str:
    """One status line: what runs, its state, the elapsed time, the error line of a failed command."""
    if job is None:
        return "No job yet."
    end = job.finished or time.time()
    line = f"**{html.escape(job.title)}** · `{job.id}` · **{job.status}** · {end - job.created:.1f} s"
    if len(job.commands) > 1:
        line += f" · command {min(job.step + 1, len(job.commands))}/{len(job.commands)}"
    if job.status == "failed":
        errors = [ln for ln in log.splitlines() if ln.startswith(ERROR_PREFIX) or "Error" in ln[:40]]
        line += f"  \n{html.escape(errors[-1] if errors else 'exit status ' + str(job.returncode))}"
    return line


def progress_html(job: Job | None) -> str:
    """A progress bar and one line: for a recipe run, its stage (`compress 2/4 · 01-quantize-rtn 1/1`),
    the counter inside it when the stage prints one, and the time left; else the command's counter."""
    if job is None:
        return ""
    if job.status == "done":
        value, text = 1.0, "done"
    elif job.progress:
        p = job.progress
        value, text = p["fraction"], progress_text(p)
    elif job.status == "running":
        value, text = 0.0, "starting (loading the toolchain)"
    else:
        value, text = 0.0, job.status
    return (f'<div class="es-progress"><progress max="1" value="{value:.4f}" style="width:100%"></progress>'
            f'<span>{html.escape(text)}</span></div>')


def count(n: int) -> str:
    """A counter as people read it: 600, 12.5k, 3.55M (tokenization counts bytes)."""
    for above, scale, unit in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):  # 9999 stays as it is
        if n >= above:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def progress_text(p: dict) -> str:
    stage = p.get("stage")
    counter = f"{count(p['n'])}/{count(p['total'])}"
    if not stage:
        return f"{p['label'] or 'progress'} {counter} ({100 * p['fraction']:.0f} %)"
    parts = [f"stage {stage['index']}/{stage['count']} {stage['name']}", f"{stage['step']} ({stage['steps']})"]
    if p["label"] != stage["name"] or f"{p['n']}/{p['total']}" != stage["steps"]:
        parts.append(f"{p['label']} {counter}")
    eta = stage["eta_s"]
    parts.append(f"{100 * p['fraction']:.0f} % of the run")
    parts.append(f"ETA {clock(eta)}" if eta > 0 else "ETA: any moment (past the estimate)")
    return " · ".join(parts)


def clock(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.jsonl as a (step, loss) frame; empty while nothing was written."""
    rows = []
    try:
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
                if isinstance(r, dict) and "loss" in r:
                    rows.append({"step": int(r["step"]), "loss": float(r["loss"])})
            except (ValueError, TypeError, KeyError):  # a line being written (or not a metrics line)
                continue
    except OSError:
        pass
    # typed even when empty: the plot takes its axis types from the first frame it gets
    return pd.DataFrame({"step": pd.Series([r["step"] for r in rows], dtype="int64"),
                         "loss": pd.Series([r["loss"] for r in rows], dtype="float64")})


# ----------------------------------------------------------------------------- compress


def compress_table(report: dict | None) -> pd.DataFrame:
    """One row per pass (before -> after) and one for the whole run against the reference."""
    cols = ["pass", "params (M)", "size (MB)", "perplexity", "mean KLD", "99% KLD", "same top p"]
    if not report:
        return pd.DataFrame(columns=cols)
    rows = []
    for p in report.get("passes", []):
        b, a = p["before"], p["after"]
        name = p["kind"] + (f" {p['config']['method']}" if "method" in p.get("config", {}) else "")
        rows.append([name, f"{b['params'] / 1e6:.3f} → {a['params'] / 1e6:.3f}",
                     f"{b['size_mb']:.3f} → {a['size_mb']:.3f}", f"{b['perplexity']:.3f} → {a['perplexity']:.3f}",
                     "", "", ""])
    q = report.get("quality", {})
    if q:
        first = report["passes"][0]["before"] if report.get("passes") else {}
        last = report["passes"][-1]["after"] if report.get("passes") else {}
        rows.append([report.get("quality_of", "total vs reference"), "", f"{first.get('size_mb', 0):.3f} → {last.get('size_mb', 0):.3f}",
                     f"{q.get('reference_perplexity', float('nan')):.3f} → {q.get('perplexity', float('nan')):.3f}",
                     f"{q.get('kl', float('nan')):.4g}", f"{q.get('kld_p99', float('nan')):.4g}",
                     f"{100 * q.get('top1', float('nan')):.2f} %"])
    return pd.DataFrame(rows, columns=cols)


def sqnr_grid(sqnr_db: dict) -> tuple[list[str], list[str], list[list[float]]]:
    """Per-layer SQNR laid out as rows (embedding, block 0..N-1, lm_head) x columns (attention, MLP).
    Exact layers (null in the report: no error) become +inf; cells that do not exist are NaN."""
    blocks = sorted({int(k.split(".")[1]) for k in sqnr_db if k.startswith("layers.")})
    rows = (["embed_tokens"] if "embed_tokens" in sqnr_db else []) + [f"block {i}" for i in blocks] + \
        (["lm_head"] if "lm_head" in sqnr_db else [])
    cols = ["self_attn", "mlp"]
    value = lambda v: math.inf if v is None else float(v)  # noqa: E731
    grid = []
    for r in rows:
        if r in ("embed_tokens", "lm_head"):
            grid.append([value(sqnr_db[r]), math.nan])
        else:
            i = int(r.split()[1])
            grid.append([value(sqnr_db[f"layers.{i}.{c}"]) if f"layers.{i}.{c}" in sqnr_db else math.nan
                         for c in cols])
    return rows, cols, grid


def sqnr_heatmap(sqnr_db: dict):
    """A matplotlib figure of `sqnr_grid`, each cell annotated in dB (None when there is nothing)."""
    if not sqnr_db:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols, grid = sqnr_grid(sqnr_db)
    data = np.array(grid, dtype=float)
    finite = data[np.isfinite(data)]
    shown = np.where(np.isinf(data), finite.max() if finite.size else 0.0, data)
    fig, ax = plt.subplots(figsize=(4.5, 0.45 * len(rows) + 1.2))
    im = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), ["attention\n(or whole layer)", "MLP"])
    ax.set_yticks(range(len(rows)), rows)
    for (i, j), v in np.ndenumerate(data):
        if not math.isnan(v):
            ax.text(j, i, "exact" if math.isinf(v) else f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="SQNR (dB)")
    ax.set_title("per-layer output SQNR vs reference")
    fig.tight_layout()
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- export


def parity_table(manifests: dict[str, dict]) -> pd.DataFrame:
    cols = ["format", "precision", "runtime", "max |logit diff|", "argmax agreement", "greedy matched", "passed"]
    rows = []
    for fmt, m in manifests.items():
        p = m.get("parity") or {}
        if "skipped" in p:
            rows.append([fmt, m.get("precision"), "-", "-", "-", "-", f"skipped: {p['skipped']}"])
            continue
        rows.append([fmt, m.get("precision"), p.get("runtime", "-"), f"{p.get('max_abs_logit_diff', float('nan')):.3g}",
                     f"{p.get('argmax_agreement', float('nan')):.3f}",
                     f"{p.get('greedy_matched', '-')}/{p.get('greedy_steps', '-')}", str(p.get("passed", "-"))])
    return pd.DataFrame(rows, columns=cols)


def files_table(manifests: dict[str, dict], dirs: dict[str, str]) -> pd.DataFrame:
    rows = [[fmt, f"{dirs[fmt]}/{name}", f"{f['bytes'] / 1e6:.3f}"]
            for fmt, m in manifests.items() for name, f in sorted(m.get("files", {}).items())]
    return pd.DataFrame(rows, columns=["format", "file", "MB"])
