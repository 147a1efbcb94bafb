// AVX-512 kernels and dense dots, compiled for AVX-512 only inside the BB_ISA_BEGIN regions below.
//
// Both handle any N, G, OFFSET, POW2, COLSCALE (folded into the activations) and SPARSE
// (add_sparse); tensors with classes (COLMASK / ELEMCLASS) take the masked-select class path. Both use Σ_j w_j q_j = Σ_i 2 α_i P_i + (μ − Σ_i α_i) S with P_i = Σ_{bit_i=1} q_j,
// S = Σ q_j: the per-group integers P_i are exact, the (μ − Σα)·S part is one dot product per row.
//
//  avx512-vnni    masked select + vpdpbusd: a plane's 64 bits are a k-mask choosing the int8
//                 activations, vpdpbusd sums them into 16 int32 lanes (POW2: weights 2^i fold
//                 every plane into one accumulator); lanes 0-7 hold the 64-column chunk's first
//                 activation block (QK = 32), lanes 8-15 its second, so one float FMA per chunk
//                 applies both block scales.
//  avx512-vpopcnt bit-serial: activations as 8 bit planes (two's complement, bit 7 weighs −128),
//                 P = Σ_k ±2^k popcount(w & x_k), 32 columns (one activation block) per int32
//                 lane, streaming the row's planes in on-disk order (the activation planes are
//                 laid out to match).
#if defined(__x86_64__) || defined(_M_X64)
#include "kernels.h"

// GCC 12's own intrinsic headers trip -Wmaybe-uninitialized (_mm512_undefined_ps); not our code.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstring>

// Two regions (see "ISA isolation" in kernels.h): everything but the bit-serial kernel needs VNNI; the
// bit-serial code also needs VPOPCNTDQ (Ice Lake and later, Zen 4). Each string is also the
// Kernel::features of the kernels built from it.
#define AVX512_VNNI "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,popcnt"
#define AVX512_VPOPCNT "avx512f,avx512bw,avx512vl,avx512vnni,avx512vpopcntdq,avx2,fma,f16c,popcnt"

BB_ISA_BEGIN(AVX512_VNNI)
namespace bb::avx512 {
namespace {

// Kernels below need one class; everything else is the scalar reference's job.
static inline bool common_case(const BBTensor &t) { return t.n_classes == 1 && !t.bias.empty(); }

static inline uint64_t load_u64(const void *p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
}

static_assert(QK == 32, "the AVX-512 kernels map one activation block to 8 dword lanes (vnni) or 1 (vpopcnt)");

// The scales of a token's activation blocks as one 16-lane vector per 64-column chunk, times `mul`:
// lanes 0-7 the chunk's first block, lanes 8-15 its second (the dword lanes vpdpbusd fills).
static void chunk_scales(const QActs &a, float mul, avec<float> &dv) {
    dv.resize((size_t)a.nblocks * 8);
    for (int64_t b = 0; b < a.nblocks; b++)
        for (int l = 0; l < 8; l++) dv[b * 8 + l] = mul * a.d[b];
}

// Each α of 8 lanes twice (lane 2l and 2l + 1): the two activation blocks of one 64-bit plane word.
static inline __m512 dup_pairs(__m256 v) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), _mm512_castps256_ps512(v));
}

float dot_f32(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

// Σ_b d_b · Σ_j q_bj x_bj over the Q8_0 blocks (34 bytes: f16 d, 32 int8) of one row.
float dot_q8(const uint8_t *row, const float *x, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
        __m512 s = _mm512_mul_ps(w0, _mm512_loadu_ps(x + b * 32));
        s = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + b * 32 + 16), s);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(dh)), s, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// Q8_0 row · int8 activations: vpdpbusd on |w| (u8) and sign(w)·x (s8), exact int32 block sums.
float dot_q8q8(const uint8_t *row, const int8_t *q, const float *d, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2));
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q + b * 32));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(dh) * d[b]), acc);
    }
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

// Tensors with classes (COLMASK / ELEMCLASS), defined below.
static void gemv_classes(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1);
static void gemm_classes(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1);

// ---- avx512-vnni --------------------------------------------------------------------------------

