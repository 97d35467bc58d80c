// Fused CPU kernels of edgesmith (fp32), called through ctypes by kernels/cpu.py.
//
// Plain C ABI on raw pointers: no torch headers, so the library builds in a couple of seconds with
// the system compiler and does not depend on the torch ABI. Loops are written so that GCC/Clang
// auto-vectorize them (-O3, plus -march=x86-64-v3 when the CPU has AVX2/FMA/F16C, checked at run
// time by kernels/cpu.py). Threads: OpenMP, `nt` threads (the caller passes torch's thread count,
// 1 for small work so no parallel region is opened).
//
// Layouts (all row-major, innermost dim contiguous; other dims by the strides passed in elements):
//   attention q/out (B, H, T, D), k/v (B, Hkv, S, D); the GQA head of query head h is h / (H / Hkv).
//   weight-only matmul: codes in 32-bit lanes (see "weight-only matmul" below), scales fp32 (N, K/g).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <limits>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

// exp(x) for float, written so that it vectorizes (libm's expf does not without -ffast-math):
// x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes expf coefficients), 2^n by
// building the exponent bits. Relative error about 2e-7; x is clamped to [-87, 88].
static inline float exp_approx(float x) {
    x = std::min(88.0f, std::max(-87.0f, x));  // keeps 2^n a normal float
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);  // floor vectorizes; nearbyint does not
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

extern "C" {

int es_abi_version() { return 6; }

// out = w * rmsnorm(x + res); res_out = x + res (res, res_out may be null: plain RMSNorm)
void es_rms_norm(const float* x, const float* res, const float* w, float* out, float* res_out,
                 int64_t rows, int64_t dim, float eps, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * dim;
        float* o = out + r * dim;
        const float* h = xr;
        if (res) {
            float* ro = res_out + r * dim;
            const float* rr = res + r * dim;
            for (int64_t i = 0; i < dim; ++i) ro[i] = xr[i] + rr[i];
            h = ro;
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; ++i) ss += h[i] * h[i];
        const float inv = 1.0f / std::sqrt(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (h[i] * inv);
    }
}

// x (B, H, T, D) strided, rotated in place by cos/sin rows (T, D) (HF rotate-half layout)
void es_rope_inplace(float* x, const float* cs, const float* sn, int64_t B, int64_t H, int64_t T, int64_t D,
                     int64_t sb, int64_t sh, int64_t st, int nt) {
    const int64_t half = D / 2;
#pragma omp parallel for collapse(2) num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t t = 0; t < T; ++t) {
                float* p = x + b * sb + h * sh + t * st;
                const float* c = cs + t * D;
                const float* s = sn + t * D;
                for (int64_t i = 0; i < half; ++i) {
                    const float x1 = p[i], x2 = p[i + half];
                    p[i] = x1 * c[i] - x2 * s[i];
                    p[i + half] = x2 * c[i + half] + x1 * s[i + half];
                }
            }
}

// out = silu(g) * u over n elements
void es_swiglu(const float* g, const float* u, float* out, int64_t n, int nt) {
#pragma omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + exp_approx(-g[i])) * u[i];
}

// ---------------------------------------------------------------------------- attention

// One query row against keys [k0, k1) with an online softmax, in tiles of TILE keys. Updates the
// running max m, denominator l and the unnormalised accumulator acc (D).
static const int TILE = 64;

static inline void attend_rows(const float* q, const float* k, const float* v, int64_t sk, int64_t sv,
                               int64_t k0, int64_t k1, int64_t D, float scale, float& m, float& l, float* acc) {
    float s[TILE];
    for (int64_t j0 = k0; j0 < k1; j0 += TILE) {
        const int64_t n = std::min<int64_t>(TILE, k1 - j0);
        float tile_max = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
            const float* kr = k + (j0 + j) * sk;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += q[d] * kr[d];
            s[j] = dot * scale;
            tile_max = std::max(tile_max, s[j]);
        }
        const float m_new = std::max(m, tile_max);
        const float corr = std::exp(m - m_new);  // exp(-inf) = 0 on the first tile
        l *= corr;
        for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
        float tile_sum = 0.f;
#pragma omp simd reduction(+ : tile_sum)
        for (int64_t j = 0; j < n; ++j) {  // exp_approx vectorizes; libm's expf would be a call per key
            s[j] = exp_approx(s[j] - m_new);
            tile_sum += s[j];
        }
        l += tile_sum;
        for (int64_t j = 0; j < n; ++j) {
            const float p = s[j];
            const float* vr = v + (j0 + j) * sv;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) acc[d] += p * vr[d];
        }
        m = m_new;
    }
}

