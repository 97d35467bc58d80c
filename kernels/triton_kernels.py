"""Triton implementations of the fused ops, for CUDA tensors (and CPU tensors under
`TRITON_INTERPRET=1`, which is how the tests run them without a GPU).

Same signatures as kernels/reference.py. Every kernel loads its inputs in their dtype and computes in
fp32. Attention uses `tl.dot` with the IEEE fp32 path for fp32 inputs (no TF32), so fp32 results
match the reference to fp32 rounding. Importing this module imports triton: kernels/ops.py does it
lazily, only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cpu import packed_weight  # the packing is device-agnostic torch code

# ----------------------------------------------------------------------------- RMSNorm (+ residual)


@triton.jit
def _rms_norm_kernel(X, R, W, Y, RO, N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(R + row * N + cols, mask=mask, other=0.0)  # in the input dtype, as the reference adds
        tl.store(RO + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * (h * inv).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


def rms_norm(x, residual, weight, eps: float):
    N = x.shape[-1]
    xc = x.contiguous()
    rc = None if residual is None else residual.contiguous()
    y = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    ro = None if rc is None else torch.empty_like(xc)
    _rms_norm_kernel[(xc.numel() // N,)](xc, rc if rc is not None else xc, weight.contiguous(), y,
                                         ro if ro is not None else y, N, eps, HAS_RES=rc is not None,
                                         BLOCK=triton.next_power_of_2(N))
    return y, ro


# ----------------------------------------------------------------------------- RoPE (in place)


@triton.jit
def _rope_kernel(X, COS, SIN, H, T, sb, sh, st, D, HALF, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    base = X + b * sb + h * sh + t * st
    i = tl.arange(0, BLOCK)
    m = i < HALF
    x1 = tl.load(base + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(COS + t * D + i, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(COS + t * D + HALF + i, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * D + i, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + t * D + HALF + i, mask=m, other=0.0).to(tl.float32)
    tl.store(base + i, (x1 * c1 - x2 * s1).to(X.dtype.element_ty), mask=m)
    tl.store(base + HALF + i, (x2 * c2 + x1 * s2).to(X.dtype.element_ty), mask=m)


def rope_(x, cos, sin) -> None:
    B, H, T, D = x.shape
    target = x if x.stride(-1) == 1 else x.contiguous()
    _rope_kernel[(B * H * T,)](target, cos.contiguous(), sin.contiguous(), H, T, *target.stride()[:3], D, D // 2,
                               BLOCK=triton.next_power_of_2(D // 2))
    if target is not x:
        x.copy_(target)


# ----------------------------------------------------------------------------- SwiGLU


@triton.jit
def _swiglu_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=m)


def swiglu(gate, up):
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    BLOCK = 1024
    _swiglu_kernel[(triton.cdiv(g.numel(), BLOCK),)](g, u, y, g.numel(), BLOCK=BLOCK)
    return y


# ----------------------------------------------------------------------------- attention


@triton.jit
def _attend_tile(q, m_i, l_i, acc, K, V, sks, svs, offs_n, offs_d, n_mask, d_mask, visible, scale,
                 PRECISION: tl.constexpr):
    """One tile of the online softmax: q (M, D) against keys offs_n; returns the updated (m, l, acc)."""
    k = tl.load(K + offs_n[:, None] * sks + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (M, N)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet: no NaN
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.load(V + offs_n[:, None] * svs + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _flash_kernel(Q, K, V, O, QPOS, scale, T, S, H, REP, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                  sob, soh, sot, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    hk = h // REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask, d_mask = offs_m < T, offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
    hi = tl.minimum(tl.max(qpos, 0) + 1, S)  # keys past the block's last position are never read
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = offs_n[None, :] <= qpos[:, None]
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, K + b * skb + hk * skh, V + b * svb + hk * svh, sks, svs,
                                     offs_n, offs_d, offs_n < S, d_mask, visible, scale, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attention(q, k, v, q_pos, scale: float):
    B, H, T, D = q.shape
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    BLOCK_M, BLOCK_N = (64, 64) if q.is_cuda else (16, 16)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    qs, ks, vs = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    grid = (triton.cdiv(T, BLOCK_M), B * H)
    _flash_kernel[grid](qs, ks, vs, out, q_pos.to(torch.int64).contiguous(), scale, T, k.shape[2], H,
                        H // k.shape[1], *qs.stride()[:3], *ks.stride()[:3], *vs.stride()[:3], *out.stride()[:3],
                        D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=_precision(q.dtype))
    return out


@triton.jit
def _decode_partial_kernel(Q, K, V, PO, PL, POS, scale, H, Hkv, REP, NSPLIT, SPLIT, skb, skh, sks, svb, svh, svs,
                           D, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr):
    """One (batch, KV head, chunk): the REP query heads of the KV head against the chunk's live keys,
    reading each key once. Writes the chunk's normalised output and log-sum-exp (-inf when empty)."""
    pid_bk, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, hk = pid_bk // Hkv, pid_bk % Hkv
    L = tl.load(POS) + 1  # live keys: positions 0..input_pos
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask, d_mask = offs_h < REP, offs_d < D
    heads = hk * REP + offs_h
    q = tl.load(Q + (b * H + heads[:, None]) * D + offs_d[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k0 = c * SPLIT
    k1 = tl.minimum(L, k0 + SPLIT)
    for start in range(k0, k1, BLOCK_N):  # empty when the chunk lies past the live length
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k1
        visible = n_mask[None, :] & h_mask[:, None]
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, K + b * skb + hk * skh, V + b * svb + hk * svh, sks, svs,
                                     offs_n, offs_d, n_mask, d_mask, visible, scale, PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
    row = (b * H + heads) * NSPLIT + c
    tl.store(PO + row[:, None] * D + offs_d[None, :], out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(PL + row, lse, mask=h_mask)


@triton.jit
def _merge_kernel(PO, PL, O, NSPLIT, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask, d_mask = offs_s < NSPLIT, offs_d < D
    lse = tl.load(PL + bh * NSPLIT + offs_s, mask=s_mask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    o = tl.load(PO + (bh * NSPLIT + offs_s[:, None]) * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                other=0.0)
    tl.store(O + bh * D + offs_d, tl.sum(w[:, None] * o, 0).to(O.dtype.element_ty), mask=d_mask)


def decode_attention(q, k_cache, v_cache, input_pos, scale: float, split: int = 0):
    """Grid over every chunk of the static cache; chunks past the live length (read on the device from
    input_pos, no host sync) exit at once and merge with weight 0."""
    B, H, _, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    split = split or (256 if q.is_cuda else 16)
    nsplit = triton.cdiv(S, split)
    part_o = torch.empty(B, H, nsplit, D, dtype=torch.float32, device=q.device)
    part_l = torch.empty(B, H, nsplit, dtype=torch.float32, device=q.device)
    ks, vs = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    REP = H // Hkv
    BLOCK_D = max(16, triton.next_power_of_2(D))
    _decode_partial_kernel[(B * Hkv, nsplit)](
        q.contiguous(), ks, vs, part_o, part_l, input_pos.reshape(-1)[-1:].to(torch.int64), scale, H, Hkv, REP,
        nsplit, split, *ks.stride()[:3], *vs.stride()[:3], D, BLOCK_H=max(16, triton.next_power_of_2(REP)),
        BLOCK_N=min(64, max(16, triton.next_power_of_2(split))), BLOCK_D=BLOCK_D, PRECISION=_precision(q.dtype))
    out = torch.empty(B, 1, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)  # the ops' layout
    _merge_kernel[(B * H,)](part_o, part_l, out, nsplit, D, BLOCK_S=max(2, triton.next_power_of_2(nsplit)),
                            BLOCK_D=BLOCK_D)
    return out


# ----------------------------------------------------------------------------- weight-only matmul


@triton.jit
def _wo_matmul_kernel(X, W, S, Y, N, K, G, GROUP, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows BLOCK_N of W against one row of x. BLOCK_K counts bytes of W: 4 bits packs two columns per
    byte (code + 8, even column in the low nibble), 8 bits holds one int8 code per byte."""
    pid_n, m = tl.program_id(0), tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    KB = K // 2 if BITS == 4 else K
    acc = tl.zeros([BLOCK_N], tl.float32)
    for kb in range(0, KB, BLOCK_K):
        offs_b = kb + tl.arange(0, BLOCK_K)
        b_mask = offs_b < KB
        mask = n_mask[:, None] & b_mask[None, :]
        w = tl.load(W + offs_n[:, None].to(tl.int64) * KB + offs_b[None, :], mask=mask, other=0)
        if BITS == 4:
            col = 2 * offs_b
            xe = tl.load(X + m * K + col, mask=b_mask, other=0.0).to(tl.float32)
            xo = tl.load(X + m * K + col + 1, mask=b_mask, other=0.0).to(tl.float32)
            lo = (w & 15).to(tl.float32) - 8.0
            hi = (w >> 4).to(tl.float32) - 8.0
            prod = lo * xe[None, :] + hi * xo[None, :]
        else:
            col = offs_b
            prod = w.to(tl.float32) * tl.load(X + m * K + col, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        sc = tl.load(S + offs_n[:, None].to(tl.int64) * G + col[None, :] // GROUP, mask=mask, other=0.0)
        acc += tl.sum(prod * sc.to(tl.float32), axis=1)
    tl.store(Y + m * N + offs_n, acc.to(Y.dtype.element_ty), mask=n_mask)


def weight_only_matmul(x, qweight, scales, bits: int):
    N, K = qweight.shape
    w, s = packed_weight(qweight, scales, bits)
    if bits == 4:
        w = w.view(torch.uint8)
    xf = x.reshape(-1, K).contiguous()
    y = torch.empty(xf.shape[0], N, dtype=x.dtype, device=x.device)
    BLOCK_N, BLOCK_K = (64, 128) if x.is_cuda else (16, 32)
    _wo_matmul_kernel[(triton.cdiv(N, BLOCK_N), xf.shape[0])](xf, w, s, y, N, K, scales.shape[1],
                                                              K // scales.shape[1], BITS=bits, BLOCK_N=BLOCK_N,
                                                              BLOCK_K=BLOCK_K)
    return y.reshape(*x.shape[:-1], N)
