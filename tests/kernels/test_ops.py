"""Parity of the fused CPU kernels and the custom ops with the readable references.

Tolerances (max abs difference after scaling, `torch.testing.assert_close(rtol, atol)`):
- fp32: rtol = atol = 1e-5. The kernels and the references do the same arithmetic in a different
  order (tiled online softmax, FMA contraction, pairwise vs sequential sums); for the sizes here
  (reductions of at most a few hundred terms of magnitude ~1) that reordering moves a result by a
  few hundred fp32 ulps (2^-23 ~ 1.2e-7) at most, well inside 1e-5.
- bf16: the kernels compute in fp32 and round once to bf16 at the end; the truth is the reference
  evaluated in fp32 on the same (bf16-valued) inputs, and the kernel may differ from it by its final
  rounding (half a bf16 ulp, 2^-9 relative) plus the inputs' rounding where the op rounds an
  intermediate to the input dtype as the model does (the residual sum, the normalised value): two
  bf16 ulps, rtol = 2^-7 ~ 7.8e-3, atol = 2^-7 for values below 1.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu, ops, reference
from models.quant import quantize_rtn

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-7, "atol": 2**-7}}
FAST = settings(max_examples=12, deadline=None)
dtypes = st.sampled_from([torch.float32, torch.bfloat16])

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"fused CPU library unavailable: {cpu.unavailable_reason()}")


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def truth(fn, *args):
    """The reference on fp32 copies of the (possibly bf16) inputs."""
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return fn(*up)


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ----------------------------------------------------------------------------- elementwise


@FAST
@given(rows=st.integers(1, 9), dim=st.integers(1, 70), residual=st.booleans(), dtype=dtypes)
def test_rms_norm_matches_reference(rows, dim, residual, dtype):
    # setup
    x, r, w = rand(rows, dim, dtype=dtype), rand(rows, dim, dtype=dtype, seed=1), rand(dim, dtype=dtype, seed=2)
    # execute
    if residual:
        y, h = torch.ops.edgesmith.add_rms_norm(x, r, w, 1e-5)
    else:
        y, h = torch.ops.edgesmith.rms_norm(x, w, 1e-5), None
    # assert
    ry, rh = reference.rms_norm(x, r if residual else None, w, 1e-5)
    close(y, ry if dtype == torch.float32 else ry.float(), dtype)
    if residual:
        assert torch.equal(h, rh)  # the residual sum is rounded to the input dtype, exactly as the model adds


@FAST
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), half=st.integers(1, 20), dtype=dtypes,
       transposed=st.booleans())
def test_rope_in_place_matches_reference(B, H, T, half, dtype, transposed):
    # setup: the model rotates q/k as transposed views of the projection output
    D = 2 * half
    x = rand(B, T, H, D, dtype=dtype).transpose(1, 2) if transposed else rand(B, H, T, D, dtype=dtype)
    cos, sin = rand(T, D, seed=3), rand(T, D, seed=4)
    ref = x.float().clone()
    reference.rope_(ref, cos, sin)
    # execute
    y = x.clone()
    torch.ops.edgesmith.rope_(y, cos, sin)
    # assert
    close(y, ref, dtype)
    close(torch.ops.edgesmith.rope(x, cos, sin), ref, dtype)


@FAST
@given(n=st.integers(1, 300), dtype=dtypes)
def test_swiglu_matches_reference(n, dtype):
    g, u = rand(n, dtype=dtype) * 6, rand(n, dtype=dtype, seed=1)
    close(torch.ops.edgesmith.swiglu(g, u), truth(reference.swiglu, g, u), dtype)


def test_swiglu_exp_holds_at_the_extremes():
    g = torch.tensor([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4])
    close(torch.ops.edgesmith.swiglu(g, torch.ones_like(g)), reference.swiglu(g, torch.ones_like(g)), torch.float32)


# ----------------------------------------------------------------------------- attention

attn_shapes = dict(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 2, 4]),
                   T=st.integers(1, 21), extra=st.integers(0, 9), D=st.sampled_from([2, 8, 14, 32, 64]))


@FAST
@given(**attn_shapes, dtype=dtypes, cached=st.booleans())
def test_flash_attention_matches_reference(B, Hkv, rep, T, extra, D, dtype, cached):
    # setup: no cache (positions 0..T-1 over T keys) or a prefill at `extra` into a longer static cache
    H, S = Hkv * rep, T + extra + (5 if cached else 0)
    q, k, v = rand(B, H, T, D, dtype=dtype), rand(B, Hkv, S, D, dtype=dtype, seed=1), rand(B, Hkv, S, D, dtype=dtype, seed=2)
    pos = torch.arange(extra, extra + T) if cached else None
    if not cached:
        k, v = k[:, :, :T], v[:, :, :T]
    # execute
    y = torch.ops.edgesmith.flash_attention(q, k, v, pos, D**-0.5)
    # assert
    expected = truth(reference.flash_attention, q, k, v, torch.arange(T) if pos is None else pos, D**-0.5)
    close(y, expected, dtype)


@FAST
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), rep=st.sampled_from([1, 3, 4]), L=st.integers(1, 300),
       D=st.sampled_from([4, 16, 64]), split=st.sampled_from([0, 1, 7, 64]), dtype=dtypes)
def test_decode_attention_matches_reference(B, Hkv, rep, L, D, split, dtype):
    # setup: a static cache of 320 positions, L of them live
    H = Hkv * rep
    q = rand(B, H, 1, D, dtype=dtype)
    k, v = rand(B, Hkv, 320, D, dtype=dtype, seed=1), rand(B, Hkv, 320, D, dtype=dtype, seed=2)
    pos = torch.tensor([L - 1])
    # execute
    y = torch.ops.edgesmith.decode_attention(q, k, v, pos, D**-0.5, split)
    # assert
    close(y, truth(reference.decode_attention, q, k, v, pos, D**-0.5), dtype)


def test_decode_attention_reads_only_the_live_keys():
    # setup: everything past the live length is NaN; reading any of it would poison the output
    q, k, v = rand(1, 4, 1, 16), rand(1, 2, 64, 16, seed=1), rand(1, 2, 64, 16, seed=2)
    k[:, :, 10:], v[:, :, 10:] = float("nan"), float("nan")
    # execute
    y = torch.ops.edgesmith.decode_attention(q, k, v, torch.tensor([9]), 0.25, 4)
    # assert
    close(y, reference.flash_attention(q, k[:, :, :10], v[:, :, :10], torch.tensor([9]), 0.25), torch.float32)


def test_merge_reproduces_the_worked_example():
    """Scores [1, 3 | 0, 2] in two tiles, v1..v4 as given: the merge equals one softmax over all four."""
    # setup: scale 1 and keys chosen so that q . k_j is the score; float64, so the 8 given decimals are
    # checked to their last digit
    scores = torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=torch.float64)
    values = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, 1.0]], dtype=torch.float64)
    q, keys = torch.tensor([1.0], dtype=torch.float64), scores.unsqueeze(-1)  # (4, 1): q . k_j = score_j
    # execute
    tiles = [reference.partial_attention(q, keys[i:i + 2], values[i:i + 2], 1.0) for i in (0, 2)]
    merged = reference.merge_partials(torch.stack([o for o, _ in tiles]), torch.stack([lse for _, lse in tiles]))
    # assert
    expected = torch.tensor([0.76573417, 1.55676994], dtype=torch.float64)
    torch.testing.assert_close(merged, expected, rtol=0, atol=5e-9)
    torch.testing.assert_close(torch.softmax(scores, 0) @ values, expected, rtol=0, atol=5e-9)


def test_split_kernel_merges_the_worked_example():
    # setup: the same example through the C++ split-KV kernel, two keys per chunk (D = 2, scale folded
    # into q so that q . k_j = score_j)
    keys = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [2.0, 0.0]]).view(1, 1, 4, 2)
    values = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, 1.0]]).view(1, 1, 4, 2)
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # execute
    y = torch.ops.edgesmith.decode_attention(q, keys, values, torch.tensor([3]), 1.0, 2)
    # assert
    torch.testing.assert_close(y.flatten(), torch.tensor([0.76573417, 1.55676994]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- weight-only matmul


@FAST
@given(M=st.integers(1, 12), N=st.integers(1, 40), groups=st.integers(1, 4), g=st.sampled_from([32, 64, 128]),
       bits=st.sampled_from([4, 8]), dtype=dtypes)
def test_weight_only_matmul_matches_reference(M, N, groups, g, bits, dtype):
    # setup: canonical codes and fp16 scales (models/quant.py), x of M rows (decode M=1, short prefills)
    K = groups * g
    qweight, scales = quantize_rtn(rand(N, K, seed=1), bits, g)
    x = rand(M, K, dtype=dtype)
    # execute
    with ops.override("cpu"):  # the kernel even above CPU_GEMV_MAX_ROWS
        y = torch.ops.edgesmith.weight_only_matmul(x, qweight, scales, bits)
    # assert: outputs are sums of K terms ~1: scale the tolerance with sqrt(K)
    expected = truth(reference.weight_only_matmul, x, qweight, scales, bits)
    tol = {k: v * math.sqrt(K) for k, v in TOL[dtype].items()}
    torch.testing.assert_close(y.float(), expected, **tol)


def test_packed_weight_follows_the_codes():
    # setup
    qweight, scales = quantize_rtn(rand(8, 64), 4, 32)
    x = rand(1, 64)
    before = torch.ops.edgesmith.weight_only_matmul(x, qweight, scales, 4)
    # execute: the canonical codes change in place; the cached packing must not go stale
    qweight.neg_().clamp_(-8, 7)
    after = torch.ops.edgesmith.weight_only_matmul(x, qweight, scales, 4)
    # assert
    close(after, reference.weight_only_matmul(x, qweight, scales, 4), torch.float32)
    assert not torch.allclose(before, after)


# ----------------------------------------------------------------------------- custom-op contracts


def test_ops_pass_opcheck():
    """Schemas, fake (meta) implementations and dispatch are consistent: what torch.compile and
    torch.export rely on."""
    q, k, v = rand(1, 4, 5, 8), rand(1, 2, 7, 8, seed=1), rand(1, 2, 7, 8, seed=2)
    qweight, scales = quantize_rtn(rand(16, 64), 4, 32)
    cases = [
        (torch.ops.edgesmith.rms_norm, (rand(3, 8), rand(8), 1e-5)),
        (torch.ops.edgesmith.add_rms_norm, (rand(3, 8), rand(3, 8), rand(8), 1e-5)),
        (torch.ops.edgesmith.rope_, (rand(1, 2, 3, 8), rand(3, 8), rand(3, 8))),
        (torch.ops.edgesmith.rope, (rand(1, 2, 3, 8), rand(3, 8), rand(3, 8))),
        (torch.ops.edgesmith.swiglu, (rand(3, 8), rand(3, 8))),
        (torch.ops.edgesmith.flash_attention, (q, k, v, torch.arange(2, 7), 0.3)),
        (torch.ops.edgesmith.decode_attention, (q[:, :, :1], k, v, torch.tensor([4]), 0.3, 0)),
        (torch.ops.edgesmith.weight_only_matmul, (rand(1, 64), qweight, scales, 4)),
        (torch.ops.edgesmith.linear, (rand(1, 64), rand(16, 64))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_every_implementation_falls_back_to_the_reference():
    # setup / execute: the reference implementation through the ops
    x, w = rand(2, 8), rand(8)
    with ops.override("reference"):
        y = torch.ops.edgesmith.rms_norm(x, w, 1e-5)
    # assert
    assert torch.equal(y, reference.rms_norm(x, None, w, 1e-5)[0])
    with pytest.raises(Exception, match="allowed: reference, cpu, triton"):
        with ops.override("cuda"):
            pass


@pytest.mark.parametrize("K, g", [(32, 32), (96, 32), (160, 32), (192, 64), (384, 128), (640, 128)])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_kernel_layout_edges(K, g, bits):
    # setup: K not a multiple of 64 (a last half chunk), groups of one, two and four half chunks
    qweight, scales = quantize_rtn(rand(7, K, seed=3), bits, g)
    x = rand(3, K)
    # execute
    with ops.override("cpu"):
        y = torch.ops.edgesmith.weight_only_matmul(x, qweight, scales, bits)
    # assert
    close(y, reference.weight_only_matmul(x, qweight, scales, bits), torch.float32)


def test_pack_lanes_puts_weight_j8_plus_l_in_lane_l():
    # setup: codes that name their own column
    qweight = (torch.arange(64) % 16 - 8).to(torch.int8).repeat(2, 1)
    # execute
    packed = cpu.pack_lanes(qweight, 4).view(torch.int32)  # (2, 8): one 32-byte block, 8 lanes
    # assert: nibble j of lane l holds code(j * 8 + l) + 8
    for lane in range(8):
        for j in range(8):
            assert (int(packed[0, lane]) >> (4 * j)) & 15 == (j * 8 + lane) % 16
    assert torch.equal(cpu.pack_lanes(qweight, 8).view(2, 64)[:, 1], qweight[:, 8])  # byte 1 of lane 0 = weight 8


@FAST
@given(M=st.integers(1, 12), N=st.integers(1, 40), K=st.integers(1, 300))
def test_linear_matches_f_linear(M, N, K):
    # setup: decode rows (the gemv) and, above CPU_GEMV_MAX_ROWS, prefill rows (F.linear)
    x, w = rand(M, K), rand(N, K, seed=1)
    # execute
    y = torch.ops.edgesmith.linear(x, w)
    # assert: sums of K terms ~1: the tolerance scales with sqrt(K)
    tol = {k: v * math.sqrt(K) for k, v in TOL[torch.float32].items()}
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), **tol)
