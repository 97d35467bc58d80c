"""Corpora and token files.

A corpus is the embedded default (`stdlib`: the running interpreter's own `.py` sources, test
suites excluded) or any text file or folder of text files. It is split into train and validation
*by document* with a deterministic hash of the document's name, so the split is the same on every
machine. Each split is tokenized once into a flat memory-mapped token file (`<|bos|>` doc
`<|endoftext|>` ...), cached under a hash of (corpus content, tokenizer). This module does not
train tokenizers or models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.atomic import temp_dir_for
from models.errors import EdgesmithError
from models.tokenizer import Tokenizer

VAL_FRACTION = 0.05
LINES_PER_CHUNK = 100  # a single-file corpus is split into documents of this many lines
_TOKEN_FORMAT = 1
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str  # stable across machines: the path relative to the corpus root (plus a chunk index)
    path: Path
    lines: tuple[int, int] | None = None  # [start, end) for a chunk of a single-file corpus

    def read(self) -> str:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        if self.lines is not None:
            text = "".join(text.splitlines(keepends=True)[self.lines[0]:self.lines[1]])
        return text


@dataclass(frozen=True)
class Corpus:
    name: str
    train: tuple[Document, ...]
    val: tuple[Document, ...]

    def texts(self, split: str) -> Iterator[str]:
        for doc in getattr(self, split):
            yield doc.read()

    def fingerprint(self) -> str:
        """sha256 over every document's split, name and content."""
        h = hashlib.sha256()
        for split in ("train", "val"):
            for doc in getattr(self, split):
                h.update(f"{split}\0{doc.name}\0".encode())
                h.update(doc.read().encode())
        return h.hexdigest()


def _is_val(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32 < VAL_FRACTION


def split_documents(docs: list[Document], source: str) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """Split by hash of name; with two or more documents, each side gets at least one."""
    if len(docs) < 2:
        raise EdgesmithError(f"{source}: corpus too small to split into train and validation "
                             f"({len(docs)} document)")
    val = [d for d in docs if _is_val(d.name)]
    train = [d for d in docs if not _is_val(d.name)]
    by_hash = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    if not val:
        val, train = [by_hash[0]], [d for d in docs if d is not by_hash[0]]
    elif not train:
        train, val = [by_hash[-1]], [d for d in docs if d is not by_hash[-1]]
    return tuple(train), tuple(val)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> list[Document]:
    root = stdlib_root()
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("test"))
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith("test_"):
                p = Path(dirpath) / f
                docs.append(Document(p.relative_to(root).as_posix(), p))
    return docs


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def _folder_documents(root: Path) -> list[Document]:
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not f.startswith(".") and p.is_file() and p.stat().st_size > 0 and _is_text(p):
                docs.append(Document(p.relative_to(root).as_posix(), p))
    return docs


def _file_documents(path: Path) -> list[Document]:
    n_lines = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [Document(f"{path.name}#{i // LINES_PER_CHUNK}", path, (i, i + LINES_PER_CHUNK))
            for i in range(0, n_lines, LINES_PER_CHUNK)]


def load_corpus(spec: str | Path) -> Corpus:
    """`stdlib`, a text file, or a folder of text files -> a Corpus split into train/val."""
    if str(spec) == "stdlib":
        docs, name = _stdlib_documents(), "stdlib"
    else:
        path = Path(spec)
        if not path.exists():
            raise EdgesmithError(f"{path}: no such file or directory (corpus)")
        if path.is_dir():
            docs = _folder_documents(path)
        elif not _is_text(path):
            raise EdgesmithError(f"{path}: not a text file (corpus)")
        else:
            docs = _file_documents(path)
        name = str(path.resolve())
    if not docs or not any(d.read().strip() for d in docs):
        raise EdgesmithError(f"{spec}: corpus is empty (no non-empty text files)")
    train, val = split_documents(docs, str(spec))
    return Corpus(name, train, val)


# ----------------------------------------------------------------------------- token files


def cache_root() -> Path:
    return Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith"))


@dataclass(frozen=True)
class TokenData:
    train: np.ndarray  # memory-mapped, flat
    val: np.ndarray
    directory: Path


def _write_tokens(docs: tuple[Document, ...], tokenizer: Tokenizer, path: Path, desc: str) -> int:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    total_bytes = sum(d.path.stat().st_size for d in docs) if all(d.lines is None for d in docs) else None
    n = 0
    with open(path, "wb") as f, tqdm(total=total_bytes or len(docs), unit="B" if total_bytes else "doc",
                                     unit_scale=True, desc=desc, leave=False) as bar:
        for i in range(0, len(docs), 64):
            batch = docs[i:i + 64]
            texts = [d.read() for d in batch]
            for ids in tokenizer.encode_batch(texts):
                arr = np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype)
                f.write(arr.tobytes())
                n += len(arr)
            bar.update(sum(len(t.encode()) for t in texts) if total_bytes else len(batch))
    return n


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache: Path | None = None) -> TokenData:
    """Token files of both splits, made once per (corpus content, tokenizer) and then reused."""
    key = hashlib.sha256(f"{_TOKEN_FORMAT}\0{corpus.fingerprint()}\0{tokenizer.fingerprint}".encode()).hexdigest()
    out = (cache or cache_root()) / "tokens" / key[:24]
    if not (out / "meta.json").is_file():
        tmp = temp_dir_for(out)  # and sweeps what a killed run left half-tokenized
        try:
            counts = {split: _write_tokens(getattr(corpus, split), tokenizer, tmp / f"{split}.bin",
                                           f"tokenize {split}") for split in ("train", "val")}
            dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
            meta = {"format": _TOKEN_FORMAT, "corpus": corpus.name, "dtype": dtype, "tokens": counts,
                    "tokenizer": tokenizer.fingerprint}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                tmp.rename(out)
            except OSError:  # another process made it first: theirs is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    meta = json.loads((out / "meta.json").read_text())
    arrays = {s: np.memmap(out / f"{s}.bin", dtype=meta["dtype"], mode="r") for s in ("train", "val")}
    return TokenData(arrays["train"], arrays["val"], out)


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows: inputs `(B, T)` and next-token targets `(B, T)`."""
    if len(tokens) <= seq_len + 1:
        raise EdgesmithError(f"token file has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator).tolist()
    window = np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts])
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]