template <int N, bool POW2>
static void vnni_rows(const BBTensor &t, const QActs &a, const float *dv, float *y, int64_t r0, int64_t r1) {
    const int G = t.group, s = G / 64;
    const int64_t ng = t.ngroups;
    __m512i wplane[N];
    for (int i = 0; i < N; i++) wplane[i] = _mm512_set1_epi8(POW2 ? (char)(1u << i) : 1);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *pl = t.planes + r * ng * N * (G / 8);
        const float *al = t.scales.data() + r * ng * N;
        __m512 fv = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            constexpr int NA = POW2 ? 1 : N;
            __m512 F[NA];   // Σ over the group's chunks of 2·d_b · P_i (per lane)
            for (int i = 0; i < NA; i++) F[i] = _mm512_setzero_ps();
            const int8_t *q = a.q.data() + g * G;
            const uint8_t *pg = pl + g * N * (G / 8);
            for (int c = 0; c < s; c++) {
                const __m512i qv = _mm512_loadu_si512(q + c * 64);
                __m512i acc[NA];
                for (int i = 0; i < NA; i++) acc[i] = _mm512_setzero_si512();
                for (int i = 0; i < N; i++) {
                    const __mmask64 k = _cvtu64_mask64(load_u64(pg + (i * s + c) * 8));
                    acc[POW2 ? 0 : i] = _mm512_dpbusd_epi32(acc[POW2 ? 0 : i], wplane[i], _mm512_maskz_mov_epi8(k, qv));
                }
                const __m512 d2 = _mm512_loadu_ps(dv + (g * s + c) * 16);
                for (int i = 0; i < NA; i++) F[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), d2, F[i]);
            }
            for (int i = 0; i < NA; i++)   // POW2: Σ_i α_i P_i = α_0 Σ_i 2^i P_i
                fv = _mm512_fmadd_ps(F[i], _mm512_set1_ps(al[g * N + i]), fv);
        }
        y[r - r0] = _mm512_reduce_add_ps(fv) + dot_f32(t.bias.data() + r * ng, a.dS.data(), ng);
    }
}

using RowsFn = void (*)(const BBTensor &, const QActs &, const float *, float *, int64_t, int64_t);   // dv: chunk_scales(a, 2)

template <bool POW2>
static RowsFn vnni_pick(int n) {
    return with_planes(n, [](auto P) -> RowsFn { return vnni_rows<decltype(P)::value, POW2>; });
}

static RowsFn vnni_fn(const BBTensor &t) {
    return (t.flags & F_POW2) ? vnni_pick<true>(t.n_planes) : vnni_pick<false>(t.n_planes);
}

