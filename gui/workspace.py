"""The GUI's workspace: the one directory it reads and writes, and what lives in it.

`Workspace.resolve` turns a path typed in the browser into an absolute path and refuses anything
outside the workspace, whether reached by an absolute path, by `..` or through a symlink (the path
is resolved, symlinks followed, before the check). Listings (checkpoints, artifacts, runs) walk the
workspace without following symlinks. `lineage` follows the parent links that `edgesmith.json` and
`manifest.json` record, staying inside the workspace. It does not start or read jobs (toolchain.jobs).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from models.checkpoint import resolve_lineage
from models.errors import EdgesmithError

SKIP_DIRS = {"jobs", ".gradio", "__pycache__", ".git"}
MAX_DEPTH = 6
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class Workspace:
    def __init__(self, root: str | Path):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    # ------------------------------------------------------------------------- paths

    def resolve(self, path: str | Path, what: str = "path", must_exist: bool = False) -> Path:
        """`path` (relative to the workspace, or absolute) as an absolute path inside the workspace."""
        text = str(path).strip() if path is not None else ""
        if not text:
            raise EdgesmithError(f"{what}: empty (give a path inside the workspace {self.root})")
        if "\0" in text or text.startswith("~"):
            raise EdgesmithError(f"{what}: {text!r} is outside the workspace {self.root} (refused)")
        p = Path(text)
        real = (p if p.is_absolute() else self.root / p).resolve()
        if real != self.root and self.root not in real.parents:
            raise EdgesmithError(f"{what}: {text} is outside the workspace {self.root} (refused)")
        if must_exist and not real.exists():
            raise EdgesmithError(f"{what}: {text}: no such file or directory in the workspace")
        return real

    def rel(self, path: str | Path) -> str:
        """How the GUI shows a path: relative to the workspace when inside it."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.root)) or "."
        except ValueError:
            return str(p)

    def upload(self, src: str | Path, folder: str = "data") -> Path:
        """Copy an uploaded file (Gradio's temporary copy) into `<workspace>/<folder>/`, name sanitized."""
        src = Path(src)
        name = SAFE_NAME.sub("_", src.name).lstrip(".") or "upload"
        dest = self.resolve(Path(folder) / name, "upload")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
        os.replace(tmp, dest)
        return dest

    # ------------------------------------------------------------------------- listings

    def _walk(self, marker: str) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            depth = len(Path(dirpath).relative_to(self.root).parts)
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                                 and depth < MAX_DEPTH)
            if marker in filenames:
                found.append(self.rel(dirpath))
        return sorted(found)

    def checkpoints(self) -> list[str]:
        """Directories holding `edgesmith.json` (our checkpoints), relative to the workspace."""
        return self._walk("edgesmith.json")

    def artifacts(self) -> list[str]:
        """Exported artifact directories (`manifest.json`), relative to the workspace."""
        return self._walk("manifest.json")

    def recipes(self) -> list[str]:
        """Recipe files the GUI wrote (recipes/*.toml), relative to the workspace."""
        folder = self.root / "recipes"
        return [self.rel(p) for p in sorted(folder.glob("*.toml")) if p.is_file()] if folder.is_dir() else []

    def runs(self) -> list[str]:
        """The directories directly under `runs/`, newest first."""
        runs = self.root / "runs"
        if not runs.is_dir():
            return []
        dirs = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
        return [self.rel(p) for p in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)]

    # ------------------------------------------------------------------------- lineage

    def lineage(self, path: str | Path) -> list[dict]:
        """The chain from an artifact or checkpoint back to its first ancestor, one dict per link:
        {"path", "kind" ("artifact" | "checkpoint" | "outside"), "what" (one line), "passes"}."""
        chain, seen = [], set()
        current: Path | None = self.resolve(path, "lineage", must_exist=True)
        while current is not None and current not in seen and len(chain) < 32:
            seen.add(current)
            manifest, meta = _json(current / "manifest.json"), _json(current / "edgesmith.json")
            if manifest is not None:
                lin = manifest.get("lineage") or {}
                chain.append({"path": self.rel(current), "kind": "artifact",
                              "what": f"{manifest.get('format')} artifact, {manifest.get('precision')}",
                              "passes": lin.get("passes", [])})
                nxt = lin.get("checkpoint")
            elif meta is not None:
                lin = meta.get("lineage") or {}
                passes = lin.get("passes", [])
                chain.append({"path": self.rel(current), "kind": "checkpoint",
                              "what": describe_pass(passes[-1]) if passes else "checkpoint", "passes": passes})
                nxt = lin.get("parent")
            else:
                break
            current_dir, current = current, None
            if nxt:
                try:
                    current = self.resolve(resolve_lineage(current_dir, nxt), "lineage parent", must_exist=True)
                except EdgesmithError:
                    chain.append({"path": str(nxt), "kind": "outside", "what": "outside the workspace (not read)",
                                  "passes": []})
        return chain


def describe_pass(step: dict) -> str:
    """One line for a lineage step: 'train nano (5 steps)', 'quantize rtn 4-bit g32', ..."""
    kind, cfg = step.get("kind", "?"), step.get("config") or {}
    if kind == "train":
        return f"train {step.get('model', '')} ({cfg.get('steps', '?')} steps, {step.get('world_size', 1)} rank(s))"
    if kind == "quantize":
        bits = f" {cfg['bits']}-bit" if "bits" in cfg else ""
        group = f" g{cfg['group_size']}" if "group_size" in cfg else ""
        return f"quantize {cfg.get('method', step.get('method', ''))}{bits}{group}".rstrip()
    details = ", ".join(f"{k}={v}" for k, v in cfg.items() if not isinstance(v, (list, dict)))
    return f"{kind} ({details})" if details else kind


def _json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or unreadable (not JSON, not UTF-8, not an object)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
