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

// ---- GEMM: tokens in the lanes --------------------------------------------------------------------
//
// As the AVX-512 GEMM (kernels_avx512.cpp): for 4 columns one ymm holds 8 tokens × 4 bytes
// u = q + 128, a row's ±1 signs of those columns are one broadcast dword, vpmaddubsw gives
// u_0 s_0 + u_1 s_1 per token pair (|·| ≤ 510, never saturates) and up to 64 of them add in int16
// before vpmaddwd widens them to int32. D_i = Σ s_j q_j = Σ s_j u_j − 128·(2·popcount − G) exactly.

struct TokTiles8 {
    int ntiles = 0;
    std::vector<uint8_t> x;   // [tile][cols_pad/4][8 tokens][4]
    std::vector<float> d, S;  // [tile][ng][8]
};

static void build_tiles8(const BBTensor &t, const QActs *acts, int n_tok, TokTiles8 &tt) {
    const int64_t ng = t.ngroups, cp = ng * t.group, c4n = cp / 4;
    tt.ntiles = (n_tok + 7) / 8;
    tt.x.assign((size_t)tt.ntiles * cp * 8, 128);   // padding tokens: q = 0
    tt.d.assign((size_t)tt.ntiles * ng * 8, 0.0f);
    tt.S.assign((size_t)tt.ntiles * ng * 8, 0.0f);
    for (int k = 0; k < n_tok; k++) {
        const int tile = k / 8, lane = k % 8;
        const int8_t *q = acts[k].q.data();
        uint8_t *x = tt.x.data() + (size_t)tile * cp * 8 + lane * 4;
        for (int64_t c4 = 0; c4 < c4n; c4++) {
            uint32_t v;
            std::memcpy(&v, q + c4 * 4, 4);
            v ^= 0x80808080u;   // q + 128 as u8
            std::memcpy(x + c4 * 32, &v, 4);
        }
        for (int64_t g = 0; g < ng; g++) {
            tt.d[(tile * ng + g) * 8 + lane] = acts[k].d[g];
            tt.S[(tile * ng + g) * 8 + lane] = (float)acts[k].qsum[g];
        }
    }
}

// Row stride of the unpacked signs: cols_pad + 64 (cols_pad is often a multiple of 4 KiB).
static inline int64_t sign_stride8(const BBTensor &t) { return t.ngroups * t.group + 64; }

// Signs of rows [r, r + nr) as ±1 bytes [nr][N][stride], and 128·(2·popcount − G) per (row, group, plane).
static void unpack_signs8(const BBTensor &t, int64_t r, int nr, int8_t *B, int32_t *corr) {
    const int N = t.n_planes, G = t.group;
    const int64_t ng = t.ngroups, cp = sign_stride8(t);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i ones8 = _mm256_set1_epi8(1);
    for (int rr = 0; rr < nr; rr++) {
        const uint8_t *pl = t.planes + (r + rr) * ng * N * (G / 8);
        for (int64_t g = 0; g < ng; g++)
            for (int i = 0; i < N; i++) {
                int pc = 0;
                const uint8_t *bits = pl + (g * N + i) * (G / 8);
                for (int c = 0; c < G / 32; c++) {
                    const uint32_t w = load_u32(bits + c * 4);
                    pc += __builtin_popcount(w);
                    const __m256i vb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread);
                    const __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(vb, bitsel), bitsel);   // 0xff where set
                    // set: 1, clear: −1  ((m & 2) − 1)
                    const __m256i sgn = _mm256_sub_epi8(_mm256_and_si256(m, _mm256_set1_epi8(2)), ones8);
                    _mm256_storeu_si256(reinterpret_cast<__m256i *>(B + (rr * N + i) * cp + g * G + c * 32), sgn);
                }
                corr[(rr * ng + g) * N + i] = 128 * (2 * pc - G);
            }
    }
}

