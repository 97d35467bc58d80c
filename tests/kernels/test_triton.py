"""The Triton kernels against the references, on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 is set in tests/conftest.py before anything imports torch (triton reads it once,
at its first import). The interpreter is slow, so the shapes are tiny, odd where it matters (masks
and tails), and there is one test per kernel. fp32 only (tolerances as tests/kernels/test_ops.py:
rtol = atol = 1e-5); on a GPU the same kernels also take bf16/fp16.
"""

import os

import pytest
import torch

from kernels import ops, reference
from models.quant import quantize_rtn

if ops.triton_module() is None:
    pytest.skip(f"Triton kernels not tested: {ops.triton_unavailable_reason()}", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels not tested: no CUDA device and TRITON_INTERPRET=1 was not set before triton was "
                "imported", allow_module_level=True)

TOL = {"rtol": 1e-5, "atol": 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.fixture(autouse=True)
def triton_only():
    with ops.override("triton"):
        yield


def test_rms_norm_with_residual():
    x, r, w = rand(3, 40), rand(3, 40, seed=1), rand(40, seed=2)
    y, h = torch.ops.edgesmith.add_rms_norm(x, r, w, 1e-5)
    ry, rh = reference.rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(y, ry, **TOL)
    torch.testing.assert_close(h, rh, rtol=0, atol=0)


def test_rope_in_place_on_a_transposed_view():
    x = rand(1, 5, 3, 12).transpose(1, 2)  # (B, H, T, D) view, as the model's q
    cos, sin = rand(5, 12, seed=1), rand(5, 12, seed=2)
    expected = x.clone()
    reference.rope_(expected, cos, sin)
    torch.ops.edgesmith.rope_(x, cos, sin)
    torch.testing.assert_close(x, expected, **TOL)


def test_swiglu():
    g, u = rand(1030) * 5, rand(1030, seed=1)  # past one 1024 block
    torch.testing.assert_close(torch.ops.edgesmith.swiglu(g, u), reference.swiglu(g, u), **TOL)


def test_flash_attention_gqa_causal_prefill_into_a_cache():
    q, k, v = rand(1, 4, 19, 16), rand(1, 2, 27, 16, seed=1), rand(1, 2, 27, 16, seed=2)
    pos = torch.arange(3, 22, device=DEVICE)
    y = torch.ops.edgesmith.flash_attention(q, k, v, pos, 0.25)
    torch.testing.assert_close(y, reference.flash_attention(q, k, v, pos, 0.25), **TOL)


def test_decode_attention_split_and_merged():
    q, k, v = rand(1, 6, 1, 16), rand(1, 2, 40, 16, seed=1), rand(1, 2, 40, 16, seed=2)
    k[:, :, 21:] = float("nan")  # past the live length: never read
    pos = torch.tensor([20], device=DEVICE)
    y = torch.ops.edgesmith.decode_attention(q, k, v, pos, 0.25, 8)  # chunks of 8: 3 live, 2 empty
    torch.testing.assert_close(y, reference.decode_attention(q, k[:, :, :21], v[:, :, :21], pos, 0.25), **TOL)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_matmul(bits):
    qweight, scales = quantize_rtn(rand(20, 64, seed=1).cpu(), bits, 32)
    qweight, scales = qweight.to(DEVICE), scales.to(DEVICE)
    x = rand(1, 64)
    y = torch.ops.edgesmith.weight_only_matmul(x, qweight, scales, bits)
    torch.testing.assert_close(y, reference.weight_only_matmul(x, qweight, scales, bits), **TOL)
