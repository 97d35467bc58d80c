"""The report of a recipe run: report.html (self-contained, no network), report.md and a console summary.

Reads what the pipeline left in the run directory -- run.json, each pass's compress_report.json,
each artifact's manifest.json, the bench results (or the planner's prediction) -- and renders the
same tables three ways: lineage; per pass size, perplexity and KL; per-layer SQNR (a heatmap);
export parity; bench with roofline fractions; plots of size against perplexity and of tok/s per
format. Plots are matplotlib PNGs, embedded in the HTML as base64 and saved under report/ for the
Markdown. It computes no figure itself; a prediction is labelled as such, never as a measurement.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from models.atomic import write_bytes_atomic, write_text_atomic
from models.checkpoint import read_json
from models.errors import EdgesmithError
from models.registry import METHODS, PASSES
from runtimes.options import describe
from toolchain.compress import QUANTIZE


# ----------------------------------------------------------------------------- collecting


def collect(run_dir: str | Path) -> dict:
    """Everything the report shows, as plain data."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    steps = run["steps"]
    ckpts = [s for s in steps if s["stage"] in ("source", "compress")]
    rows = _pass_rows(run_dir, steps)
    sqnr = {}
    for s in ckpts:
        rep = run_dir / s["path"] / "compress_report.json"
        if rep.is_file():
            layers = read_json(rep).get("layer_sqnr_db") or {}
            if layers:
                sqnr[s["name"]] = layers
    exports = []
    for s in (s for s in steps if s["stage"] == "export"):
        m = read_json(run_dir / s["path"] / "manifest.json")
        exports.append({"format": m["format"], "precision": m["precision"], "path": s["path"],
                        "bytes": sum(f["bytes"] for f in m["files"].values()), "export_s": m.get("export_s"),
                        "parity": m.get("parity", {}), "quantization": (m.get("quantization") or {}).get("stored_as")})
    bench = None
    for s in (s for s in steps if s["stage"] == "bench"):
        data = json.loads((run_dir / s["path"]).read_text())
        bench = {"measured": True, "results": data} if isinstance(data, list) else data
    final = run_dir / ckpts[-1]["path"] if ckpts else Path(run["source"]["checkpoint"])
    lineage = (read_json(final / "edgesmith.json").get("lineage") or {}) if (final / "edgesmith.json").is_file() else {}
    return {"run": run, "rows": rows, "sqnr": sqnr, "exports": exports, "bench": bench, "lineage": lineage}


def _pass_rows(run_dir: Path, steps: list[dict]) -> list[dict]:
    rows = []
    passes = [s for s in steps if s["stage"] == "compress"]
    train = next((s for s in steps if s["stage"] == "source"), None)
    first = passes[0]["info"]["before"] if passes else None
    rows.append({"step": train["name"] if train else "source", "what": "source",
                 "params": first and first["params"], "size_mb": first and first["size_mb"],
                 "perplexity": first["perplexity"] if first else (train or {}).get("info", {}).get("val_perplexity"),
                 "kl": None, "kld_p99": None, "top1": None, "seconds": train.get("made_s") if train else None})
    for s in passes:
        i = s["info"]
        rows.append({"step": s["name"], "what": f"{i['kind']} {_changed(i['kind'], i['config'])}",
                     "params": i["after"]["params"],
                     "size_mb": i["after"]["size_mb"], "perplexity": i["after"]["perplexity"],
                     "kl": i["quality"].get("kl"), "kld_p99": i["quality"].get("kld_p99"),
                     "top1": i["quality"].get("top1"), "seconds": s.get("made_s")})
    return rows


def _changed(kind: str, config: dict) -> str:
    """A pass's settings that differ from its config class's defaults (method first), as k=v."""
    import dataclasses

    try:
        cls = METHODS.get(config["method"]).config if kind == QUANTIZE else PASSES.get(kind).config
    except (EdgesmithError, KeyError):
        cls = None
    defaults = {f.name: f.default for f in dataclasses.fields(cls)} if cls else {}
    same = lambda k, v: v == defaults[k] or (isinstance(v, list) and v == list(defaults[k] or ()))  # noqa: E731
    shown = [f"{k}={v}" for k, v in config.items() if k == "method" or (k in defaults and not same(k, v))]
    return ", ".join(shown)


