// NEON kernels (aarch64). Same algebra as the x86 kernels (see kernels_avx512.cpp):
// Σ_j w_j q_j = Σ_i 2 α_i P_i + (μ − Σ_i α_i) S, P_i = Σ_{bit_i=1} q_j exact in int32.
//
//  neon-dotprod   16 plane bits -> byte mask (vtst), selects the int8 activations, sdot with ones
//                 sums them into 4 int32 lanes (needs the Armv8.2 dot product extension).
//  neon-bytemask  the same selection, summed with pairwise widening adds (plain ASIMD).
// A block of QK = 32 activation columns (one scale d_b) is two 16-column chunks: the int32 sum of a
// (block, plane) is converted and scaled once. Common case only (one class); everything else goes
// to the scalar reference.
#if defined(__aarch64__)
#include "kernels.h"

#include <arm_neon.h>

#include <algorithm>
#include <cstring>

// ASIMD is part of the aarch64 baseline; only the functions marked with the dot-product target need
// more, and they have internal linkage like everything here (see "ISA isolation" in kernels.h).
namespace bb::neon {
namespace {

static inline uint16_t load_u16(const void *p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

float dot_f32(const float *a, const float *b, int64_t n) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// Byte mask of 16 plane bits: byte j is 0xff when bit j is set.
static inline int8x16_t bitmask16(uint16_t bits) {
    static const uint8_t sel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t vb = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
    return vreinterpretq_s8_u8(vtstq_u8(vb, vld1q_u8(sel)));
}

static_assert(QK == 32, "an activation block is two 16-column chunks");

// One (block, plane) partial sum P = Σ_{bit=1} q over QK columns, as 4 int32 lanes.
static inline int32x4_t block_sum_padal(const uint8_t *bits, const int8_t *q) {   // plain ASIMD
    int16x8_t acc16 = vpaddlq_s8(vandq_s8(bitmask16(load_u16(bits)), vld1q_s8(q)));
    acc16 = vpadalq_s8(acc16, vandq_s8(bitmask16(load_u16(bits + 2)), vld1q_s8(q + 16)));
    return vpaddlq_s16(acc16);
}

__attribute__((target("arch=armv8.2-a+dotprod"))) static inline int32x4_t block_sum_dot(const uint8_t *bits, const int8_t *q) {
    const int8x16_t ones = vdupq_n_s8(1);
    const int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vandq_s8(bitmask16(load_u16(bits)), vld1q_s8(q)), ones);
    return vdotq_s32(acc, vandq_s8(bitmask16(load_u16(bits + 2)), vld1q_s8(q + 16)), ones);
}

// Σ_g Σ_i 2 α_i Σ_b d_b P_ib + bias · dS for rows [r0, r1); SUM(bits, q) is the block sum.
#define BB_NEON_ROWS(SUM)                                                                                      \
    const int N = t.n_planes, G = t.group, nb = G / QK;                                                        \
    const int64_t ng = t.ngroups;                                                                              \
    for (int64_t r = r0; r < r1; r++) {                                                                        \
        const uint8_t *pl = t.planes + r * ng * N * (G / 8);                                                   \
        const float *al = t.scales.data() + r * ng * N;                                                        \
        float32x4_t fv = vdupq_n_f32(0.0f);                                                                    \
        for (int64_t g = 0; g < ng; g++)                                                                       \
            for (int i = 0; i < N; i++) {                                                                      \
                const uint8_t *bits = pl + (g * N + i) * (G / 8);                                              \
                float32x4_t F = vdupq_n_f32(0.0f); /* Σ_b d_b · P_ib */                                        \
                for (int b = 0; b < nb; b++)                                                                   \
                    F = vfmaq_n_f32(F, vcvtq_f32_s32(SUM(bits + b * (QK / 8), a.q.data() + g * G + b * QK)),   \
                                    a.d[g * nb + b]);                                                          \
                fv = vfmaq_n_f32(fv, F, 2.0f * al[g * N + i]);                                                 \
            }                                                                                                  \
        y[r - r0] = vaddvq_f32(fv) + dot_f32(t.bias.data() + r * ng, a.dS.data(), ng);                          \
    }

// The dot-product kernel is compiled for Armv8.2+dotprod per function, so that the file (and the
// plain kernel) still runs on Armv8.0 CPUs; it is only called when the CPU reports dotprod.
__attribute__((target("arch=armv8.2-a+dotprod"))) static void rows_dot(const BBTensor &t, const QActs &a, float *y, int64_t r0,
                                                                        int64_t r1) {
    BB_NEON_ROWS(block_sum_dot)
}

static void rows_padal(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) { BB_NEON_ROWS(block_sum_padal) }
#undef BB_NEON_ROWS

using RowsFn = void (*)(const BBTensor &, const QActs &, float *, int64_t, int64_t);

template <RowsFn FN>
static void gemv_neon(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (t.n_classes != 1 || t.bias.empty()) return gemv_scalar(t, a, y, r0, r1);
    FN(t, a, y, r0, r1);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

// Prompt processing: a block of rows stays in L1 while every token passes over it.
template <RowsFn FN>
static void gemm_neon(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.n_classes != 1 || t.bias.empty()) return gemm_scalar(t, acts, n_tok, Y, ldy, r0, r1);
    constexpr int64_t ROW_BLOCK = 16;
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        const int64_t re = std::min(r1, rb + ROW_BLOCK);
        for (int k = 0; k < n_tok; k++) FN(t, acts[k], Y + k * ldy + (rb - r0), rb, re);
    }
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

// ---- neon-lut: table lookup (T-MAC; layout and algebra in kernels_lut.cpp) -----------------------
//
// One 16-byte load holds the nibbles of 32 rows × 4 columns of one plane (rows j and j + 16 in the low
// and high nibble of byte j); tbl on the group's low-byte and high-byte tables gives both bytes of
// the 16-bit entries, zip puts them back together, and one activation block (8 groups, |·| ≤ 8·508)
// adds in int16 before it is widened and scaled by d_b. Plain ASIMD (Armv8.0).

constexpr const char *REPACK_LUT = "neon-lut";

void repack_lut(BBTensor &t) { lut_repack(t, REPACK_LUT); }

void prepare_lut(QActs &a) {
    a.lut.resize((size_t)lut_table_bytes(a));
    lut_tables_scalar(a, a.lut.data());
}

// 4 f16 as floats (fcvtl, exact): the lookup tiles' 2α and μ, the f16 KV cache rows
inline float32x4_t load_f16(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

template <int N>
void lut_tile(const BBTensor &t, const LutLayout &L, const QActs &a, const uint8_t *T, int64_t rt, float *out) {
    const int G = t.group, nb = G / QK;
    const int64_t ng = t.ngroups;
    const uint8_t *W = t.repacked.data();
    const uint16_t *A = reinterpret_cast<const uint16_t *>(W + L.alpha_off);
    const uint16_t *M = L.mu_off < 0 ? nullptr : reinterpret_cast<const uint16_t *>(W + L.mu_off);
    const uint8x16_t low4 = vdupq_n_u8(0x0f);
    float32x4_t fv[8];
    for (int k = 0; k < 8; k++) fv[k] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < ng; g++) {
        for (int i = 0; i < N; i++) {
            const uint8_t *w = W + ((rt * ng + g) * N + i) * (G / 4) * 16;
            float32x4_t F[8];
            for (int k = 0; k < 8; k++) F[k] = vdupq_n_f32(-0.5f * a.dS[g]);
            for (int b = 0; b < nb; b++) {
                int16x8_t acc[4] = {vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0), vdupq_n_s16(0)};
                for (int c4 = b * 8; c4 < b * 8 + 8; c4++) {
                    const int64_t c = g * G / 4 + c4;
                    const uint8_t *lo = T + (c / 2) * 64 + (c & 1) * 16;
                    const uint8x16_t tl = vld1q_u8(lo), th = vld1q_u8(lo + 32), wv = vld1q_u8(w + c4 * 16);
                    const uint8x16_t il = vandq_u8(wv, low4), ih = vshrq_n_u8(wv, 4);
                    const uint8x16_t l0 = vqtbl1q_u8(tl, il), h0 = vqtbl1q_u8(th, il);
                    const uint8x16_t l1 = vqtbl1q_u8(tl, ih), h1 = vqtbl1q_u8(th, ih);
                    acc[0] = vaddq_s16(acc[0], vreinterpretq_s16_u8(vzip1q_u8(l0, h0)));   // rows 0-7
                    acc[1] = vaddq_s16(acc[1], vreinterpretq_s16_u8(vzip2q_u8(l0, h0)));   // rows 8-15
                    acc[2] = vaddq_s16(acc[2], vreinterpretq_s16_u8(vzip1q_u8(l1, h1)));   // rows 16-23
                    acc[3] = vaddq_s16(acc[3], vreinterpretq_s16_u8(vzip2q_u8(l1, h1)));   // rows 24-31
                }
                const float d = a.d[g * nb + b];
                for (int k = 0; k < 4; k++) {
                    F[2 * k] = vfmaq_n_f32(F[2 * k], vcvtq_f32_s32(vmovl_s16(vget_low_s16(acc[k]))), d);
                    F[2 * k + 1] = vfmaq_n_f32(F[2 * k + 1], vcvtq_f32_s32(vmovl_high_s16(acc[k])), d);
                }
            }
            const uint16_t *al = A + ((rt * ng + g) * N + i) * LUT_ROWS;
            for (int k = 0; k < 8; k++) fv[k] = vfmaq_f32(fv[k], F[k], load_f16(al + 4 * k));
        }
        if (M) {
            const uint16_t *mu = M + (rt * ng + g) * LUT_ROWS;
            for (int k = 0; k < 8; k++) fv[k] = vfmaq_n_f32(fv[k], load_f16(mu + 4 * k), a.dS[g]);
        }
    }
    for (int k = 0; k < 8; k++) vst1q_f32(out + 4 * k, fv[k]);
}

LutTileFn lut_fn(int n) {
    return with_planes(n, [](auto P) -> LutTileFn { return lut_tile<decltype(P)::value>; });
}

void gemv_lut(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (t.repacked_for != REPACK_LUT) return gemv_neon<rows_padal>(t, a, y, r0, r1);
    lut_rows(t, &a, 1, y, 0, r0, r1, lut_fn(t.n_planes), lut_tables_scalar);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

void gemm_lut(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.repacked_for != REPACK_LUT) return gemm_neon<rows_padal>(t, acts, n_tok, Y, ldy, r0, r1);
    lut_rows(t, acts, n_tok, Y, ldy, r0, r1, lut_fn(t.n_planes), lut_tables_scalar);
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

// The f16 KV cache rows (kernels.h DotsF16Fn): rows widened by fcvtl (Armv8.0), one row at a time.

void dots_f16(const float *q, const uint16_t *K, int64_t stride, int64_t n, int64_t hd, float *out) {
    const int64_t h4 = hd / 4 * 4;
    for (int64_t j = 0; j < n; j++) {
        const uint16_t *k = K + j * stride;
        float32x4_t s = vdupq_n_f32(0.0f);
        for (int64_t i = 0; i < h4; i += 4) s = vfmaq_f32(s, vld1q_f32(q + i), load_f16(k + i));
        float r = vaddvq_f32(s);
        for (int64_t i = h4; i < hd; i++) r += q[i] * f16_to_f32(k[i]);
        out[j] = r;
    }
}

void wsum_f16(const float *w, const uint16_t *V, int64_t stride, int64_t n, int64_t hd, float *out) {
    int64_t i = 0;
    for (; i + 16 <= hd; i += 16) {
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < n; j++) {
            const uint16_t *v = V + j * stride + i;
            a0 = vfmaq_n_f32(a0, load_f16(v), w[j]);
            a1 = vfmaq_n_f32(a1, load_f16(v + 4), w[j]);
            a2 = vfmaq_n_f32(a2, load_f16(v + 8), w[j]);
            a3 = vfmaq_n_f32(a3, load_f16(v + 12), w[j]);
        }
        vst1q_f32(out + i, a0), vst1q_f32(out + i + 4, a1), vst1q_f32(out + i + 8, a2), vst1q_f32(out + i + 12, a3);
    }
    if (i < hd) wsum_f16_scalar(w, V + i, stride, n, hd - i, out + i);
}

void to_f16(const float *x, uint16_t *y, int64_t n) {   // fcvtn rounds as FPCR says: to nearest even by default
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; i++) y[i] = f32_to_f16(x[i]);
}

}  // namespace
}  // namespace bb::neon