template <int N, int R>
static void tok_block8(const BBTensor &t, const TokTiles8 &tt, int tile, const int8_t *B, const int32_t *corr, int64_t r,
                       float *out /* [R][8] */) {
    const int G = t.group;
    const int64_t ng = t.ngroups, cp = sign_stride8(t);
    const uint8_t *X = tt.x.data() + (size_t)tile * ng * G * 8;
    const bool off = !t.offsets.empty();
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256 fv[R];
    for (int rr = 0; rr < R; rr++) fv[rr] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const __m256 dv = _mm256_loadu_ps(tt.d.data() + (tile * ng + g) * 8);
        __m256i acc[R][N], acc32[R][N];   // acc32: int32 carry of groups longer than 64 steps (rare)
        for (int rr = 0; rr < R; rr++)
            for (int i = 0; i < N; i++) acc[rr][i] = acc32[rr][i] = _mm256_setzero_si256();
        const int64_t c0 = g * G / 4, c1 = (g + 1) * G / 4;
        for (int64_t c4 = c0; c4 < c1; c4++) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(X + c4 * 32));
            for (int rr = 0; rr < R; rr++)
                for (int i = 0; i < N; i++) {
                    int32_t w;
                    std::memcpy(&w, B + (rr * N + i) * cp + c4 * 4, 4);
                    acc[rr][i] = _mm256_add_epi16(acc[rr][i], _mm256_maddubs_epi16(xv, _mm256_set1_epi32(w)));
                }
            if (((c4 - c0) & 63) == 63 && c4 + 1 < c1) {   // int16 holds 64 steps: widen, exactly
                for (int rr = 0; rr < R; rr++)
                    for (int i = 0; i < N; i++) {
                        acc32[rr][i] = _mm256_add_epi32(acc32[rr][i], _mm256_madd_epi16(acc[rr][i], ones16));
                        acc[rr][i] = _mm256_setzero_si256();
                    }
            }
        }
        for (int rr = 0; rr < R; rr++) {   // D_i exact in int32, then α_i·d per token
            const float *al = t.scales.data() + ((r + rr) * ng + g) * N;
            for (int i = 0; i < N; i++) {
                const __m256i D = _mm256_sub_epi32(_mm256_add_epi32(acc32[rr][i], _mm256_madd_epi16(acc[rr][i], ones16)),
                                                   _mm256_set1_epi32(corr[(rr * ng + g) * N + i]));
                fv[rr] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(D), _mm256_mul_ps(_mm256_set1_ps(al[i]), dv), fv[rr]);
            }
        }
        if (off) {
            const __m256 dS = _mm256_mul_ps(dv, _mm256_loadu_ps(tt.S.data() + (tile * ng + g) * 8));
            for (int rr = 0; rr < R; rr++) fv[rr] = _mm256_fmadd_ps(_mm256_set1_ps(t.offsets[(r + rr) * ng + g]), dS, fv[rr]);
        }
    }
    for (int rr = 0; rr < R; rr++) _mm256_storeu_ps(out + rr * 8, fv[rr]);
}

using TokFn8 = void (*)(const BBTensor &, const TokTiles8 &, int, const int8_t *, const int32_t *, int64_t, float *);

// Rows per block so that R·N int16 accumulators + R sums fit the 16 ymm registers.
template <int N>
static constexpr int rows_for8() { return N == 1 ? 4 : N == 2 ? 2 : 1; }

template <int N>
static void tok_pick8(TokFn8 &full, TokFn8 &one, int &R) {
    full = tok_block8<N, rows_for8<N>()>;
    one = tok_block8<N, 1>;
    R = rows_for8<N>();
}

static void gemm_tokens8(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.n_classes != 1 || t.bias.empty() || n_tok < 2) return gemm_bytemask(t, acts, n_tok, Y, ldy, r0, r1);
    TokFn8 full = nullptr, one = nullptr;
    int R = 1;
    switch (t.n_planes) {
        case 1: tok_pick8<1>(full, one, R); break;
        case 2: tok_pick8<2>(full, one, R); break;
        case 3: tok_pick8<3>(full, one, R); break;
        case 4: tok_pick8<4>(full, one, R); break;
        case 5: tok_pick8<5>(full, one, R); break;
        case 6: tok_pick8<6>(full, one, R); break;
        case 7: tok_pick8<7>(full, one, R); break;
        default: tok_pick8<8>(full, one, R); break;
    }
    thread_local TokTiles8 tt;
    thread_local std::vector<int8_t> B;
    thread_local std::vector<int32_t> corr;
    build_tiles8(t, acts, n_tok, tt);
    const int64_t cp = sign_stride8(t);
    B.resize((size_t)R * t.n_planes * cp);
    corr.resize((size_t)R * t.ngroups * t.n_planes);
    alignas(32) float out[4 * 8];
    for (int64_t rb = r0; rb < r1; rb += R) {
        const int nr = (int)std::min<int64_t>(R, r1 - rb);
        unpack_signs8(t, rb, nr, B.data(), corr.data());
        for (int tile = 0; tile < tt.ntiles; tile++) {
            if (nr == R) {
                full(t, tt, tile, B.data(), corr.data(), rb, out);
            } else {
                for (int rr = 0; rr < nr; rr++)
                    one(t, tt, tile, B.data() + (size_t)rr * t.n_planes * cp, corr.data() + (size_t)rr * t.ngroups * t.n_planes,
                        rb + rr, out + rr * 8);
            }
            const int nt = std::min(8, n_tok - tile * 8);
            for (int rr = 0; rr < nr; rr++)
                for (int lane = 0; lane < nt; lane++) Y[(int64_t)(tile * 8 + lane) * ldy + (rb + rr - r0)] = out[rr * 8 + lane];
        }
    }
    if (t.flags & F_SPARSE)
        for (int k = 0; k < n_tok; k++) add_sparse(t, acts[k], Y + k * ldy, r0, r1);
}

void add_kernels_avx2(std::vector<Kernel> &v) {
    // gemm: tokens in the lanes; "-rows" keeps the row loop per token (the alternative, for bench)
    v.push_back(Kernel{"avx2-bytemask", "avx2", gemv_bytemask, gemm_tokens8, has_avx2, nullptr});
    v.push_back(Kernel{"avx2-bytemask-rows", "avx2", gemv_bytemask, gemm_bytemask, has_avx2, nullptr});
}

}  // namespace bb
#endif  // x86-64
