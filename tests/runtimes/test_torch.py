"""The torch backend's compiled decode step gives what eager gives."""

import pytest

import runtimes
from runtimes import GenerationConfig
from toolchain.export.parity import torch_threads


@pytest.mark.slow  # inductor compiles the decode step with a C++ toolchain: about 20-30 s on two shared cores
def test_compiled_decode_equals_eager(checkpoints, prompt):
    # setup
    eager = runtimes.load(checkpoints["float"])
    compiled = runtimes.load(checkpoints["float"], compile=True)
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=20, seed=5)
    # execute
    with torch_threads(1):
        expected = list(eager.generate(prompt, cfg))
        got = list(compiled.generate(prompt, cfg))
        again = list(compiled.generate(prompt, cfg))  # reuses the compiled step
    # assert
    assert compiled.compiled and got == expected == again
