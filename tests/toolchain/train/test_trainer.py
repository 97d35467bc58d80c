"""Trainer pieces in one process: the token stream's split among ranks, the schedule, bf16 and
activation checkpointing, metrics and the loss curve."""

import json

import numpy as np
import pytest
import torch

from models.errors import EdgesmithError
from toolchain.train.stream import TokenStream
from toolchain.train.trainer import TrainConfig, train


def test_ranks_read_distinct_slices_that_make_up_the_global_batch():
    # setup
    stream = TokenStream(np.arange(1000, dtype=np.uint16), seq_len=10, seed=3)
    # execute: global batch 8 = 1 rank x 8, or 2 ranks x 2 micro x 2 accumulation steps
    one = stream.micro_batch(40, 0, 0, 1, 8)[0]
    two = [stream.micro_batch(40, a, r, 2, 2)[0] for a in range(2) for r in range(2)]
    # assert
    rows = {tuple(r.tolist()) for part in two for r in part}
    assert len(rows) == 8 and rows == {tuple(r.tolist()) for r in one}
    assert torch.equal(stream.windows(0, 99)[:, 0].sort().values, torch.arange(0, 990, 10))  # one epoch: each once
    y = stream.micro_batch(0, 0, 0, 1, 2)[1]
    assert torch.equal(y[:, :-1], stream.micro_batch(0, 0, 0, 1, 2)[0][:, 1:])


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(100) == pytest.approx(0.1)
    with pytest.raises(EdgesmithError, match="--batch-size: 6 does not divide into 4 process"):
        TrainConfig(batch_size=6).micro_batch(4)


@pytest.mark.parametrize("precision, grad_ckpt", [("fp32", True), ("bf16", False)])
def test_trains_with_bf16_or_activation_checkpointing(tiny_model, tiny_config, tmp_path, precision, grad_ckpt):
    # setup
    tokens = np.tile(np.arange(64, dtype=np.uint16) % 50, 200)  # a repeating pattern: easy to learn
    cfg = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup=3, precision=precision,
                      grad_ckpt=grad_ckpt, eval_every=10)
    # execute
    _, history = train(tiny_model, tokens, tokens, cfg, out=tmp_path, progress=False)
    # assert
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert [r["step"] for r in lines if "val_ppl" in r] == [10, 20, 30]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    # setup
    from models.llama import Transformer
    from toolchain.train.trainer import enable_grad_ckpt_

    torch.manual_seed(0)
    a = Transformer(tiny_config)
    b = Transformer(tiny_config)
    b.load_state_dict(a.state_dict())
    enable_grad_ckpt_(b)
    x = torch.randint(0, 320, (2, 16))
    # execute
    for m in (a, b):
        m(x).float().logsumexp(-1).mean().backward()
    # assert
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
