"""`DIR/report.html` of a tune: the Pareto plot (size x mean KLD, coloured by decode tok/s), the candidates
table and the per-unit precision of each candidate beside the unit's measured sensitivity.

Reads the pareto document `toolchain.tune.driver` writes; measures nothing. The plot is a matplotlib PNG
embedded as base64 (and saved as `DIR/pareto.png` for the GUI), like the run report's.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from models.atomic import write_bytes_atomic, write_text_atomic
from toolchain.report import CSS, _png

COLUMNS = ["", "candidate", "size MB", "mean KLD", "median KLD", "99% KLD", "same top p", "decode tok/s",
           "speed from", "limits missed"]


def candidate_rows(doc: dict) -> list[list[str]]:
    rows = []
    for r in doc["candidates"]:
        rows.append(["chosen" if r.get("chosen") else "", r["label"], f"{r['size_mb']:.3f}", f"{r['kld_mean']:.4g}",
                     f"{r['kld_median']:.4g}", f"{r['kld_p99']:.4g}", f"{100 * r['same_top_p']:.2f} %",
                     f"{r['decode_tok_s']:.1f}", r["speed_source"], ", ".join(r.get("misses", [])) or "none"])
    return rows


def limits_text(limits: dict) -> str:
    """The limits as the flags that set them ("none" without any)."""
    flags = {"max_size_mb": "--max-size-mb", "min_decode_tok_s": "--min-decode-tok-s", "max_kld": "--max-kld"}
    return ", ".join(f"{flags[k]} {v:g}" for k, v in limits.items() if v is not None and k in flags) or "none"


def unit_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Units down, candidates across, with each unit's measured KLD at each width searched (4, 5 where the format
    holds it, 8; and dropped, for blocks when the search could drop them) first."""
    cands, units = doc["candidates"], doc["sensitivity"]["units"]
    drop = any("drop" in kld for kld in units.values())
    widths = sorted({b for kld in units.values() for b in kld if b.isdigit()}, key=int)
    headers = ["unit", *(f"KLD at {b} bits" for b in widths)] + (["KLD dropped"] if drop else []) + \
        [f"#{i + 1}" + (" (chosen)" if r.get("chosen") else "") for i, r in enumerate(cands)]
    rows = []
    for unit, kld in units.items():
        dropped = [f"{kld['drop']:.3g}" if "drop" in kld else "-"] if drop else []
        rows.append([unit, *(f"{kld[b]:.3g}" for b in widths), *dropped] + [r["bits"].get(unit, "?") for r in cands])
    return headers, rows


def pareto_png(doc: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = doc["candidates"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sc = ax.scatter([r["size_mb"] for r in cands], [r["kld_mean"] for r in cands],
                    c=[r["decode_tok_s"] for r in cands], cmap="viridis", s=60, edgecolors="k")
    fig.colorbar(sc, ax=ax, label="decode tok/s")
    for i, r in enumerate(cands):
        ax.annotate(f"#{i + 1}" + (" chosen" if r.get("chosen") else ""), (r["size_mb"], r["kld_mean"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    limit = doc["limits"].get("max_size_mb")
    if limit:
        ax.axvline(limit, color="#a40", ls="--", lw=1, label=f"--max-size-mb {limit:g}")
        ax.legend(fontsize=8)
    ax.set(xlabel="artifact size (MB)", ylabel="mean KLD vs the float model (nats/token)",
           title="candidates: size against measured KLD")
    ax.grid(alpha=0.3)
    return _png(fig)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_tune_report(out: Path, doc: dict) -> Path:
    png = pareto_png(doc) if doc["candidates"] else b""
    if png:
        write_bytes_atomic(out / "pareto.png", png)
    s = doc["settings"]
    headers, rows = unit_rows(doc)
    parts = [f"<h1>edgesmith tune: {html.escape(Path(s['checkpoint']).name)} for {html.escape(s['target'])}</h1>",
             f"<p class='note'>method {s['method']}, group {s['group_size']}, formats {', '.join(s['formats'])}, "
             f"KLD through the {s['formats'][0]} runtime on {s['eval_tokens']} validation tokens of "
             f"{html.escape(s['data'])}; limits: {html.escape(limits_text(doc['limits']))}"
             + (f"; blocks dropped at most {s['drop_layers']}" if s.get("drop_layers") else "")
             + (f", healed {s['heal_steps']} distill steps" if s.get("heal_steps") else "")
             + f"; {doc['seconds']:.0f} s.</p>"]
    if png:
        parts.append(f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts += ["<h2>Candidates</h2>", _table(COLUMNS, candidate_rows(doc)),
              "<h2>Per-unit precision</h2>", _table(headers, rows),
              "<p class='note'>KLD at b bits: the whole model's mean KLD on calibration windows with only that "
              "unit quantized (the search's estimate adds them up)" + ("; KLD dropped: with only that block removed "
              "(prune:method=layers)" if "KLD dropped" in headers else "") + ".</p>"]
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>edgesmith tune</title><style>{CSS}</style>" \
           f"</head><body>{''.join(parts)}</body></html>\n"
    write_text_atomic(out / "report.html", page)
    return out / "report.html"
