import numpy as np
import pytest
import torch

import toolchain.data as data
from models.errors import EdgesmithError
from toolchain.data import get_batch, load_corpus, tokenize_corpus


def test_folder_corpus_split_is_deterministic_and_skips_binaries(text_folder):
    a, b = load_corpus(text_folder), load_corpus(text_folder)
    names = lambda c, s: [d.name for d in getattr(c, s)]
    assert names(a, "train") == names(b, "train") and names(a, "val") == names(b, "val")
    assert a.train and a.val
    all_names = set(names(a, "train")) | set(names(a, "val"))
    assert len(all_names) == 20 and "blob.bin" not in all_names and "sub/doc1.txt" in all_names
    assert not set(names(a, "train")) & set(names(a, "val"))


def test_single_file_is_chunked(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    corpus = load_corpus(f)
    assert len(corpus.train) + len(corpus.val) == 10
    assert "".join(d.read() for d in sorted(corpus.train + corpus.val, key=lambda d: d.lines)) == f.read_text()


def test_stdlib_corpus_excludes_tests():
    corpus = load_corpus("stdlib")
    names = [d.name for d in corpus.train + corpus.val]
    assert "json/decoder.py" in names and len(names) > 300
    assert not [n for n in names if "/test/" in f"/{n}" or n.split("/")[-1].startswith("test_")]
    assert 0.02 < len(corpus.val) / len(names) < 0.1


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", r"missing: no such file or directory \(corpus\)"),
    (lambda p: (p / "empty").mkdir() or p / "empty", r"empty: corpus is empty"),
    (lambda p: (p / "blank.txt").write_text("  \n\n") and p / "blank.txt", r"blank.txt: corpus is empty"),
    (lambda p: (p / "x.bin").write_bytes(b"\0" * 10) and p / "x.bin", r"x.bin: not a text file"),
    (lambda p: (p / "one.txt").write_text("tiny\n") and p / "one.txt", r"one.txt: corpus too small to split"),
])
def test_bad_corpus(tmp_path, make, message):
    with pytest.raises(EdgesmithError, match=message):
        load_corpus(make(tmp_path))


def test_token_files_are_cached_and_framed(text_folder, tokenizer, tmp_path, monkeypatch):
    # execute
    corpus = load_corpus(text_folder)
    tokens = tokenize_corpus(corpus, tokenizer, cache=tmp_path)
    # assert: <|bos|> doc <|endoftext|> for every document, in order
    expected = []
    for doc in corpus.train:
        expected += [tokenizer.bos_id, *tokenizer.encode(doc.read()), tokenizer.eos_id]
    assert tokens.train.dtype == np.uint16 and tokens.train.tolist() == expected
    # a second call reuses the files without tokenizing again
    monkeypatch.setattr(data, "_write_tokens", lambda *a: pytest.fail("re-tokenized"))
    again = tokenize_corpus(load_corpus(text_folder), tokenizer, cache=tmp_path)
    assert again.directory == tokens.directory
    # a changed document changes the key
    (text_folder / "doc0.txt").write_text("changed\n")
    monkeypatch.undo()
    assert tokenize_corpus(load_corpus(text_folder), tokenizer, cache=tmp_path).directory != tokens.directory
    assert not [p for p in (tmp_path / "tokens").iterdir() if p.name.startswith(".")]


def test_get_batch_shifts_targets():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y, x + 1)
    with pytest.raises(EdgesmithError, match="fewer than seq_len"):
        get_batch(tokens[:5], 1, 10, torch.Generator())
