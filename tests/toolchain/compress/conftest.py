"""A nano-width model trained briefly on a small slice of real Python source, shared by the
compression tests (session-scoped: trained once)."""

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from models.llama import ModelConfig, Transformer
from models.tokenizer import Tokenizer, train_tokenizer
from toolchain.compress import calibration_tokens
from toolchain.data import load_corpus, tokenize_corpus
from toolchain.train.trainer import TrainConfig, train

# The nano size (dim 128, 4 layers, 4/2 heads, ffn 384) with a 512-token vocabulary, so it trains in seconds.
NANO_512 = ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=256)


@dataclass
class Trained:
    model: Transformer
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    calib: torch.Tensor
    corpus: Path


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("pycorpus")
    lib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(lib.glob("*.py"))[:60]:
        (root / f"{p.stem}.txt").write_text(p.read_text(encoding="utf-8", errors="replace")[:20000])
    corpus = load_corpus(root)
    tok = train_tokenizer(corpus.texts("train"), vocab_size=NANO_512.vocab_size, show_progress=False)
    tokens = tokenize_corpus(corpus, tok)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(NANO_512)
    model, _ = train(model, tokens.train, None, TrainConfig(steps=80, batch_size=8, seq_len=64, lr=3e-3, warmup=10),
                     progress=False)
    torch.set_num_threads(before)
    calib = calibration_tokens(tokens.train, 16, 128, seed=0)
    return Trained(model.eval(), tok, tokens.train, tokens.val, calib, root)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spin-waiting makes these small matmuls
    tens of times slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
