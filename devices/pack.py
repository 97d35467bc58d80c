"""The self-contained bench agent shipped to a device: one zipapp (stdlib `zipapp`).

It holds the Python sources of `runtimes`, `models` and `kernels` (what `runtimes.load` imports),
`devices/agent.py` and `devices/measure.py`, and a `__main__.py` that calls the agent; the
device's own Python supplies torch, numpy and the format runtimes (llama_cpp, onnxruntime,
executorch). Nothing from `toolchain` goes in: a device has runtimes, not the trainer.
"""

from __future__ import annotations

import shutil
import tempfile
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtimes", "models", "kernels")
DEVICE_MODULES = ("__init__.py", "agent.py", "measure.py")
MAIN = "import sys\nfrom devices.agent import main\nsys.exit(main())\n"


def build_agent(out: Path) -> Path:
    """Write the agent zipapp to `out` (atomically) and return it."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="edgesmith-agent-") as tmp:
        src = Path(tmp) / "src"
        for package in PACKAGES:
            if (ROOT / package / "__init__.py").is_file():
                shutil.copytree(ROOT / package, src / package, ignore=_only_python)
        (src / "devices").mkdir(parents=True)
        for name in DEVICE_MODULES:
            shutil.copy2(ROOT / "devices" / name, src / "devices" / name)
        (src / "__main__.py").write_text(MAIN)
        partial = out.with_name(out.name + ".partial")
        zipapp.create_archive(src, partial, compressed=True)
        partial.replace(out)
    return out


def _only_python(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or ((Path(directory) / n).is_file() and not n.endswith(".py"))]
