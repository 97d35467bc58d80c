"""The Runs tab: browse `runs/`, show what each run holds, its lineage, and its report; run a recipe.

A run is any directory under `<workspace>/runs/`: a recipe run (recipe.toml, checkpoints/,
artifacts/, bench/, report.html, from `edgesmith run`), a training run (summary.json, checkpoint/)
or a compressed checkpoint. The lineage comes from the `edgesmith.json` / `manifest.json` files
(Workspace.lineage). The report is the run's own report.html (toolchain.report), shown as it is in a
sandboxed frame (no script runs, nothing leaks into the page's styles) with every image it refers
to inlined as a data: URI, so nothing it shows is fetched from the server (and nothing can 404).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from gui import views
from gui.workspace import Workspace, describe_pass
from models.errors import EdgesmithError
from toolchain.recipe import list_recipes, load_recipe

MAX_FILES = 60
REPORT_HEIGHT_PX = 820
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
               ".gif": "image/gif", ".webp": "image/webp"}
IMG_SRC = re.compile(r"""(<img\b[^>]*?\bsrc=)(["'])(.*?)\2""", re.I | re.S)


def run_details(ws: Workspace, run: str) -> tuple[str, str, str, str | None]:
    """(summary markdown, lineage markdown, report frame HTML, report.html path or None) of a run."""
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
    report_html = root / "report.html"
    return ("\n".join(lines), lineage_markdown(ws, root), report_frame(root),
            str(report_html) if report_html.is_file() else None)


def report_frame(root: Path) -> str:
    """The run's report.html in a sandboxed iframe (srcdoc), its images inlined; or one line saying why not."""
    path = root / "report.html"
    if not path.is_file():
        return '<p class="es-no-report">No report in this run (a recipe run writes report.html).</p>'
    try:
        doc = inline_images(path.read_text(errors="replace"), root)
    except OSError as e:
        return f"<p>cannot read {html.escape(str(path))}: {html.escape(e.strerror or str(e))}</p>"
    return (f'<iframe class="es-report" title="report.html" sandbox="" srcdoc="{html.escape(doc, quote=True)}" '
            f'style="width:100%;height:{REPORT_HEIGHT_PX}px;border:1px solid #ddd;border-radius:6px;'
            f'background:white"></iframe>')


def inline_images(doc: str, root: Path) -> str:
    """Every <img src> of an HTML document that names a file inside `root` becomes a data: URI; one that
    names anything else (outside the run, missing, not an image) loses its src and shows its alt text."""
    root = root.resolve()

    def one(m: re.Match) -> str:
        src = html.unescape(m.group(3))
        if src.startswith("data:"):
            return m.group(0)
        p = (root / src).resolve()
        kind = IMAGE_TYPES.get(p.suffix.lower())
        if kind is None or root not in p.parents or not p.is_file():
            return f'{m.group(1)}""'
        return f'{m.group(1)}"data:{kind};base64,{base64.b64encode(p.read_bytes()).decode()}"'

    return IMG_SRC.sub(one, doc)


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
    return list_recipes()


def recipe_command(ws: Workspace, recipe: str, out: str, overrides: str) -> tuple[list[str], str]:
    """The `edgesmith run` command line for a bundled recipe (by name) or a .toml in the workspace, after
    the recipe with its overrides is validated (one line naming the key)."""
    recipe = (recipe or "").strip()
    names = {n for n, _ in recipes()}
    if recipe not in names:
        recipe = ws.rel(ws.resolve(recipe, "recipe", must_exist=True))
    sets = [line.strip() for line in (overrides or "").splitlines() if line.strip()]
    load_recipe(recipe if recipe in names else ws.root / recipe, sets)
    name = Path(recipe).stem if recipe.endswith(".toml") else recipe
    out_p = ws.resolve(out or f"runs/{name}", "run directory")
    argv = ["run", recipe if recipe in names else str(ws.root / recipe), "--out", str(out_p)]
    for line in sets:
        argv += ["--set", line]
    return argv, ws.rel(out_p)


def recipe_names(ws: Workspace) -> list[str]:
    """Bundled recipes by name, then the recipe files in the workspace (the tabs write recipes/)."""
    return [n for n, _ in recipes()] + ws.recipes()


def start_recipe(act, recipe: str, out: str, overrides: str, job_id: str = "") -> tuple[str, str]:
    """Start `edgesmith run` on a recipe as a job of `act` (gui.actions.Actions); returns (job id, status)."""
    try:
        argv, rel = recipe_command(act.ws, recipe, out, overrides)
    except EdgesmithError as e:
        return "", views.refused(e)  # no job: the poll leaves this line shown
    job = act.jobs.start("run", [argv], title=f"recipe {recipe} → {rel}", outputs={"out": rel},
                         result_file=f"{rel}/run.json")
    return job.id, views.job_markdown(job)