static void gemv_vnni(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (!common_case(t)) return gemv_classes(t, a, y, r0, r1);
    thread_local avec<float> dv;
    chunk_scales(a, 2.0f, dv);
    vnni_fn(t)(t, a, dv.data(), y, r0, r1);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

// Prompt processing: a block of rows is read from memory once and stays in L1 while every token
// passes over it (the token's activations are reused by all rows of the block).
static constexpr int64_t ROW_BLOCK = 16;

static void gemm_vnni(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (!common_case(t)) return gemm_classes(t, acts, n_tok, Y, ldy, r0, r1);
    thread_local std::vector<avec<float>> dv;
    if ((int)dv.size() < n_tok) dv.resize(n_tok);
    for (int k = 0; k < n_tok; k++) chunk_scales(acts[k], 2.0f, dv[k]);
    const RowsFn fn = vnni_fn(t);
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        const int64_t re = std::min(r1, rb + ROW_BLOCK);
        for (int k = 0; k < n_tok; k++) fn(t, acts[k], dv[k].data(), Y + k * ldy + (rb - r0), rb, re);
    }
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

// Several classes (COLMASK / ELEMCLASS: BiLLM, ARB): the same masked select with the class masks
// ANDed in. Per (row, group, class c): S_c = Σ_{j∈c} q_j and P_{c,i} = Σ_{j∈c, bit_i=1} q_j, then
// Σ_c [Σ_i α_{c,i} (2 P_{c,i} − S_c) + μ_c S_c]. Class 1 = colmask, class C−1 = elemclass & ~colmask,
// class 0 = the rest (spec "class c = ...").
template <int N>
static void vnni_class_rows(const BBTensor &t, const QActs &a, const float *dv, float *y, int64_t r0, int64_t r1) {
    const int G = t.group, s = G / 64, C = t.n_classes;
    const int64_t ng = t.ngroups;
    const bool off = !t.offsets.empty();
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *pl = t.planes + r * ng * N * (G / 8);
        __m512 fv = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m512 FP[3][N], FS[3];   // Σ over the group's chunks of 2·d_b · P_{c,i} and 2·d_b · S_c (per lane)
            for (int c = 0; c < C; c++) {
                FS[c] = _mm512_setzero_ps();
                for (int i = 0; i < N; i++) FP[c][i] = _mm512_setzero_ps();
            }
            const int8_t *q = a.q.data() + g * G;
            const uint8_t *pg = pl + g * N * (G / 8);
            const uint8_t *cm = t.colmask ? t.colmask + g * (G / 8) : nullptr;
            const uint8_t *em = t.elemclass ? t.elemclass + (r * ng + g) * (G / 8) : nullptr;
            for (int c64 = 0; c64 < s; c64++) {
                const __m512i qv = _mm512_loadu_si512(q + c64 * 64);
                const __m512 d2 = _mm512_loadu_ps(dv + (g * s + c64) * 16);
                const uint64_t m1 = cm ? load_u64(cm + c64 * 8) : 0, m2 = em ? load_u64(em + c64 * 8) & ~m1 : 0;
                uint64_t mc[3] = {~(m1 | m2), 0, 0};
                if (cm) mc[1] = m1;
                if (em) mc[C - 1] = m2;
                for (int c = 0; c < C; c++) {
                    const __m512i S = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_maskz_mov_epi8(_cvtu64_mask64(mc[c]), qv));
                    FS[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S), d2, FS[c]);
                    for (int i = 0; i < N; i++) {
                        const __mmask64 k = _cvtu64_mask64(load_u64(pg + (i * s + c64) * 8) & mc[c]);
                        const __m512i P = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_maskz_mov_epi8(k, qv));
                        FP[c][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(P), d2, FP[c][i]);
                    }
                }
            }
            const float *al = t.scales.data() + (r * ng + g) * C * N;
            for (int c = 0; c < C; c++) {   // Σ_i α_i (2 P_i − S) + μ S, with 2·d_b already in FP and FS
                float sum_a = 0.0f;
                for (int i = 0; i < N; i++) {
                    fv = _mm512_fmadd_ps(FP[c][i], _mm512_set1_ps(al[c * N + i]), fv);
                    sum_a += al[c * N + i];
                }
                const float mu = off ? t.offsets[(r * ng + g) * C + c] : 0.0f;
                fv = _mm512_fmadd_ps(FS[c], _mm512_set1_ps(0.5f * (mu - sum_a)), fv);
            }
        }
        y[r - r0] = _mm512_reduce_add_ps(fv);
    }
}

using ClassFn = void (*)(const BBTensor &, const QActs &, const float *, float *, int64_t, int64_t);

static ClassFn class_fn(int n) {
    return with_planes(n, [](auto P) -> ClassFn { return vnni_class_rows<decltype(P)::value>; });
}

