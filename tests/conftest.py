"""Shared tiny fixtures: a tokenizer trained on a few KB of text and a model config small enough
that every test runs in milliseconds on a CPU."""

import os

# Triton runs on a CPU only in its interpreter, and reads this when it is first imported (torch's
# inductor may import it on its own): set before anything imports torch (tests/kernels/test_triton.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from models.llama import ModelConfig, Transformer
from models.tokenizer import train_tokenizer

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "Ünïcödé ✓ 漢字 emoji 🚀 and tabs\tand newlines\n"
) * 40


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token and tokenizer caches go to a temporary folder, never the user's ~/.cache."""
    os.environ["EDGESMITH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer([TEXT], vocab_size=320, show_progress=False)


@pytest.fixture(scope="session")
def tiny_config():
    return ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return Transformer(tiny_config).eval()


@pytest.fixture
def text_folder(tmp_path) -> Path:
    """A small corpus folder: 20 text files, one binary file that must be skipped."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(20):
        (root / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(f"# document {i}\n" + TEXT[: 400 + 37 * i])
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)
    return root


# Shared session fixtures (one tiny trained checkpoint and its artifacts), imported last: the module
# imports TEXT from here.
from tests.runtimes.fixtures import artifact, checkpoints, prompt  # noqa: E402,F401
