"""The shape of the code, read from the source with `ast` (nothing is imported): which package may
import which, no import cycles, no function-level imports of our own packages, no code file over
500 lines, and the bench agent zipapp holding everything the agent imports.

Dependencies flow one way (DESIGN.md): edgesmith -> gui -> toolchain, runtimes, devices -> kernels,
models. Imports by string (`importlib.import_module`, the registry's entries, the CLI's `commands`
modules) are not seen here: they are how the layers above are reached without an import edge.
It deliberately checks only our own packages' imports, not third-party ones.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from devices.pack import DEVICE_MODULES, PACKAGES as AGENT_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgesmith", "gui", "toolchain", "runtimes", "devices", "kernels", "models")
# What each package may import besides itself. Nothing imports edgesmith (its __main__ is its own).
MAY_IMPORT = {
    "edgesmith": {"gui", "toolchain", "runtimes", "devices", "kernels", "models"},
    "gui": {"toolchain", "runtimes", "devices", "kernels", "models"},
    "toolchain": {"runtimes", "devices", "kernels", "models"},
    "devices": {"runtimes", "kernels", "models"},
    "runtimes": {"kernels", "models"},
    "kernels": {"models"},
    "models": set(),
}
CODE_DIRS = (*PACKAGES, "scripts", "tests")
MAX_LINES = 500

# Function-level imports of our own packages that stay, (importing module, imported module) -> why.
# Only an optional heavy dependency justifies one. An entry whose import is gone fails the test too.
ALLOWED_LOCAL_IMPORTS: dict[tuple[str, str], str] = {
    ("kernels.ops", "kernels.triton_kernels"): "imports triton, an optional heavy dependency, only for CUDA tensors",
    ("gui.commands", "gui.server"): "gradio takes seconds to import and only `edgesmith gui` needs it",
    # pending: issue 18's GUI work moves this to module level; drop the entry when its import is gone
    ("gui.server", "gui.app"): "pending removal (issue 18, gui agent)",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module of ours, dotted
    line: int
    local: bool  # inside a function body (runs when called, not at import)
    typing_only: bool = False  # under `if TYPE_CHECKING:` (never runs: annotations only)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = package_files()


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def target_of(name: str) -> str:
    """The module file `name` lands in: itself when it is a module of ours, else its closest parent."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: Path, module: str | None = None) -> list[Import]:
    """The imports of ours in the file at `path` (the module `module`, by default named by its path)."""
    module = module or module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, local: bool, typing_only: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), inner, True)
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = resolve(module, path, child)
                # `from pkg import sub` imports the module pkg.sub where there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            else:
                visit(child, inner, typing_only)
                continue
            for name in dict.fromkeys(names):
                if ours(name):
                    found.append(Import(module, target_of(name) or name, child.lineno, local, typing_only))

    visit(tree, False)
    return found


def all_imports() -> list[Import]:
    return [imp for path in MODULES.values() for imp in imports_of(path)]


def script_imports() -> list[Import]:
    return [imp for path in sorted((ROOT / "scripts").glob("*.py")) for imp in imports_of(path, f"scripts.{path.stem}")]


def layer_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        src, dst = imp.module.split(".")[0], imp.target.split(".")[0]
        if src != dst and dst not in MAY_IMPORT[src]:
            bad.append(f"{imp.module}:{imp.line} imports {imp.target} ({src} may import only "
                       f"{', '.join(sorted(MAY_IMPORT[src])) or 'nothing of ours'})")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components (Tarjan) of the module-level import graph with more than one
    module, or a module importing itself. Imports for annotations only (`if TYPE_CHECKING:`) never run."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in imports:
        if not imp.local and not imp.typing_only and imp.target in graph:
            graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def local_imports(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if imp.local]