// gemv for tensors outside the common case: classes here, anything else the scalar reference.
static void gemv_classes(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (t.n_classes < 2 || t.n_classes > 3) return gemv_scalar(t, a, y, r0, r1);
    thread_local avec<float> dv;
    chunk_scales(a, 2.0f, dv);
    class_fn(t.n_planes)(t, a, dv.data(), y, r0, r1);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

static void gemm_classes(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.n_classes < 2 || t.n_classes > 3) return gemm_scalar(t, acts, n_tok, Y, ldy, r0, r1);
    thread_local std::vector<avec<float>> dv;
    if ((int)dv.size() < n_tok) dv.resize(n_tok);
    for (int k = 0; k < n_tok; k++) chunk_scales(acts[k], 2.0f, dv[k]);
    const ClassFn fn = class_fn(t.n_planes);
    for (int64_t rb = r0; rb < r1; rb += 16) {   // a block of rows stays in L1 across the tokens
        const int64_t re = std::min(r1, rb + 16);
        for (int k = 0; k < n_tok; k++) fn(t, acts[k], dv[k].data(), Y + k * ldy + (rb - r0), rb, re);
    }
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

// ---- GEMM: tokens in the lanes (vpdpbusd; kernels_tokens.inc) ----------------------------------------
//
// 16 tokens × 4 int8 activations a zmm; one vpdpbusd adds Σ_{bit_j=1} q_j of 4 columns for 16 tokens.

#include "kernels_tokens.inc"

// Plane bits of rows [r, r + nr) as 0/1 bytes [nr][N][stride].
static void unpack_bits_tokens(const BBTensor &t, int64_t r, int nr, uint8_t *B) {
    const int N = t.n_planes, G = t.group, s = G / 64;
    const int64_t ng = t.ngroups, cp = sign_stride(t);
    const __m512i one = _mm512_set1_epi8(1);
    for (int rr = 0; rr < nr; rr++) {
        const uint8_t *pl = t.planes + (r + rr) * ng * N * (G / 8);
        for (int64_t g = 0; g < ng; g++)
            for (int i = 0; i < N; i++)
                for (int c = 0; c < s; c++)
                    _mm512_storeu_si512(B + (rr * N + i) * cp + g * G + c * 64,
                                        _mm512_maskz_mov_epi8(_cvtu64_mask64(load_u64(pl + ((g * N + i) * s + c) * 8)), one));
    }
}

struct TokAvx512 {
    static constexpr int LANES = 16, ROWS = 8;   // 3·8 zmm of sums + the activations and scales: the 32 registers
    using I = __m512i;
    using F = __m512;
    static I zero_i() { return _mm512_setzero_si512(); }
    static F zero_f() { return _mm512_setzero_ps(); }
    static I load_x(const int8_t *p) { return _mm512_load_si512(p); }
    static F load_f(const float *p) { return _mm512_load_ps(p); }
    static F set1_f(float x) { return _mm512_set1_ps(x); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static void store_f(float *p, F v) { _mm512_store_ps(p, v); }
    static I dot(I acc, int32_t w, I x) { return _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(w), x); }
    static F to_f(I acc) { return _mm512_cvtepi32_ps(acc); }
    static void unpack_bits(const BBTensor &t, int64_t r, int nr, uint8_t *B) { unpack_bits_tokens(t, r, nr, B); }
};

// ---- avx512-lut's GEMV: the lookup with 64-row tiles (layout: kernels_lut.cpp lut_nibble) ----------
//
// avx2-lut's tile (kernels_avx2.cpp lut_tile) looks up two column groups per 256-bit vpshufb (one per
// lane), so each block ends with 4 lane permutes and adds to join the halves, then 4 int16 → int32
// widenings of 8 rows each, all on the shuffle ports that the lookups saturate (results.md §44a). Here both lanes
// hold the same column group's table (vbroadcasti128 from memory: a load, no shuffle) and the weight
// bytes index 64 different rows, so the lookups are the same count per weight and a block ends with 4
// widenings of 16 rows (vpmovsxwd zmm) and nothing to join. The floats are lut_tile's, per row and in
// the same order (kernels.h: F = −dS/2, F = fma(P_ib, d_b, F) over blocks, fv = fma(F, 2α_i, fv) over
// planes, fv = fma(μ, dS_g, fv)), so this GEMV equals avx2-lut's bit for bit, and so does the GEMM below.
// 7B-shape GEMV from memory: −8 % at N = 2, −14 % at N = 1 against avx2-lut's tile (results.md §44c).

constexpr const char *REPACK_LUT64 = "avx512-lut";

static void repack_lut64(BBTensor &t) { lut_repack(t, REPACK_LUT64, LUT_ROWS64); }

// As kernels_avx2.cpp's lut_tile: the three streams (nibbles, 2α, μ) kernels.h LUT_PREFETCH bytes
// ahead in the nibbles and as far ahead in the others.

static inline void prefetch2(const void *p) {   // the two cache lines at p
    _mm_prefetch(static_cast<const char *>(p), _MM_HINT_T0);
    _mm_prefetch(static_cast<const char *>(p) + 64, _MM_HINT_T0);
}

// 16 f16 as floats (vcvtph2ps, exact)
static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
}

