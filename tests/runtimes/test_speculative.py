"""Speculative decoding: greedy output equals plain greedy on torch, ONNX Runtime, llama.cpp and
ExecuTorch targets (drafts on the same or another backend, good and poor), the rollback of both
caches, stop tokens, the sampled acceptance rule's law, and the stats."""

import collections

import pytest
import torch

import runtimes
from models.errors import EdgesmithError
from runtimes import GenerationConfig
from runtimes.sampling import probabilities
from runtimes.speculative import _verify, compare_speculative
from toolchain.export.parity import torch_threads

# (target, draft): "ckpt:<name>" is a checkpoint on the torch backend, anything else an artifact
PAIRS = [
    ("ckpt:float", "ckpt:q4"),
    ("ckpt:float", "ckpt:draft"),
    ("onnx", "gguf-q4"),
    ("onnx-plain", "ckpt:draft"),
    ("gguf", "onnx-q4"),
    ("gguf", "ckpt:draft"),
    ("executorch", "gguf-q4"),
]


def open_session(spec, artifact, checkpoints):
    kind, _, name = spec.partition(":")
    return runtimes.load(checkpoints[name] if kind == "ckpt" else artifact(spec))


@pytest.mark.parametrize("target_spec, draft_spec", PAIRS)
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_speculative_equals_plain_greedy(target_spec, draft_spec, k, artifact, checkpoints, prompt):
    # setup
    target = open_session(target_spec, artifact, checkpoints)
    draft = open_session(draft_spec, artifact, checkpoints)
    cfg = GenerationConfig(max_new_tokens=45)
    # execute
    with torch_threads(1):
        plain = list(target.generate(prompt, cfg))
        spec = list(target.generate(prompt, cfg, draft=draft, draft_tokens=k))
    # assert
    assert spec == plain
    s = target.stats
    assert s.new_tokens == 45 and s.draft_tokens == k and s.proposed > 0
    assert 0 <= s.accepted <= s.proposed and s.target_forwards == s.rounds
    assert target.pos == len(prompt) + 44  # caches rolled back: every emitted token but the last is fed
    if draft_spec.endswith("q4"):  # the same model in 4 bits agrees almost always
        assert s.acceptance_rate > 0.8 and s.tokens_per_target_forward > 1.5 * min(k, 2) / 2
    if draft_spec == "ckpt:draft":  # a barely trained draft: many rejections, so rollback is exercised
        assert s.acceptance_rate < 0.8


def test_speculative_stops_at_a_stop_token_like_plain(artifact, checkpoints, prompt):
    # setup: stop on the 10th greedy token
    target, draft = runtimes.load(checkpoints["float"]), runtimes.load(artifact("gguf-q4"))
    with torch_threads(1):
        tenth = list(target.generate(prompt, GenerationConfig(max_new_tokens=10)))[-1]
        cfg = GenerationConfig(max_new_tokens=40, stop_tokens=(tenth,))
        # execute
        plain = list(target.generate(prompt, cfg))
        spec = list(target.generate(prompt, cfg, draft=draft, draft_tokens=4))
    # assert
    assert spec == plain and spec[-1] == tenth and len(spec) <= 10


def test_seeded_speculative_sampling_is_deterministic(artifact, checkpoints, prompt):
    # setup
    target, draft = runtimes.load(artifact("onnx")), runtimes.load(artifact("gguf-q4"))
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, top_k=50, seed=3)
    # execute
    with torch_threads(1):
        a = list(target.generate(prompt, cfg, draft=draft, draft_tokens=3))
        b = list(target.generate(prompt, cfg, draft=draft, draft_tokens=3))
    # assert
    assert a == b and len(a) == 30 and all(0 <= t < target.vocab_size for t in a)
    assert target.stats.proposed > 0


def test_sampled_acceptance_keeps_the_target_distribution():
    # setup: a 4-token vocabulary where draft and target disagree
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=2)
    target_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    draft_q = probabilities(torch.tensor([0.0, 2.0, 1.0, 0.5]), cfg)
    generator = torch.Generator().manual_seed(0)
    # execute: the first emitted token of many rounds where the draft proposes from q
    counts = collections.Counter()
    n = 8000
    for _ in range(n):
        proposal = int(torch.multinomial(draft_q, 1, generator=generator))
        counts[_verify(target_logits.numpy(), [proposal], [draft_q], cfg, generator, [])[0]] += 1
    # assert: the target's own distribution (4 standard errors)
    p = probabilities(target_logits[0], cfg)
    for token in range(4):
        assert abs(counts[token] / n - float(p[token])) < 4 * (float(p[token]) * (1 - float(p[token])) / n) ** 0.5


def test_compare_reports_acceptance_and_speedup(checkpoints, artifact, prompt):
    # setup
    target, draft = runtimes.load(checkpoints["float"]), runtimes.load(artifact("gguf-q4"))
    # execute
    with torch_threads(1):
        r = compare_speculative(target, draft, prompt, GenerationConfig(max_new_tokens=30), 4)
    # assert
    assert r["identical"] and r["speedup"] > 0 and r["acceptance_rate"] == r["speculative_stats"].acceptance_rate
    assert "acceptance" in r["speculative_stats"].summary()


def test_a_draft_must_share_the_vocabulary(checkpoints, tmp_path, prompt):
    # setup: a draft with another vocabulary size
    from models.checkpoint import save_checkpoint
    from models.llama import ModelConfig, Transformer
    from models.tokenizer import train_tokenizer
    from tests.conftest import TEXT

    other = save_checkpoint(Transformer(ModelConfig(vocab_size=384, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                                    ffn_dim=64, max_seq_len=128)),
                            train_tokenizer([TEXT], vocab_size=384, show_progress=False), tmp_path / "other",
                            lineage={"parent": None, "passes": []})
    target = runtimes.load(checkpoints["float"])
    # execute / assert
    with pytest.raises(EdgesmithError, match="--draft: vocabulary of 384 tokens, the target has 320"):
        target.generate(prompt, GenerationConfig(max_new_tokens=10), draft=runtimes.load(other))
    with pytest.raises(EdgesmithError, match="--draft-tokens: 0 must be an integer >= 1"):
        target.generate(prompt, GenerationConfig(max_new_tokens=10), draft=runtimes.load(checkpoints["q4"]),
                        draft_tokens=0)
