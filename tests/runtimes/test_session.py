"""The Session API on every backend: greedy and seeded sampling against the torch reference,
perplexity through the runtime, multi-token calls and rollback, reset, bounds, tampering.

Float (fp32) artifacts of one tiny trained checkpoint; the reference is the checkpoint's torch model
as a full causal forward that touches no cache."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch

import runtimes
from models.checkpoint import load_checkpoint
from models.errors import EdgesmithError
from runtimes import GenerationConfig
from toolchain.evaluate import perplexity as torch_perplexity
from toolchain.export.parity import PARITY_TEXT, torch_threads

BACKENDS = ["torch", "onnx", "onnx-plain", "gguf", "executorch"]
# Perplexity through a float runtime: the runtimes only reorder fp32 sums (parity measures 3-5e-7
# relative in the logits), so the mean log-likelihood agrees to far better than this.
PPL_RTOL = 1e-5


def open_session(name, artifact, checkpoints):
    return runtimes.load(checkpoints["float"] if name == "torch" else artifact(name))


@pytest.fixture(scope="module")
def reference(checkpoints):
    return load_checkpoint(checkpoints["float"]).model.eval()


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", BACKENDS)
def test_greedy_equals_the_torch_reference(name, artifact, checkpoints, reference, prompt):
    # setup
    session = open_session(name, artifact, checkpoints)
    # execute
    with torch_threads(1):
        got = list(session.generate(prompt, GenerationConfig(max_new_tokens=48)))
        expected = greedy_without_cache(reference, prompt, 48)
    # assert
    assert got == expected
    assert session.stats.new_tokens == 48 and session.stats.ttft_s > 0
    assert session.tokenizer is not None and session.tokenizer.fingerprint == load_checkpoint(
        checkpoints["float"], with_model=False).tokenizer.fingerprint


def test_seeded_sampling_is_deterministic_and_the_same_on_every_backend(artifact, checkpoints, prompt):
    # setup
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.2, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7)
    sessions = {name: open_session(name, artifact, checkpoints) for name in BACKENDS}
    # execute
    with torch_threads(1):
        runs = {name: list(s.generate(prompt, cfg)) for name, s in sessions.items()}
        again = list(sessions["gguf"].generate(prompt, cfg))
        other_seed = list(sessions["gguf"].generate(prompt, dataclasses.replace(cfg, seed=8)))
    # assert
    assert all(tokens == runs["torch"] for tokens in runs.values()), runs
    assert again == runs["gguf"] and other_seed != runs["gguf"]
    assert len(set(runs["torch"])) > 5  # really sampled, not a greedy loop


@pytest.mark.parametrize("name", BACKENDS)
def test_perplexity_through_the_runtime_agrees_with_torch(name, artifact, checkpoints, reference, tokenizer):
    # setup: 2 full windows of 128 tokens + one of 5, every token after the first predicted once
    session = open_session(name, artifact, checkpoints)
    ids = ([tokenizer.bos_id] + tokenizer.encode(PARITY_TEXT) * 4)[: 2 * 127 + 5]
    # execute
    with torch_threads(1):
        got = session.perplexity(ids)
        full = session.perplexity(ids[: 2 * 127 + 1])
        expected = torch_perplexity(reference, np.array(ids[: 2 * 127 + 1]), seq_len=127)
    # assert
    assert full == pytest.approx(expected, rel=PPL_RTOL)
    assert got != full and 1.0 < got < 50  # the tail window is scored too; a trained model, low perplexity
    assert session.pos == 0


@pytest.mark.parametrize("name", BACKENDS)
def test_multi_token_calls_and_rewind_equal_one_prefill(name, artifact, checkpoints, prompt):
    # setup
    session = open_session(name, artifact, checkpoints)
    ids = prompt[:12]
    with torch_threads(1):
        whole = session.prefill(ids)
        # execute: 5 + extend 4 + decode 3, then roll back to 7 and extend the rest again
        parts = [session.prefill(ids[:5]), session.extend(ids[5:9])] + [session.decode(t)[None] for t in ids[9:]]
        session.rewind(7)
        redo = session.extend(ids[7:])
    # assert
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(redo, whole[7:], rtol=0, atol=1e-5)
    assert session.pos == 12
    with pytest.raises(EdgesmithError, match="rewind: 13 is outside the cached positions 0..12"):
        session.rewind(13)


@pytest.mark.parametrize("name", BACKENDS)
def test_reset_really_clears_the_cache(name, artifact, checkpoints, prompt):
    # setup: fill 100 positions with other text, then reset
    used, fresh = open_session(name, artifact, checkpoints), open_session(name, artifact, checkpoints)
    with torch_threads(1):
        used.prefill(list(reversed(prompt * 4))[:100])
        used.decode(5)
        used.reset()
        # execute: the same short run on the reset session and on a fresh one
        a = [used.decode(prompt[0])] + [used.decode(t) for t in prompt[1:6]]
        b = [fresh.decode(prompt[0])] + [fresh.decode(t) for t in prompt[1:6]]
        tokens_a = list(used.generate(prompt[:4], GenerationConfig(max_new_tokens=8)))
        tokens_b = list(fresh.generate(prompt[:4], GenerationConfig(max_new_tokens=8)))
    # assert
    np.testing.assert_allclose(np.stack(a), np.stack(b), rtol=0, atol=1e-6)
    assert tokens_a == tokens_b


@pytest.mark.parametrize("name", BACKENDS)
def test_going_past_max_seq_len_is_a_clear_error(name, artifact, checkpoints):
    # setup
    session = open_session(name, artifact, checkpoints)
    assert session.max_seq_len == 128
    with torch_threads(1):
        session.prefill([1] * 120)
        for _ in range(8):
            session.decode(2)
        # execute / assert: the 129th position is refused before the runtime runs
        with pytest.raises(EdgesmithError, match=r"129 tokens exceed max_seq_len 128 of this \w+ session"):
            session.decode(2)
        assert session.pos == 128
        with pytest.raises(EdgesmithError, match=r"prompt \(100 tokens\) \+ max_new_tokens \(29\) exceeds"):
            session.generate([1] * 100, GenerationConfig(max_new_tokens=29))
        with pytest.raises(EdgesmithError, match=r"token id 320 is outside the vocabulary 0..319"):
            session.prefill([1, 320])
        with pytest.raises(EdgesmithError, match="prefill: empty prompt"):
            session.prefill([])


@pytest.mark.parametrize("name, entry", [("gguf", "model.gguf"), ("onnx", "model.onnx"),
                                         ("executorch", "model.pte")])
def test_a_tampered_artifact_is_refused(name, entry, artifact, tmp_path):
    # setup: a copy with one byte of the weights flipped
    copy = tmp_path / name
    shutil.copytree(artifact(name), copy)
    data = bytearray((copy / entry).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / entry).write_bytes(bytes(data))
    # execute / assert
    with pytest.raises(EdgesmithError, match=f"{entry}: sha256 does not match manifest.json"):
        runtimes.load(copy)