template <int N>
static void lut_tile64(const BBTensor &t, const LutLayout &L, const QActs &a, const uint8_t *T, int64_t rt, float *out) {
    const int G = t.group, g4 = G / 4, nb = G / QK;
    const int64_t ng = t.ngroups;
    const uint8_t *W = t.repacked.data();
    const uint16_t *A = reinterpret_cast<const uint16_t *>(W + L.alpha_off);
    const uint16_t *M = L.mu_off < 0 ? nullptr : reinterpret_cast<const uint16_t *>(W + L.mu_off);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m512 fv[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *Tg = T + g * g4 * 32;   // the group's tables: 16 low bytes, 16 (other group), 16 high, 16
        const __m512 dS = _mm512_set1_ps(a.dS[g]), half_dS = _mm512_set1_ps(-0.5f * a.dS[g]);
        for (int i = 0; i < N; i++) {
            const uint8_t *w = W + ((rt * ng + g) * N + i) * g4 * 32;
            __m512 F[4] = {half_dS, half_dS, half_dS, half_dS};
            for (int b = 0; b < nb; b++) {
                prefetch2(w + b * 256 + LUT_PREFETCH);
                prefetch2(w + b * 256 + 128 + LUT_PREFETCH);
                __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 8
                for (int c4 = b * 8; c4 < b * 8 + 8; c4++) {   // 8 column groups: |Σ P| ≤ 8·508 fits int16
                    const uint8_t *tp = Tg + (c4 / 2) * 64 + (c4 & 1) * 16;
                    const __m256i tl = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i *>(tp)));
                    const __m256i th = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i *>(tp + 32)));
                    const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i *>(w + c4 * 32));
                    const __m256i il = _mm256_and_si256(wv, low4), ih = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
                    const __m256i l0 = _mm256_shuffle_epi8(tl, il), h0 = _mm256_shuffle_epi8(th, il);
                    const __m256i l1 = _mm256_shuffle_epi8(tl, ih), h1 = _mm256_shuffle_epi8(th, ih);
                    acc[0] = _mm256_add_epi16(acc[0], _mm256_unpacklo_epi8(l0, h0));   // rows 0-15
                    acc[1] = _mm256_add_epi16(acc[1], _mm256_unpackhi_epi8(l0, h0));   // rows 16-31
                    acc[2] = _mm256_add_epi16(acc[2], _mm256_unpacklo_epi8(l1, h1));   // rows 32-47
                    acc[3] = _mm256_add_epi16(acc[3], _mm256_unpackhi_epi8(l1, h1));   // rows 48-63
                }
                const __m512 d = _mm512_set1_ps(a.d[g * nb + b]);
                for (int z = 0; z < 4; z++) F[z] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(acc[z])), d, F[z]);
            }
            const uint16_t *al = A + ((rt * ng + g) * N + i) * LUT_ROWS64;
            prefetch2(al + LUT_PREFETCH / 16);
            for (int z = 0; z < 4; z++) fv[z] = _mm512_fmadd_ps(F[z], load16_f16(al + 16 * z), fv[z]);
        }
        if (M) {
            const uint16_t *mu = M + (rt * ng + g) * LUT_ROWS64;
            prefetch2(mu + LUT_PREFETCH / 16 / N);
            for (int z = 0; z < 4; z++) fv[z] = _mm512_fmadd_ps(load16_f16(mu + 16 * z), dS, fv[z]);
        }
    }
    for (int z = 0; z < 4; z++) _mm512_storeu_ps(out + 16 * z, fv[z]);
}

static LutTileFn lut64_fn(int n) {
    return with_planes(n, [](auto P) -> LutTileFn { return lut_tile64<decltype(P)::value>; });
}

// Tensors the 64-row layout does not hold (classes) go to avx2-lut's GEMV, i.e. its own fallback.
static void gemv_lut64(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    static const Kernel *const lut = find_kernel("avx2-lut");
    if (t.repacked_for != REPACK_LUT64) return lut->gemv(t, a, y, r0, r1);
    lut_rows(t, &a, 1, y, 0, r0, r1, lut64_fn(t.n_planes), lut_tables_scalar, LUT_ROWS64);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

// avx512-lut's GEMM. Too few tokens to fill the lanes go to the GEMV per token (lut_rows); tensors the
// lookup layout does not hold to avx2-lut's GEMM, which is that GEMV's own fallback per token.
static void gemm_lut_tokens(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    static const Kernel *const lut = find_kernel("avx2-lut");
    if (t.repacked_for != REPACK_LUT64) return lut->gemm(t, acts, n_tok, Y, ldy, r0, r1);
    if (n_tok < 4) {
        lut_rows(t, acts, n_tok, Y, ldy, r0, r1, lut64_fn(t.n_planes), lut_tables_scalar, LUT_ROWS64);
        if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
        return;
    }
    gemm_tokens<TokAvx512>(t, acts, n_tok, Y, ldy, r0, r1);
}

}  // namespace
}  // namespace bb::avx512
BB_ISA_END

