"""Drop-in: the model with the fused modules (what a checkpoint runs by default) gives the reference model's
greedy tokens, through the torch session and `edgesmith generate [--kernels]`; unfusing restores the model's
own PyTorch exactly."""

import pytest
import torch

import kernels
from models.llama import Transformer
from models.quant import QuantizedLinear, quantize_linear_
from runtimes.sampling import GenerationConfig
import runtimes
from kernels import cpu
from runtimes.backends.torch import TorchSession
from edgesmith.cli import main
from toolchain.export.parity import torch_threads

GREEDY = ("--prompt", "def moving_average(values", "--temperature", "0", "--max-new-tokens", "24")


@pytest.mark.parametrize("source", ["float", "q4"])
def test_fused_session_gives_the_reference_greedy_tokens(checkpoints, source):
    # setup
    prompt = list(range(3, 40, 3))
    sessions = {mode: TorchSession.from_path(checkpoints[source], kernels=mode) for mode in kernels.MODES}
    # execute
    with torch_threads(1):
        tokens = {mode: list(s.generate(prompt, GenerationConfig(max_new_tokens=24, temperature=0.0)))
                  for mode, s in sessions.items()}
        logits = {mode: s.prefill(prompt) for mode, s in sessions.items()}
    # assert
    assert tokens["fused"] == tokens["reference"] and len(tokens["fused"]) == 24
    assert kernels.fused_modules(sessions["reference"].model) == [] and kernels.fused_modules(sessions["fused"].model)
    assert abs(logits["fused"] - logits["reference"]).max() < 1e-4
    quantized = [m for m in sessions["fused"].model.modules() if isinstance(m, QuantizedLinear)]
    assert bool(quantized) == (source == "q4")  # fused keeps the codes for the int4 kernel


def test_generate_cli_kernels_flag(checkpoints, capsys):
    # execute: the default (fused), then each mode asked for
    with torch_threads(1):
        outs = [main(["generate", str(checkpoints["q4"]), *GREEDY, *flag])
                for flag in ((), ("--kernels", "reference"), ("--kernels", "fused"))]
        bad = main(["generate", str(checkpoints["q4"]), *GREEDY, "--kernels", "fast"])
    out, err = capsys.readouterr()
    # assert
    assert outs == [0, 0, 0] and bad == 2
    texts = out.strip().split("\n")
    assert len(texts) == 3 and len(set(texts)) == 1 and texts[0].startswith("def moving_average(values")
    assert err.strip().splitlines()[-1] == "edgesmith: error: --kernels: 'fast'; allowed: reference, fused"


def test_unfuse_restores_the_reference_path(tiny_model):
    # setup
    quantize_linear_(tiny_model, 4, 32, include=lambda n: "mlp" in n)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 13))
    with torch.inference_mode():
        before = tiny_model(tokens)
        # execute
        fused = kernels.fuse_(tiny_model)(tokens)
        assert kernels.fused_modules(tiny_model)
        after = kernels.unfuse_(tiny_model)(tokens)
    # assert: batch 2, no cache: the flash path; afterwards the inline PyTorch again, bit for bit
    assert kernels.fused_modules(tiny_model) == []
    assert torch.equal(before, after)
    torch.testing.assert_close(fused, before, rtol=1e-5, atol=1e-5)


def test_fused_cached_decode_matches_reference(tiny_config):
    # setup: prefill 9 then decode 6, batch 1, GQA (4 heads over 2 KV heads)
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 15))
    out = {}
    for mode in kernels.MODES:
        model.setup_cache(1, 64)
        kernels.fuse_(model, mode)
        with torch.inference_mode():
            steps = [model(tokens[:, :9], torch.arange(9))[:, -1]]
            steps += [model(tokens[:, i:i + 1], torch.tensor([i]))[:, -1] for i in range(9, 15)]
        out[mode] = torch.cat(steps)
    # assert
    torch.testing.assert_close(out["fused"], out["reference"], rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_one_clear_line(tiny_model):
    with pytest.raises(Exception, match=r"^kernels: 'triton'; allowed: reference, fused$"):
        kernels.fuse_(tiny_model, "triton")
    assert kernels.fused_modules(tiny_model) == []


@pytest.mark.parametrize("source", ["float", "q4"])
def test_a_checkpoint_runs_the_fused_kernels_by_default(checkpoints, source):
    # setup
    prompt = list(range(3, 40, 3))
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.0)
    # execute: runtimes.load as generate, eval, bench and the GUI call it, and the exact path asked for
    default = runtimes.load(checkpoints[source])
    exact = runtimes.load(checkpoints[source], kernels="reference")
    with torch_threads(1):
        tokens = [list(s.generate(prompt, cfg)) for s in (default, exact)]
        logits = [s.prefill(prompt) for s in (default, exact)]
    # assert: fused (the codes kept for the int4 kernel), the reference's greedy tokens and logits
    assert default.run_options["kernels"] == "fused" and exact.run_options["kernels"] == "reference"
    assert kernels.fused_modules(default.model) and not kernels.fused_modules(exact.model)
    assert any(isinstance(m, QuantizedLinear) for m in default.model.modules()) == (source == "q4")
    assert tokens[0] == tokens[1] and len(tokens[0]) == 24
    assert abs(logits[0] - logits[1]).max() < 1e-4


def test_without_the_fused_library_the_default_is_the_reference(checkpoints, monkeypatch):
    # setup: a machine where the C++ library cannot be built
    monkeypatch.setattr(cpu, "available", lambda: False)
    # execute
    session = runtimes.load(checkpoints["q4"])
    # assert: the ops would fall back to their slow references, so the model's own PyTorch runs
    assert session.run_options["kernels"] == "reference" and not kernels.fused_modules(session.model)
