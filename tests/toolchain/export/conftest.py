"""A tiny checkpoint trained for a few seconds, shared by the export tests.

Trained rather than random: a random model's logits are nearly flat, so near-ties would make
greedy parity a coin toss instead of a test of the exporter.
"""

import numpy as np
import pytest
import torch

from models.checkpoint import save_checkpoint
from models.llama import Transformer
from tests.conftest import TEXT
from toolchain.export.parity import PARITY_TEXT, torch_threads


def fit(model: Transformer, tokens: np.ndarray, steps: int = 40, batch: int = 4, seq: int = 32) -> None:
    """A few AdamW steps on random windows: enough to make the logits peaked (kept local so the
    export tests do not depend on the trainer's API)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.from_numpy(tokens.astype(np.int64))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def float_checkpoint(tmp_path_factory, tokenizer, tiny_config):
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    tokens = np.array(tokenizer.encode(TEXT + PARITY_TEXT * 20), dtype=np.uint16)
    with torch_threads(1):  # a tiny model on a shared 2-core machine: one thread is faster
        fit(model, tokens)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(model, tokenizer, path, lineage={"parent": None, "passes": [{"kind": "train"}]})