BB_ISA_BEGIN(AVX512_VPOPCNT)
namespace bb::avx512 {
namespace {

// ---- avx512-vpopcnt -----------------------------------------------------------------------------

// A token's activations in the layout the bit-serial loop streams: the row's planes are M = ng·N·s
// qwords in on-disk order (qword m: group m/(N s), plane (m/s) % N, chunk m % s), so for each block
// of 8 qwords we store the 8 activation bit planes of the matching 64-column chunks, [M/8][8 k][8].
struct BitActs {
    avec<uint64_t> x;         // [M8/8][8 k][8 qwords]
    avec<float> d2;           // [M8][2] 2·d_b of the two activation blocks (low, high dword) of each qword
    std::vector<int32_t> ai;  // [M8] α index of each qword within the row (= m / s)
    int64_t M = 0, M8 = 0;
};

static void bit_acts(const BBTensor &t, const QActs &a, BitActs &b) {
    const int N = t.n_planes, s = t.group / 64;
    const int64_t ng = t.ngroups;
    b.M = ng * N * s;
    b.M8 = (b.M + 7) / 8 * 8;
    b.x.assign(b.M8 * 8, 0);
    b.d2.assign(b.M8 * 2, 0.0f);
    b.ai.assign(b.M8, 0);
    uint64_t *xq = b.x.data();
    for (int64_t g = 0; g < ng; g++)
        for (int c = 0; c < s; c++) {
            const __m512i qv = _mm512_loadu_si512(a.q.data() + (g * s + c) * 64);
            uint64_t planes[8];
            for (int k = 0; k < 8; k++) planes[k] = _cvtmask64_u64(_mm512_test_epi8_mask(qv, _mm512_set1_epi8((char)(1u << k))));
            for (int i = 0; i < N; i++) {
                const int64_t m = (g * N + i) * s + c;
                for (int k = 0; k < 8; k++) xq[(m / 8) * 64 + k * 8 + m % 8] = planes[k];
                b.d2[2 * m] = 2.0f * a.d[(g * s + c) * 2];
                b.d2[2 * m + 1] = 2.0f * a.d[(g * s + c) * 2 + 1];
                b.ai[m] = (int32_t)(m / s);
            }
        }
}

// P of each activation block: Horner over the activation bits, −128·pc_7 + Σ_{k<7} 2^k pc_k, with
// 32-bit popcounts so that each int32 lane is one block (low dword of a plane word: its first 32
// columns). |P| ≤ 127·32.
static inline __m512i bit_serial(__m512i w, const uint64_t *x) {
    __m512i p = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_popcnt_epi32(_mm512_and_si512(w, _mm512_loadu_si512(x + 56))));
    for (int k = 6; k >= 0; k--)
        p = _mm512_add_epi32(_mm512_add_epi32(p, p), _mm512_popcnt_epi32(_mm512_and_si512(w, _mm512_loadu_si512(x + 8 * k))));
    return p;
}

static void vpopcnt_rows(const BBTensor &t, const BitActs &b, const QActs &a, float *y, int64_t r0, int64_t r1) {
    const int N = t.n_planes, s = t.group / 64;
    const int64_t ng = t.ngroups, M = b.M;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *pl = t.planes + r * M * 8;
        const float *al = t.scales.data() + r * ng * N;
        __m512 fv = _mm512_setzero_ps();
        for (int64_t m = 0; m < M; m += 8) {
            const __m512i w = m + 8 <= M ? _mm512_loadu_si512(pl + m * 8)
                                         : _mm512_maskz_loadu_epi64((__mmask8)((1u << (M - m)) - 1), pl + m * 8);
            const __m512 f = _mm512_cvtepi32_ps(bit_serial(w, b.x.data() + m * 8));
            __m256 alpha;   // α of each qword's (group, plane): al[m / s]
            if (s == 1) {
                alpha = m + 8 <= M ? _mm256_loadu_ps(al + m) : _mm256_maskz_loadu_ps((__mmask8)((1u << (M - m)) - 1), al + m);
            } else if (s == 2 || s == 4) {   // 4 or 2 scales, each repeated s times
                const int64_t na = std::min<int64_t>(8 / s, (M - m + s - 1) / s);   // never past the row's α
                const __m256 av = _mm256_maskz_loadu_ps((__mmask8)((1u << na) - 1), al + m / s);
                alpha = _mm256_permutevar8x32_ps(av, s == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
            } else if (s % 8 == 0) {          // 8 qwords inside one (group, plane)
                alpha = _mm256_set1_ps(al[m / s]);
            } else {
                alpha = _mm256_i32gather_ps(al, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(b.ai.data() + m)), 4);
            }
            fv = _mm512_fmadd_ps(f, _mm512_mul_ps(dup_pairs(alpha), _mm512_loadu_ps(b.d2.data() + 2 * m)), fv);
        }
        y[r - r0] = _mm512_reduce_add_ps(fv) + dot_f32(t.bias.data() + r * ng, a.dS.data(), ng);
    }
}