def long_files(root: Path = ROOT) -> list[str]:
    out = []
    for d in CODE_DIRS:
        for path in sorted((root / d).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                out.append(f"{path.relative_to(root)}: {n} lines")
    return out


def agent_closure(imports: list[Import]) -> dict[str, str]:
    """Every module of ours the bench agent can import (at module level or in a function) -> who imports it."""
    graph: dict[str, list[str]] = {}
    for imp in imports:
        graph.setdefault(imp.module, []).append(imp.target)
    seen = {"devices.agent": "__main__"}
    todo = ["devices.agent"]
    while todo:
        m = todo.pop()
        for t in graph.get(m, []):
            if t not in seen:
                seen[t] = m
                todo.append(t)
    return seen


# ---- the tests -------------------------------------------------------------------------------------

IMPORTS = all_imports()


def test_the_graph_is_read():
    # guards the checks below against passing on an empty graph (a wrong ROOT, a parser that sees nothing)
    assert len(MODULES) > 100
    assert any((imp.module, imp.target, imp.local) == ("runtimes", "runtimes.loader", False) for imp in IMPORTS)
    assert any(imp.module == "toolchain.pipeline" and imp.target.startswith("models") for imp in IMPORTS)


def test_packages_import_only_the_layers_below():
    assert layer_violations(IMPORTS) == []


def test_no_import_cycles():
    assert cycles(IMPORTS) == []


def test_no_function_level_imports_of_our_packages():
    found = local_imports(IMPORTS + script_imports())  # the packages and the scripts
    used = {(imp.module, imp.target) for imp in found}
    unexpected = [f"{imp.module}:{imp.line} imports {imp.target} inside a function"
                  for imp in found if (imp.module, imp.target) not in ALLOWED_LOCAL_IMPORTS]
    assert unexpected == []
    stale = [key for key in ALLOWED_LOCAL_IMPORTS if key not in used]
    assert stale == [], "allow-list entries whose import is gone: remove them"
    assert all(len(reason.split()) >= 3 for reason in ALLOWED_LOCAL_IMPORTS.values())


def test_no_code_file_over_500_lines():
    assert long_files() == []


def test_the_agent_zipapp_holds_all_the_agent_imports():
    shipped_devices = {f"devices.{Path(n).stem}" if n != "__init__.py" else "devices" for n in DEVICE_MODULES}
    missing = {m: by for m, by in agent_closure(IMPORTS).items()
               if m.split(".")[0] not in AGENT_PACKAGES and m not in shipped_devices}
    assert missing == {}, "imported by the agent (module: importer) but not packed by devices/pack.py"


# ---- the checks catch what they are for ------------------------------------------------------------

@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
    """`make(name=source, ...)`: the imports of modules of ours holding those sources (MODULES gains them)."""
    def make(**sources: str) -> list[Import]:
        paths = {}
        for name, source in sources.items():
            name = name.replace("__", ".")
            paths[name] = tmp_path / (name.replace(".", "/") + ".py")
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            paths[name].write_text(source)
            monkeypatch.setitem(MODULES, name, paths[name])
        return [imp for name, path in paths.items() for imp in imports_of(path, name)]
    return make


def test_a_violation_of_each_kind_is_caught(fake_modules):
    assert layer_violations(fake_modules(runtimes__leak="from toolchain.pipeline import run\n")) != []
    assert layer_violations(fake_modules(models__leak="import kernels.ops\n")) != []
    assert layer_violations(fake_modules(gui__leak="from edgesmith import cli\n")) != []
    assert layer_violations(fake_modules(devices__leak="def f():\n    import toolchain.recipe\n")) != []

    cycle = fake_modules(models__cycle_a="from models import cycle_b\n", models__cycle_b="import models.cycle_a\n")
    assert cycles(cycle) == [["models.cycle_a", "models.cycle_b"]]
    # a function-level import makes no import-time cycle (the test of function-level imports has it)
    lazy = fake_modules(models__cycle_a="from models import cycle_b\n",
                        models__cycle_b="def f():\n    import models.cycle_a\n")
    assert cycles(lazy) == []
    typing_b = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import models.cycle_a\n"
    typing = fake_modules(models__cycle_a="from models import cycle_b\n", models__cycle_b=typing_b)
    assert cycles(typing) == [] and [i.typing_only for i in typing] == [False, True]

    lazy = fake_modules(toolchain__lazy="def f():\n    from models.llama import SIZES\n    return SIZES\n")
    assert [(i.target, i.line) for i in local_imports(lazy)] == [("models.llama", 2)]
    relative = fake_modules(toolchain__rel="from .pipeline import run\nfrom ..models import llama\n")
    assert {i.target for i in relative} == {"toolchain.pipeline", "models.llama"}
    assert local_imports(relative) == []


def test_a_long_file_is_caught(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "scripts" / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert long_files(tmp_path) == [f"scripts/long.py: {MAX_LINES + 1} lines"]