// Causal flash attention forward. Query row t sees keys j <= qpos[t]. q/out strides (b, h, t),
// k/v strides (b, h, s).
void es_flash_attention(const float* q, const float* k, const float* v, float* out, const int64_t* qpos,
                        int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D, float scale,
                        int64_t qb, int64_t qh, int64_t qt, int64_t kb, int64_t kh, int64_t ks,
                        int64_t vb, int64_t vh, int64_t vs, int64_t ob, int64_t oh, int64_t ot, int nt) {
    const int64_t rep = H / Hkv;
#pragma omp parallel for collapse(3) num_threads(nt) if (nt > 1) schedule(dynamic, 4)
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t t = 0; t < T; ++t) {
                std::vector<float> acc(D, 0.f);
                float m = -std::numeric_limits<float>::infinity(), l = 0.f;
                const int64_t hk = h / rep;
                attend_rows(q + b * qb + h * qh + t * qt, k + b * kb + hk * kh, v + b * vb + hk * vh, ks, vs,
                            0, qpos[t] + 1, D, scale, m, l, acc.data());
                float* o = out + b * ob + h * oh + t * ot;
                const float inv = l > 0.f ? 1.0f / l : 0.f;
                for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
            }
}

// Decode attention (one query per head) over the live keys [0, L), split along the key length in
// chunks of `split` keys; each (b, kv head, chunk) work item reads its keys once for all `rep` query
// heads of that KV head (GQA without repeating K/V), and the chunks are merged by log-sum-exp.
// q/out (B, H, D) contiguous rows; part_o (B, H, nsplit, D) and part_lse (B, H, nsplit) scratch.
void es_decode_attention(const float* q, const float* k, const float* v, float* out, float* part_o, float* part_lse,
                         int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D, float scale, int64_t split,
                         int64_t kb, int64_t kh, int64_t ks, int64_t vb, int64_t vh, int64_t vs, int nt) {
    const int64_t rep = H / Hkv;
    const int64_t nsplit = (L + split - 1) / split;
#pragma omp parallel for collapse(3) num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t b = 0; b < B; ++b)
        for (int64_t hk = 0; hk < Hkv; ++hk)
            for (int64_t c = 0; c < nsplit; ++c) {
                const int64_t k0 = c * split, k1 = std::min(L, k0 + split);
                for (int64_t r = 0; r < rep; ++r) {
                    const int64_t h = hk * rep + r;
                    float* acc = part_o + ((b * H + h) * nsplit + c) * D;
                    std::fill(acc, acc + D, 0.f);
                    float m = -std::numeric_limits<float>::infinity(), l = 0.f;
                    attend_rows(q + (b * H + h) * D, k + b * kb + hk * kh, v + b * vb + hk * vh, ks, vs,
                                k0, k1, D, scale, m, l, acc);
                    for (int64_t d = 0; d < D; ++d) acc[d] /= l;
                    part_lse[(b * H + h) * nsplit + c] = m + std::log(l);
                }
            }
    // merge: out = sum_c exp(lse_c - lse) o_c with lse = logsumexp_c lse_c
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const float* lse = part_lse + bh * nsplit;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < nsplit; ++c) mx = std::max(mx, lse[c]);
        float tot = 0.f;
        for (int64_t c = 0; c < nsplit; ++c) tot += std::exp(lse[c] - mx);
        float* o = out + bh * D;
        std::fill(o, o + D, 0.f);
        for (int64_t c = 0; c < nsplit; ++c) {
            const float w = std::exp(lse[c] - mx) / tot;
            const float* pc = part_o + (bh * nsplit + c) * D;
            for (int64_t d = 0; d < D; ++d) o[d] += w * pc[d];
        }
    }
}

// ---------------------------------------------------------------------------- weight-only matmul
//
// Weight layout (kernels/cpu.py packs it once per weight): each row is cut into chunks whose codes sit
// in the eight 32-bit lanes of one 32-byte block, lane l holding the weights l, l + 8, l + 16, ... of
// the chunk. So the codes of 8 consecutive weights come out of one block with a shift and a mask per
// lane (no byte shuffles), already in int32 lanes, and pair with 8 contiguous x values:
//   4 bits: 64-weight chunks; weight j*8 + l is nibble j of lane l (bits 4j..4j+3), value code + 8;
//           a row of K is ceil(K/64) blocks (the half of a last 32-weight chunk is never read).
//   8 bits: 32-weight chunks; weight j*8 + l is byte j of lane l, the int8 code.
// Scales: fp32 (N, K/g), g a multiple of 32; the scale of each 32-weight half chunk is looked up
// once per call. Arithmetic: exact float code x float activation products (code - 8 formed in
// integers), summed per 32 weights, times the scale, summed over the row: the reference's numbers
// up to the order of the sums.

