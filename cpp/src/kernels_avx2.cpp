// AVX2 kernel (compiled with -mavx2 -mfma -mf16c -mpopcnt).
//
//  avx2-bytemask  Σ_j (2b_j − 1) q_j = 2 P − S with P = Σ_{b_j=1} q_j: 32 plane bits become a byte
//                 mask (broadcast, vpshufb, compare), the mask selects the int8 activations and
//                 vpmaddubsw sums them. Common case only (one class); the rest goes to the scalar
//                 reference. See kernels_avx512.cpp for the shared algebra (bias = μ − Σ α).
#if defined(__x86_64__) || defined(_M_X64)
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace bb {

static bool has_avx2() { return cpu_has("avx2") && cpu_has("fma"); }

static inline uint32_t load_u32(const void *p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

static inline float hsum256(__m256 v) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum256(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

template <int N>
static void bytemask_rows(const BBTensor &t, const QActs &a, const float *dS, float *y, int64_t r0, int64_t r1) {
    const int G = t.group, nc = G / 32;   // 32-column chunks per group
    const int64_t ng = t.ngroups;
    // byte k of the 32-bit plane word goes to output bytes 8k..8k+7; each then tests its own bit
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *pl = t.planes + r * ng * N * (G / 8);
        const float *al = t.scales.data() + r * ng * N;
        __m256 fv = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m256i acc32[N], acc16[N];
            for (int i = 0; i < N; i++) acc32[i] = acc16[i] = _mm256_setzero_si256();
            const int8_t *q = a.q.data() + g * G;
            const uint8_t *pg = pl + g * N * (G / 8);
            for (int c = 0; c < nc; c++) {
                const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q + c * 32));
                for (int i = 0; i < N; i++) {
                    const __m256i vb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)load_u32(pg + i * (G / 8) + c * 4)), spread);
                    const __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(vb, bitsel), bitsel);
                    acc16[i] = _mm256_add_epi16(acc16[i], _mm256_maddubs_epi16(ones8, _mm256_and_si256(m, qv)));
                }
                if ((c & 63) == 63) {   // int16 lanes gain ≤ 2·127 per chunk: widen before they overflow
                    for (int i = 0; i < N; i++) {
                        acc32[i] = _mm256_add_epi32(acc32[i], _mm256_madd_epi16(acc16[i], ones16));
                        acc16[i] = _mm256_setzero_si256();
                    }
                }
            }
            const float d2 = 2.0f * a.d[g];
            for (int i = 0; i < N; i++) {
                acc32[i] = _mm256_add_epi32(acc32[i], _mm256_madd_epi16(acc16[i], ones16));
                fv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc32[i]), _mm256_set1_ps(al[g * N + i] * d2), fv);
            }
        }
        y[r - r0] = hsum256(fv) + dot_f32(t.bias.data() + r * ng, dS, ng);
    }
}

using RowsFn = void (*)(const BBTensor &, const QActs &, const float *, float *, int64_t, int64_t);

static RowsFn bytemask_fn(int n) {
    switch (n) {
        case 1: return bytemask_rows<1>;
        case 2: return bytemask_rows<2>;
        case 3: return bytemask_rows<3>;
        case 4: return bytemask_rows<4>;
        case 5: return bytemask_rows<5>;
        case 6: return bytemask_rows<6>;
        case 7: return bytemask_rows<7>;
        default: return bytemask_rows<8>;
    }
}

static void gemv_bytemask(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (t.n_classes != 1 || t.bias.empty()) return gemv_scalar(t, a, y, r0, r1);
    thread_local std::vector<float> dS;
    dS.resize(a.ngroups);
    for (int64_t g = 0; g < a.ngroups; g++) dS[g] = a.d[g] * (float)a.qsum[g];
    bytemask_fn(t.n_planes)(t, a, dS.data(), y, r0, r1);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

// Prompt processing: a block of rows stays in L1 while every token passes over it.
static void gemm_bytemask(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.n_classes != 1 || t.bias.empty()) return gemm_scalar(t, acts, n_tok, Y, ldy, r0, r1);
    constexpr int64_t ROW_BLOCK = 16;
    thread_local std::vector<float> dS;
    dS.resize(n_tok * t.ngroups);
    for (int k = 0; k < n_tok; k++)
        for (int64_t g = 0; g < t.ngroups; g++) dS[k * t.ngroups + g] = acts[k].d[g] * (float)acts[k].qsum[g];
    const RowsFn fn = bytemask_fn(t.n_planes);
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        const int64_t re = std::min(r1, rb + ROW_BLOCK);
        for (int k = 0; k < n_tok; k++) {
            fn(t, acts[k], dS.data() + k * t.ngroups, Y + k * ldy + (rb - r0), rb, re);
            if (t.flags & F_SPARSE) add_sparse(t, acts[k], Y + k * ldy + (rb - r0), rb, re);
        }
    }
}

void add_kernels_avx2(std::vector<Kernel> &v) {
    v.push_back(Kernel{"avx2-bytemask", "avx2", gemv_bytemask, gemm_bytemask, has_avx2, nullptr});
}

}  // namespace bb
#endif  // x86-64
