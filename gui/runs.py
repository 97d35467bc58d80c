"""The Runs tab: browse `runs/`, show what each run holds, its lineage, and its report; run a recipe.

A run is any directory under `<workspace>/runs/`: a recipe run (recipe.toml, checkpoints/,
artifacts/, bench/, report.html, from `edgesmith run`), a training run (summary.json, checkpoint/)
or a compressed checkpoint. The lineage comes from the `edgesmith.json` / `manifest.json` files
(Workspace.lineage); the report is the run's own report.md / report.html (toolchain.report).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from gui import views
from gui.workspace import Workspace, describe_pass
from models.errors import EdgesmithError

MAX_FILES = 60


def run_details(ws: Workspace, run: str) -> tuple[str, str, str, str | None]:
    """(summary markdown, lineage markdown, report markdown, report.html path or None) of a run."""
    try:
        root = ws.resolve(run, "run", must_exist=True)
    except EdgesmithError as e:
        return views.refused(e), "", "", None
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.parts))
    lines = [f"### `{ws.rel(root)}`", ""]
    for name in ("summary.json", "compress_report.json"):
        if (root / name).is_file():
            lines.append(f"- **{name}**: {_summary_of(root / name)}")
    lines.append(f"- {len(files)} files:")
    lines += [f"  - `{p.relative_to(root)}` ({p.stat().st_size / 1e6:.3f} MB)" for p in files[:MAX_FILES]]
    if len(files) > MAX_FILES:
        lines.append(f"  - … {len(files) - MAX_FILES} more")
    report_md = root / "report.md"
    report_html = root / "report.html"
    return ("\n".join(lines), lineage_markdown(ws, root),
            report_md.read_text(errors="replace") if report_md.is_file()
            else "No report in this run (`edgesmith run` writes one).",
            str(report_html) if report_html.is_file() else None)


def _summary_of(path: Path) -> str:
    """The summary line of a run's JSON file, or one line saying why it cannot be read."""
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"a JSON {type(d).__name__}, not an object")
        return _summary(d)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"cannot read `{path}`: {html.escape(str(e).splitlines()[0] if str(e) else type(e).__name__)}"


def _summary(d: dict) -> str:
    keys = ("checkpoint", "steps", "final_loss", "val_perplexity", "tokens_per_s", "seconds")
    parts = [f"{k} {d[k]:.4g}" if isinstance(d[k], float) else f"{k} {d[k]}" for k in keys if d.get(k) is not None]
    q = d.get("quality")
    if q:
        parts.append(f"perplexity {q.get('perplexity', 0):.3f} (reference {q.get('reference_perplexity', 0):.3f}), "
                     f"KL {q.get('kl', 0):.3g}")
    return ", ".join(parts) or "-"


def lineage_markdown(ws: Workspace, root: Path) -> str:
    """Every checkpoint and artifact in the run with its chain back to the first ancestor."""
    items = [Path(ws.resolve(p)) for p in ws.checkpoints() + ws.artifacts()]
    items = sorted({p for p in items if p == root or root in p.parents})
    if not items:
        return "No checkpoint or artifact in this run."
    out = []
    for item in items:
        chain = ws.lineage(item)
        out.append(f"**`{ws.rel(item)}`**")
        for depth, link in enumerate(chain):
            arrow = "" if depth == 0 else "← "
            out.append(f"{'  ' * depth}- {arrow}`{html.escape(link['path'])}` — {html.escape(link['what'])}")
        passes = chain[0]["passes"] if chain else []
        if passes:
            out.append("  - passes: " + " → ".join(html.escape(describe_pass(p)) for p in passes))
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- recipes


def recipes() -> list[tuple[str, str]]:
    from toolchain.recipe import list_recipes

    return list_recipes()


def recipe_command(ws: Workspace, recipe: str, out: str, overrides: str) -> tuple[list[str], str]:
    """The `edgesmith run` command line for a bundled recipe (by name) or a .toml in the workspace."""
    recipe = (recipe or "").strip()
    names = {n for n, _ in recipes()}
    if recipe not in names:
        recipe = str(ws.resolve(recipe, "recipe", must_exist=True))
    name = Path(recipe).stem if recipe.endswith(".toml") else recipe
    out_p = ws.resolve(out or f"runs/{name}", "run directory")
    argv = ["run", recipe, "--out", str(out_p)]
    for line in (overrides or "").splitlines():
        if line.strip():
            argv += ["--set", line.strip()]
    return argv, ws.rel(out_p)