# ----------------------------------------------------------------------------- tables


def _f(v, fmt="{:.3f}") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def tables(data: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, headers, rows, note) for every table, in report order."""
    run = data["run"]
    out = []
    steps = [[s["stage"], s["name"], s["key"][:12], "cached" if s["cached"] else f"{s['seconds']:.1f} s"]
             for s in run["steps"]]
    stage_s = ", ".join(f"{k} {v:.0f} s" for k, v in run["stage_seconds"].items() if v)
    out.append(("Lineage", ["stage", "step", "key", "this run"], steps,
                f"source: {_source_text(run)}; passes recorded in the final checkpoint: "
                + " → ".join(p.get("kind", "?") + (f" {p['config'].get('method', '')}" if p.get("config") else "")
                             for p in data["lineage"].get("passes", []))
                + f". Work per stage: {stage_s or 'none (all cached)'}."))
    out.append(("Passes: size, perplexity, KLD", ["step", "what", "params", "size MB", "perplexity", "mean KLD",
                                                  "99% KLD", "same top p", "seconds"],
                [[r["step"], r["what"], _f(r["params"], "{:,}"), _f(r["size_mb"]), _f(r["perplexity"]),
                  _f(r["kl"], "{:.3g}"), _f(r.get("kld_p99"), "{:.3g}"),
                  _f(None if r["top1"] is None else 100 * r["top1"], "{:.2f} %"), _f(r["seconds"], "{:.1f}")]
                 for r in data["rows"]],
                "size: deployed weight bytes (fp16 floats, b/8 per code + fp16 group scales); perplexity on the "
                "validation split; KLD (KL divergence per token, nats) and same top p (both pick the same top token) "
                "against the pass's input model, as llama-perplexity --kl-divergence reports them."))
    parity = []
    for e in data["exports"]:
        p = e["parity"]
        weights = ", ".join(sorted({v.split(":")[0] for v in (e["quantization"] or {}).values()})) or "float"
        if "skipped" in p:
            parity.append([e["format"], e["precision"], weights, _f(e["bytes"] / 1e6), _f(e["export_s"], "{:.1f}"),
                           "—", "—", "—", f"skipped: {p['skipped']}"])
        else:
            parity.append([e["format"], e["precision"], weights, _f(e["bytes"] / 1e6), _f(e["export_s"], "{:.1f}"),
                           _f(p.get("max_abs_logit_diff"), "{:.3g}"), _f(p.get("argmax_agreement")),
                           f"{p.get('greedy_matched')}/{p.get('greedy_steps')}",
                           f"{'passed' if p.get('passed') else 'FAILED'} ({p.get('runtime')}"
                           + (f", {describe(p['runtime_options'])})" if p.get("runtime_options") else ")")])
    skipped = "; ".join(f"{s['format']}: {s['reason']}" for s in run.get("skipped", []))
    out.append(_sqnr_table(data["sqnr"]))
    out.append(("Export parity", ["format", "floats", "quantized weights", "MB", "export s", "max |Δlogit|",
                                  "argmax agree", "greedy",
                                  "parity"], parity,
                "each artifact run in its own runtime, in the runtime options it records for every user path, against "
                "the torch model of the same checkpoint"
                + (f". Not exported: {skipped}" if skipped else "")))
    out.append(_bench_table(data["bench"], run))
    return out


def _sqnr_table(sqnr: dict) -> tuple:
    names = list(sqnr)
    layers = list(dict.fromkeys(n for v in sqnr.values() for n in v))
    rows = [[layer.replace("model.", "")] + [_f(sqnr[p].get(layer), "{:.1f}") if layer in sqnr[p] else "—"
                                             for p in names] for layer in layers]
    return ("Per-layer SQNR (dB)", ["layer", *names], rows,
            "output SQNR of each layer against the pass's input model on calibration tokens (inf: exact); "
            "passes that change the layer structure (structured pruning) are compared by their outputs only")


def _source_text(run: dict) -> str:
    train = next((s for s in run["steps"] if s["stage"] == "source"), None)
    if train is None:
        return f"checkpoint {run['source'].get('checkpoint')}"
    i = train["info"]
    return (f"trained here ({i.get('steps')} steps, {i.get('world_size')} process(es), final loss "
            f"{_f(i.get('final_loss'), '{:.3f}')}, {_f(i.get('tokens_per_s'), '{:,.0f}')} tokens/s)")


def _stat(r: dict, key: str, fmt: str) -> str:
    s = r.get(key) or {}
    if s.get("median") is None:
        return "—"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}–{fmt.format(s['max'])}]"


def _bench_table(bench: dict | None, run: dict):
    device = run["target"]["device"]
    if bench is None:
        return (f"Bench on {device}", ["—"], [], "not run (target.bench = false, or nothing exported)")
    if not bench.get("measured"):
        p = bench["plan"]
        rows = [[k, _f(v, "{:,.4g}") if isinstance(v, float) else _f(v)] for k, v in p.items()]
        return (f"Bench on {device}: NOT MEASURED — planner prediction", ["quantity", "predicted"], rows,
                f"not measured: {bench['reason']}")
    rows = [[r.get("format"), r.get("precision"), _options(r), _f((r.get("bytes") or 0) / 1e6),
             _stat(r, "prefill_tok_s", "{:,.0f}"),
             _stat(r, "decode_tok_s", "{:,.1f}"), _stat(r, "ttft_ms", "{:.1f}"), _stat(r, "peak_rss_mb", "{:.0f}"),
             _f(r.get("decode_bound_tok_s"), "{:,.0f}"), _f(r.get("roofline_fraction"), "{:.3f}")]
            for r in bench["results"]]
    r0 = bench["results"][0] if bench["results"] else {}
    return (f"Bench on {device} (measured)", ["format", "precision", "runtime options", "MB", "prefill tok/s",
                                              "decode tok/s", "TTFT ms", "peak RSS MB", "decode bound tok/s",
                                              "roofline fraction"], rows,
            f"median [min–max] of {r0.get('repeat')} repeats, prompt {r0.get('prompt_len')} tokens, "
            f"{r0.get('gen_len')} generated; runtime options = what each row ran with (the artifact's manifest "
            "runtime_options unless overridden); roofline fraction = measured decode tok/s ÷ the memory-bandwidth bound")


def _options(r: dict) -> str:
    """What a bench row ran with; results written before runtime options were recorded say so."""
    return describe(r["run_options"]) if r.get("run_options") is not None else "not recorded"


# ----------------------------------------------------------------------------- plots


def plots(data: dict) -> dict[str, bytes]:
    """name -> PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    pts = [r for r in data["rows"] if r["size_mb"] is not None and r["perplexity"] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["size_mb"] for r in pts], [r["perplexity"] for r in pts], "o-")
        for r in pts:
            ax.annotate(r["step"], (r["size_mb"], r["perplexity"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set(xlabel="deployed size (MB)", ylabel="validation perplexity", title="size against perplexity")
        ax.grid(alpha=0.3)
        out["size_perplexity"] = _png(fig)
    if data["sqnr"]:
        out["sqnr"] = _heatmap(plt, data["sqnr"])
    b = data["bench"]
    if b and b.get("measured") and b["results"]:
        res = b["results"]
        labels = [f"{r.get('format')}\n{r.get('precision')}" for r in res]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, key in zip(axes, ("prefill_tok_s", "decode_tok_s")):
            ax.bar(range(len(res)), [(r.get(key) or {}).get("median") or 0 for r in res], color="#4a7ab5")
            ax.set_xticks(range(len(res)), labels, fontsize=8)
            ax.set(title=key.replace("_tok_s", "") + " tok/s (median)")
            ax.grid(axis="y", alpha=0.3)
        out["tok_s"] = _png(fig)
    return out


def _heatmap(plt, sqnr: dict) -> bytes:
    """Layers (rows) x passes (columns), colour = SQNR dB; exact layers drawn at the top of the scale."""
    import numpy as np

    passes = list(sqnr)
    layers = list(dict.fromkeys(n for v in sqnr.values() for n in v))
    finite = [v for p in passes for v in sqnr[p].values() if v is not None and math.isfinite(v)]
    top = max(finite, default=60.0) + 5
    cell = lambda p, n: sqnr[p].get(n, math.nan)  # noqa: E731
    vals = np.array([[top if cell(p, n) is None or cell(p, n) == math.inf else cell(p, n) for p in passes]
                     for n in layers], dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 1.6 * len(passes), 0.3 * len(layers) + 1.4))
    im = ax.imshow(np.ma.masked_invalid(vals), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), [n.replace("model.", "") for n in layers], fontsize=7)
    ax.set_xticks(range(len(passes)), passes, fontsize=8)
    for y, n in enumerate(layers):
        for x, p in enumerate(passes):
            v = cell(p, n)
            text = "exact" if v is None or v == math.inf else ("" if math.isnan(v) else f"{v:.1f}")
            ax.text(x, y, text, ha="center", va="center", color="white", fontsize=7)
    fig.colorbar(im, ax=ax, label="output SQNR (dB)")
    ax.set_title("per-layer SQNR against each pass's input", fontsize=9)
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------- rendering


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def console_summary(run_dir: str | Path) -> str:
    data = collect(run_dir)
    run = data["run"]
    work = "work done" if run["did_work"] else "nothing to do: all cached"
    per_stage = ", ".join(f"{k} {v:.0f} s" for k, v in run["stage_seconds"].items())
    parts = [f"run {run['recipe']} -> {run['run_dir']}  ({work}, {run['wall_s']:.0f} s; per stage: {per_stage})"]
    for title, headers, rows, note in tables(data)[1:]:
        parts += ["", title, text_table(headers, rows) if rows else "(none)", note]
    parts += ["", f"report: {Path(run_dir) / 'report.html'}"]
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write report.html and report.md (and report/*.png for the Markdown); returns the HTML path."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise EdgesmithError(f"{run_dir}: no run.json (not a run directory of `edgesmith run`)")
    data = collect(run_dir)
    tabs, pngs = tables(data), plots(data)
    (run_dir / "report").mkdir(exist_ok=True)
    for name, png in pngs.items():
        write_bytes_atomic(run_dir / "report" / f"{name}.png", png)
    write_text_atomic(run_dir / "report.md", _markdown(data, tabs, pngs))
    write_text_atomic(run_dir / "report.html", _html(data, tabs, pngs))
    return run_dir / "report.html"


SECTION_PLOTS = {"Passes: size, perplexity, KL": ("size_perplexity",), "Per-layer SQNR": ("sqnr",),
                 "Bench": ("tok_s",)}


def _plots_after(title: str, pngs: dict) -> list[str]:
    prefixes = next((v for k, v in SECTION_PLOTS.items() if title.startswith(k)), ())
    return [n for n in pngs if any(n.startswith(p) for p in prefixes)]


def _markdown(data: dict, tabs, pngs) -> str:
    run = data["run"]
    lines = [f"# edgesmith run: {run['recipe']}", "", f"Recipe `{run['origin']}`, run directory `{run['run_dir']}`, "
             f"target `{run['target']['device']}`, wall time {run['wall_s']:.0f} s.", ""]
    for title, headers, rows, note in tabs:
        lines += [f"## {title}", ""]
        if rows:
            lines += ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]
        lines += ["", note, ""]
        lines += [f"![{n}](report/{n}.png)" for n in _plots_after(title, pngs)] + [""]
    return "\n".join(lines)


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
       "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#eee}"
       ".note{color:#555;font-size:13px}h2{border-bottom:1px solid #ddd}img{max-width:100%}.warn{color:#a40}")


def _html(data: dict, tabs, pngs) -> str:
    run = data["run"]
    e = html.escape
    body = [f"<h1>edgesmith run: {e(run['recipe'])}</h1>",
            f"<p>Recipe <code>{e(run['origin'])}</code>, run directory <code>{e(run['run_dir'])}</code>, target "
            f"<code>{e(run['target']['device'])}</code>, wall time {run['wall_s']:.0f} s.</p>"]
    for title, headers, rows, note in tabs:
        cls = ' class="warn"' if "NOT MEASURED" in title else ""
        body.append(f"<h2{cls}>{e(title)}</h2>")
        if rows:
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in rows)
                        + "</table>")
        body.append(f'<p class="note">{e(note)}</p>')
        for n in _plots_after(title, pngs):
            body.append(f'<img alt="{e(n)}" src="data:image/png;base64,{base64.b64encode(pngs[n]).decode()}">')
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>edgesmith run {e(run['recipe'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
