"""Files and directories written so that a crash, even SIGKILL, never leaves half of one at its final path.

Every writer makes its output under a temporary name beside the final path and renames it into
place (a rename within one directory is atomic). Temporary names say whose they are:
`.<final name>.tmp-<pid>-<random>` for work in progress and `.<final name>.old-<pid>-<random>` for a
replaced or deleted directory on its way out. Before writing a path, a writer sweeps that path's
temporaries whose process is gone (`sweep_stale`), so a killed run's debris is removed by the next
run that writes the same output and a live writer's work is never touched. This module does not
decide what to write or lock anything: one writer per final path at a time is the caller's rule.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def temp_path(final: str | Path, kind: str = "tmp") -> Path:
    """A fresh temporary path beside `final` (`kind` "tmp": being written, "old": being removed)."""
    final = Path(final)
    return final.parent / f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_temps(directory: str | Path, name: str | None = None) -> list[Path]:
    """Temporaries in `directory` (of the final path `name`, or of any) whose writing process is gone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _TEMP.match(p.name)
        if m and (name is None or m["name"] == name) and not pid_alive(int(m["pid"])):
            found.append(p)
    return found


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def sweep_stale(final: str | Path) -> None:
    """Remove the temporaries a dead process left for the final path `final`."""
    final = Path(final)
    for p in stale_temps(final.parent, final.name):
        _remove(p)


def sweep_stale_in(directory: str | Path) -> None:
    """Remove every temporary a dead process left in `directory` (a directory only edgesmith writes)."""
    for p in stale_temps(directory):
        _remove(p)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary name, so readers never see half of it."""
    path = Path(path)
    sweep_stale(path)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def temp_dir_for(out: str | Path) -> Path:
    """A new empty temporary directory beside `out`, to be renamed into place by `replace_dir`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = temp_path(out)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out, then deleted.

    Killed between the two renames, `out` is absent (never half there) and both are debris to sweep."""
    out = Path(out)
    old = None
    if out.exists():
        old = temp_path(out, "old")
        out.rename(old)
    Path(tmp).rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_tree(path: str | Path) -> None:
    """Delete a directory so that it disappears at once: renamed aside first, then removed."""
    path = Path(path)
    if not path.exists():
        return
    old = temp_path(path, "old")
    path.rename(old)
    _remove(old)