namespace bb {

void add_kernels_neon(std::vector<Kernel> &v) {
    using namespace neon;
    // gemm: the GEMV's row loop per token (its floats, whatever the batch: a tokens-in-lanes sdot GEMM
    // summed in another order, results.md §40). Dense Q8_0 dots: the portable loop, which the compiler
    // vectorizes with the baseline ASIMD.
    v.push_back(Kernel{"neon-dotprod", "neon", "neon,dotprod", gemv_neon<rows_dot>, gemm_neon<rows_dot>, dot_f32, dot_q8_scalar, dot_q8q8_scalar, nullptr});
    v.push_back(Kernel{"neon-bytemask", "neon", "neon", gemv_neon<rows_padal>, gemm_neon<rows_padal>, dot_f32, dot_q8_scalar, dot_q8q8_scalar, nullptr});
    // table lookup: equal to the others, not the default — its speed against neon-dotprod has not
    // been measured on an ARM CPU (CI runs it under qemu, whose timings mean nothing)
    v.push_back(Kernel{"neon-lut", "neon", "neon", gemv_lut, gemm_lut, dot_f32, dot_q8_scalar, dot_q8q8_scalar, repack_lut, prepare_lut});
    for (Kernel &k : v)
        if (std::string(k.isa) == "neon") k.dots_f16 = dots_f16, k.wsum_f16 = wsum_f16, k.to_f16 = to_f16;
}

}  // namespace bb
#endif  // __aarch64__