// Load-time repack for the bit-serial kernel ("vpopcnt-pairs"): a row's (group, plane) pairs
// p = g·N + i are taken 8 at a time, and for each chunk c < s = G/64 the 8 pairs' qwords are stored
// together: [row][pair block][c][8 lanes]. Lane l then always holds pair 8·pb + l, so the popcount
// sums of a pair's s chunks add in int64 and the float step runs once per 8 pairs with α loaded
// contiguously (no per-qword α expansion, no shuffles). Missing pairs of the last block are zero.
// Measured on a Xeon (Sapphire Rapids), 4096x4096 and 11008x4096, N = 2: 15-40% faster GEMV at
// G = 128 and 256. G = 64 is left unrepacked: its on-disk order already is this layout.
static constexpr const char *REPACK_PAIRS = "vpopcnt-pairs";

static void repack_pairs(BBTensor &t) {
    const int s = t.group / 64;
    if (s == 1) return;   // G = 64: the on-disk order is already this layout
    const int64_t np = t.ngroups * t.n_planes, npb = (np + 7) / 8, row_q = npb * s * 8;
    t.repacked.assign((size_t)(t.rows * row_q * 8), 0);
    for (int64_t r = 0; r < t.rows; r++) {
        const uint8_t *src = t.planes + r * np * s * 8;
        uint8_t *dst = t.repacked.data() + r * row_q * 8;
        for (int64_t p = 0; p < np; p++)
            for (int c = 0; c < s; c++) std::memcpy(dst + (((p / 8) * s + c) * 8 + p % 8) * 8, src + (p * s + c) * 8, 8);
    }
    t.repacked_for = REPACK_PAIRS;
}

// Activations in the repacked order: [pair block][c][8 k][8 lanes] qwords, and 2·d_b of the two
// activation blocks (low, high dword) of each lane's chunk.
struct PairActs {
    avec<uint64_t> x;
    avec<float> d2;           // [npb][s][8 lanes][2]
};

static void pair_acts(const BBTensor &t, const QActs &a, PairActs &b) {
    const int N = t.n_planes, s = t.group / 64;
    const int64_t ng = t.ngroups, np = ng * N, npb = (np + 7) / 8;
    b.x.assign((size_t)(npb * s * 64), 0);
    b.d2.assign((size_t)(npb * s * 16), 0.0f);
    for (int64_t g = 0; g < ng; g++)
        for (int c = 0; c < s; c++) {
            const __m512i qv = _mm512_loadu_si512(a.q.data() + (g * s + c) * 64);
            for (int k = 0; k < 8; k++) {
                const uint64_t plane = _cvtmask64_u64(_mm512_test_epi8_mask(qv, _mm512_set1_epi8((char)(1u << k))));
                for (int i = 0; i < N; i++) {
                    const int64_t p = g * N + i;
                    b.x[(((p / 8) * s + c) * 8 + k) * 8 + p % 8] = plane;
                }
            }
        }
    for (int64_t p = 0; p < np; p++)
        for (int c = 0; c < s; c++)
            for (int h = 0; h < 2; h++) b.d2[(((p / 8) * s + c) * 8 + p % 8) * 2 + h] = 2.0f * a.d[((p / N) * s + c) * 2 + h];
}