static std::vector<int64_t> half_chunk_groups(int64_t K, int64_t g) {  // group of each 32-weight span
    std::vector<int64_t> idx(K / 32);
    for (int64_t h = 0; h < K / 32; ++h) idx[h] = h * 32 / g;
    return idx;
}

#if defined(__AVX2__) && defined(__FMA__)
extern "C++" {  // templates inside the extern "C" block
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int SHIFT>
static inline __m256 nibbles(__m256i b, __m256i mask, __m256i eight) {  // float(nibble SHIFT/4 of each lane - 8)
    const __m256i u = SHIFT == 28 ? _mm256_srli_epi32(b, 28) : _mm256_and_si256(_mm256_srli_epi32(b, SHIFT), mask);
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(u, eight));
}

template <int J>
static inline __m256 bytes_s8(__m256i b) {  // float(signed byte J of each lane)
    return _mm256_cvtepi32_ps(J == 3 ? _mm256_srai_epi32(b, 24) : _mm256_srai_epi32(_mm256_slli_epi32(b, 24 - 8 * J), 24));
}
}  // extern "C++"
#endif

static float row_dot4(const float* x, const uint8_t* wr, const float* sr, const int64_t* hg, int64_t K) {
    const int64_t full = K / 64;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256i mask = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t c = 0; c < full; ++c) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
        const float* xc = x + c * 64;
        __m256 g0 = _mm256_mul_ps(nibbles<0>(b, mask, eight), _mm256_loadu_ps(xc));
        __m256 g1 = _mm256_mul_ps(nibbles<16>(b, mask, eight), _mm256_loadu_ps(xc + 32));
        g0 = _mm256_fmadd_ps(nibbles<4>(b, mask, eight), _mm256_loadu_ps(xc + 8), g0);
        g1 = _mm256_fmadd_ps(nibbles<20>(b, mask, eight), _mm256_loadu_ps(xc + 40), g1);
        g0 = _mm256_fmadd_ps(nibbles<8>(b, mask, eight), _mm256_loadu_ps(xc + 16), g0);
        g1 = _mm256_fmadd_ps(nibbles<24>(b, mask, eight), _mm256_loadu_ps(xc + 48), g1);
        g0 = _mm256_fmadd_ps(nibbles<12>(b, mask, eight), _mm256_loadu_ps(xc + 24), g0);
        g1 = _mm256_fmadd_ps(nibbles<28>(b, mask, eight), _mm256_loadu_ps(xc + 56), g1);
        acc0 = _mm256_fmadd_ps(g0, _mm256_set1_ps(sr[hg[2 * c]]), acc0);
        acc1 = _mm256_fmadd_ps(g1, _mm256_set1_ps(sr[hg[2 * c + 1]]), acc1);
    }
    if (K % 64) {  // a last chunk of 32 weights: nibbles 0..3 of each lane
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + full * 32));
        const float* xc = x + full * 64;
        __m256 g0 = _mm256_mul_ps(nibbles<0>(b, mask, eight), _mm256_loadu_ps(xc));
        g0 = _mm256_fmadd_ps(nibbles<4>(b, mask, eight), _mm256_loadu_ps(xc + 8), g0);
        g0 = _mm256_fmadd_ps(nibbles<8>(b, mask, eight), _mm256_loadu_ps(xc + 16), g0);
        g0 = _mm256_fmadd_ps(nibbles<12>(b, mask, eight), _mm256_loadu_ps(xc + 24), g0);
        acc0 = _mm256_fmadd_ps(g0, _mm256_set1_ps(sr[hg[2 * full]]), acc0);
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
#else
    float acc = 0.f;
    for (int64_t h = 0; h < K / 32; ++h) {
        const uint8_t* blk = wr + (h / 2) * 32;
        const float* xc = x + h * 32;
        float dot = 0.f;
        for (int64_t j = 4 * (h % 2); j < 4 * (h % 2) + 4; ++j)
            for (int64_t l = 0; l < 8; ++l)
                dot += (float)(((blk[4 * l + j / 2] >> (4 * (j % 2))) & 15) - 8) * xc[(j % 4) * 8 + l];
        acc += sr[hg[h]] * dot;
    }
    return acc;
