"""Reading the files a checkpoint or an artifact names without leaving its directory or reading without bound.

Artifacts travel (a colleague, a download, a device we pulled them back from), so every path one
names — manifest `files`, the entry, ONNX external data, the tokenizer, adapter and shard files — is
checked here before any byte of it is read: a plain relative path (no absolute path, no `..`, no NUL or
backslash) that resolves inside the directory (a symlink may point within it, never out of it) to a
regular file (no device, FIFO, socket or directory: reading `/dev/zero` or a FIFO never ends). Reads
and hashes are bounded by the size the file has (and, where a manifest records one, by that size), so
no reader can hang or allocate more than the file holds. This module does not parse formats:
models.headers and runtimes.headers check the counts inside GGUF, safetensors, ONNX and .pte headers.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath

from models.errors import EdgesmithError

JSON_LIMIT = 64 << 20  # a config, manifest or tokenizer config; tokenizer.json is read with its own limit
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_entry(entry: object, holder: str | Path, what: str = "entry") -> str:
    """`entry` as a plain relative POSIX path, or one line naming `holder` (the file that names it) and the entry."""
    if not isinstance(entry, str) or not entry:
        raise EdgesmithError(f"{holder}: {what} {entry!r} must be a non-empty relative path")
    if "\x00" in entry or "\\" in entry:
        raise EdgesmithError(f"{holder}: {what} {entry!r} has a NUL or backslash (not a plain relative path)")
    p = PurePosixPath(entry)
    if p.is_absolute() or entry.startswith("~"):
        raise EdgesmithError(f"{holder}: {what} {entry!r} is an absolute path (must be relative to its directory)")
    if ".." in p.parts:
        raise EdgesmithError(f"{holder}: {what} {entry!r} goes up with '..' (must stay inside its directory)")
    return entry


def confined(directory: str | Path, entry: object, holder: str | Path | None = None, what: str = "entry") -> Path:
    """The regular file `entry` names inside `directory`; refuse, before reading any byte, an entry that is not a
    plain relative path, resolves outside the directory (through a symlink too), is missing, or is not a regular
    file. `holder` is the file that names the entry (default: the directory), for the message."""
    directory = Path(directory)
    holder = holder or directory
    entry = check_entry(entry, holder, what)
    path = directory / entry
    try:
        root = directory.resolve(strict=True)
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise EdgesmithError(f"{path}: missing ({what} named by {holder})") from None
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise EdgesmithError(f"{path}: cannot be resolved ({what} named by {holder}: {getattr(e, 'strerror', None) or e})") from None
    if real != root and root not in real.parents:
        raise EdgesmithError(f"{path}: {what} {entry!r} named by {holder} leaves its directory (resolves to {real})")
    mode = os.stat(real).st_mode
    if not stat.S_ISREG(mode):
        raise EdgesmithError(f"{path}: {what} {entry!r} named by {holder} is {kind_of(mode)}, not a regular file")
    return path


def regular_file(path: str | Path) -> int:
    """The size of `path`, refusing a missing path or anything that is not a regular file (a FIFO would block)."""
    path = Path(path)
    try:
        mode, size = (st := os.stat(path)).st_mode, st.st_size
    except FileNotFoundError:
        raise EdgesmithError(f"{path}: missing") from None
    except OSError as e:
        raise EdgesmithError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise EdgesmithError(f"{path}: {kind_of(mode)}, not a regular file")
    return size


def open_regular(path: str | Path):
    """A binary file object for `path`, checked to be a regular file on the open descriptor (no race with a swap
    to a FIFO between the check and the open: O_NONBLOCK keeps the open itself from blocking)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise EdgesmithError(f"{path}: missing") from None
    except OSError as e:
        raise EdgesmithError(f"{path}: cannot be read ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise EdgesmithError(f"{path}: {kind_of(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise EdgesmithError(f"{path}: {size} bytes, more than the {limit} this file may have")
        data = f.read(min(size, limit) + 1)
    if len(data) > min(size, limit):  # grew while we read it
        raise EdgesmithError(f"{path}: grew while it was read (more than its {size} bytes)")
    return data


def read_json(path: str | Path, limit: int = JSON_LIMIT) -> dict:
    """A JSON object from a regular file of at most `limit` bytes; one line naming the file otherwise."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise EdgesmithError(f"{path}: missing")
    raw = read_bytes(path, limit)
    try:
        d = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgesmithError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise EdgesmithError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise EdgesmithError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    """sha256 of a regular file, reading at most `limit` bytes (default: the size it has when opened) plus one:
    a file that keeps growing (or never ends) is refused instead of hashed forever."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        bound = os.fstat(f.fileno()).st_size if limit is None else limit
        left = bound + 1
        while left > 0 and (chunk := f.read(min(1 << 20, left))):
            h.update(chunk)
            left -= len(chunk)
    if left <= 0:
        raise EdgesmithError(f"{path}: more than the {bound} bytes recorded for it (still growing?)")
    return h.hexdigest()