static void vpopcnt_pairs_rows(const BBTensor &t, const PairActs &b, const QActs &a, float *y, int64_t r0, int64_t r1) {
    const int s = t.group / 64;
    const int64_t ng = t.ngroups, np = ng * t.n_planes, npb = (np + 7) / 8, row_q = npb * s * 8;
    for (int64_t r = r0; r < r1; r++) {
        const uint64_t *pl = reinterpret_cast<const uint64_t *>(t.repacked.data()) + r * row_q;
        const float *al = t.scales.data() + r * np;   // α of pair p = al[p] (one class)
        __m512 fv = _mm512_setzero_ps();
        for (int64_t pb = 0; pb < npb; pb++) {
            __m512 F = _mm512_setzero_ps();   // Σ_c 2·d_b · P_b per (pair, block) lane
            for (int c = 0; c < s; c++) {
                const __m512i w = _mm512_loadu_si512(pl + (pb * s + c) * 8);
                const __m512i p = bit_serial(w, b.x.data() + (pb * s + c) * 64);
                F = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(b.d2.data() + (pb * s + c) * 16), F);
            }
            const __m256 alpha = pb * 8 + 8 <= np ? _mm256_loadu_ps(al + pb * 8)
                                                  : _mm256_maskz_loadu_ps((__mmask8)((1u << (np - pb * 8)) - 1), al + pb * 8);
            fv = _mm512_fmadd_ps(F, dup_pairs(alpha), fv);
        }
        y[r - r0] = _mm512_reduce_add_ps(fv) + dot_f32(t.bias.data() + r * ng, a.dS.data(), ng);
    }
}

static void gemv_vpopcnt(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (!common_case(t)) return gemv_classes(t, a, y, r0, r1);
    if (t.repacked_for == REPACK_PAIRS) {
        thread_local PairActs pb;
        pair_acts(t, a, pb);
        vpopcnt_pairs_rows(t, pb, a, y, r0, r1);
    } else {   // on-disk layout
        thread_local BitActs b;
        bit_acts(t, a, b);
        vpopcnt_rows(t, b, a, y, r0, r1);
    }
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

// Prompt processing: the GEMV per token over a block of rows at a time (the block stays in L1 while the
// tokens pass), with the activations of each token in the GEMV's own layout, so a token's result is
// the GEMV's bit for bit.
static void gemm_vpopcnt(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (!common_case(t)) return gemm_classes(t, acts, n_tok, Y, ldy, r0, r1);
    const bool pairs = t.repacked_for == REPACK_PAIRS;
    thread_local std::vector<BitActs> bs;
    thread_local std::vector<PairActs> ps;
    if (pairs && (int)ps.size() < n_tok) ps.resize(n_tok);
    if (!pairs && (int)bs.size() < n_tok) bs.resize(n_tok);
    for (int k = 0; k < n_tok; k++) {
        if (pairs) pair_acts(t, acts[k], ps[k]);
        else bit_acts(t, acts[k], bs[k]);
    }
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        const int64_t re = std::min(r1, rb + ROW_BLOCK);
        for (int k = 0; k < n_tok; k++) {
            float *y = Y + k * ldy + (rb - r0);
            if (pairs) vpopcnt_pairs_rows(t, ps[k], acts[k], y, rb, re);
            else vpopcnt_rows(t, bs[k], acts[k], y, rb, re);
        }
    }
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

}  // namespace
}  // namespace bb::avx512
BB_ISA_END

namespace bb {

void add_kernels_avx512(std::vector<Kernel> &v) {
    // fastest first (bitbasis bench kernels): the bit-serial kernel stays near memory bandwidth at
    // G = 64..128 where the masked-select one pays a float reduction per (group, plane). Each GEMM
    // computes its GEMV's floats (a token's result does not depend on its batch).
    using namespace avx512;
    // avx512-lut: its GEMV (64-row lookup tiles), repack and GEMM; kernels_dispatch.cpp completes the set with avx2-lut's
    v.push_back(Kernel{"avx512-lut", "avx512", AVX512_VNNI, gemv_lut64, gemm_lut_tokens, nullptr, nullptr, nullptr, repack_lut64});
    v.push_back(Kernel{"avx512-vpopcnt", "avx512", AVX512_VPOPCNT, gemv_vpopcnt, gemm_vpopcnt, dot_f32, dot_q8, dot_q8q8, repack_pairs});
    v.push_back(Kernel{"avx512-vnni", "avx512", AVX512_VNNI, gemv_vnni, gemm_vnni, dot_f32, dot_q8, dot_q8q8, nullptr});
}

}  // namespace bb
#endif  // x86-64