#endif
}

static float row_dot8(const float* x, const int8_t* wr, const float* sr, const int64_t* hg, int64_t K) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < K / 32; c += 2) {  // two chunks per step: two independent accumulators
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
        const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32 + 32));
        const float* xc = x + c * 32;
        __m256 g0 = _mm256_mul_ps(bytes_s8<0>(b0), _mm256_loadu_ps(xc));
        __m256 g1 = _mm256_mul_ps(bytes_s8<0>(b1), _mm256_loadu_ps(xc + 32));
        g0 = _mm256_fmadd_ps(bytes_s8<1>(b0), _mm256_loadu_ps(xc + 8), g0);
        g1 = _mm256_fmadd_ps(bytes_s8<1>(b1), _mm256_loadu_ps(xc + 40), g1);
        g0 = _mm256_fmadd_ps(bytes_s8<2>(b0), _mm256_loadu_ps(xc + 16), g0);
        g1 = _mm256_fmadd_ps(bytes_s8<2>(b1), _mm256_loadu_ps(xc + 48), g1);
        g0 = _mm256_fmadd_ps(bytes_s8<3>(b0), _mm256_loadu_ps(xc + 24), g0);
        g1 = _mm256_fmadd_ps(bytes_s8<3>(b1), _mm256_loadu_ps(xc + 56), g1);
        acc0 = _mm256_fmadd_ps(g0, _mm256_set1_ps(sr[hg[c]]), acc0);
        acc1 = _mm256_fmadd_ps(g1, _mm256_set1_ps(sr[hg[c + 1]]), acc1);
    }
    if (c < K / 32) {
        const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
        const float* xc = x + c * 32;
        __m256 g0 = _mm256_mul_ps(bytes_s8<0>(b0), _mm256_loadu_ps(xc));
        g0 = _mm256_fmadd_ps(bytes_s8<1>(b0), _mm256_loadu_ps(xc + 8), g0);
        g0 = _mm256_fmadd_ps(bytes_s8<2>(b0), _mm256_loadu_ps(xc + 16), g0);
        g0 = _mm256_fmadd_ps(bytes_s8<3>(b0), _mm256_loadu_ps(xc + 24), g0);
        acc0 = _mm256_fmadd_ps(g0, _mm256_set1_ps(sr[hg[c]]), acc0);
    }
    return hsum256(_mm256_add_ps(acc0, acc1));
#else
    float acc = 0.f;
    for (int64_t c = 0; c < K / 32; ++c) {
        const int8_t* blk = wr + c * 32;
        float dot = 0.f;
        for (int64_t j = 0; j < 4; ++j)
            for (int64_t l = 0; l < 8; ++l) dot += (float)blk[4 * l + j] * x[c * 32 + j * 8 + l];
        acc += sr[hg[c]] * dot;
    }
    return acc;
#endif
}

// out (M, N) = x (M, K) @ W^T for a float W (N, K): the decode-time matrix-vector product of a float
// Linear, one row of W streamed per output (four independent accumulators), threads over rows.
static float row_dot_f32(const float* x, const float* wr, int64_t K) {
    int64_t i = 0;
    float acc = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= K; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    acc = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < K; ++i) acc += wr[i] * x[i];
    return acc;
}

void es_gemv_f32(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K, int nt) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) out[m * N + n] = row_dot_f32(x + m * K, w + n * K, K);
}

// out (M, N) = x (M, K) @ W^T with W[n, i] = scale[n, i / g] * code[n, i], W in the layout above.
void es_wo_matmul4(const float* x, const uint8_t* w, const float* scales, float* out,
                   int64_t M, int64_t N, int64_t K, int64_t g, int nt) {
    const int64_t G = K / g, row_bytes = (K + 63) / 64 * 32;
    const std::vector<int64_t> hg = half_chunk_groups(K, g);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m)
            out[m * N + n] = row_dot4(x + m * K, w + n * row_bytes, scales + n * G, hg.data(), K);
}

void es_wo_matmul8(const float* x, const int8_t* w, const float* scales, float* out,
                   int64_t M, int64_t N, int64_t K, int64_t g, int nt) {
    const int64_t G = K / g;
    const std::vector<int64_t> hg = half_chunk_groups(K, g);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m)
            out[m * N + n] = row_dot8(x + m * K, w + n * K, scales + n * G, hg.data(), K);
}

}  // extern "C"
