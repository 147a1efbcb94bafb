// AVX2 kernel and dense dots: the code between BB_ISA_BEGIN(AVX2) and BB_ISA_END is compiled for AVX2,
// FMA, F16C and POPCNT, the rest of the file (registration) for the baseline (see "ISA isolation" in
// kernels.h).
//
//  avx2-bytemask  Σ_j (2b_j − 1) q_j = 2 P − S with P = Σ_{b_j=1} q_j: 32 plane bits become a byte
//                 mask (broadcast, vpshufb, compare), the mask selects the int8 activations and
//                 vpmaddubsw sums them; a 32-column chunk is one activation block (QK), so its
//                 scale d_b is applied per chunk. Common case only (one class); the rest goes to
//                 the scalar reference. See kernels_avx512.cpp for the shared algebra (bias = μ − Σ α).
#if defined(__x86_64__) || defined(_M_X64)
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#define AVX2 "avx2,fma,f16c,popcnt"

BB_ISA_BEGIN(AVX2)
namespace bb::avx2 {
namespace {

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

float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// e^x for 8 floats, x clamped to [-87.3, 88.3] (no overflow to inf, no denormals): x = n·ln2 + r,
// |r| ≤ ln2/2, e^r by Cephes' expf polynomial (relative error ~2e-7), 2^n put into the exponent.
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   // ln2 in two parts (Cody-Waite)
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void swiglu_f32(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// hadamard_f32_scalar with 8 lanes: the strides 1, 2, 4 inside a register (the partner lane by a permute, the
// sum kept in the lower lane of each pair and the difference, partner − self, in the upper), the longer
// strides between registers. Blocks below 8 go to the scalar one.
void hadamard_f32(float *x, const float *s, int64_t n, int b) {
    if (b < 8) return hadamard_f32_scalar(x, s, n, b);
    const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt((float)b));
    for (int64_t o = 0; o < n; o += b) {
        float *y = x + o;
        for (int j = 0; j < b; j += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(y + j), _mm256_loadu_ps(s + o + j));
            __m256 w = _mm256_permute_ps(v, 0xB1);   // lanes 1 0 3 2
            v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xAA);
            w = _mm256_permute_ps(v, 0x4E);          // lanes 2 3 0 1
            v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xCC);
            w = _mm256_permute2f128_ps(v, v, 0x01);  // the other half
            v = _mm256_blend_ps(_mm256_add_ps(v, w), _mm256_sub_ps(w, v), 0xF0);
            _mm256_storeu_ps(y + j, v);
        }
        for (int h = 8; h < b; h *= 2)
            for (int j = 0; j < b; j += 2 * h)
                for (int i = j; i < j + h; i += 8) {
                    const __m256 a = _mm256_loadu_ps(y + i), c = _mm256_loadu_ps(y + i + h);
                    _mm256_storeu_ps(y + i, _mm256_add_ps(a, c));
                    _mm256_storeu_ps(y + i + h, _mm256_sub_ps(a, c));
                }
        for (int j = 0; j < b; j += 8) _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(y + j), scale));
    }
}

// softmax_f32_scalar with 8 lanes: the max and the sum in 8 partial lanes (then across them), e^x by exp8.
void softmax_f32(float *s, int64_t n, float scale) {
    const int64_t n8 = n / 8 * 8;
    const __m256 c = _mm256_set1_ps(scale);
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n8; j += 8) {
        const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), c);
        _mm256_storeu_ps(s + j, x);
        m8 = _mm256_max_ps(m8, x);
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, m8);
    float mx = -INFINITY;
    for (float v : t) mx = std::max(mx, v);
    for (int64_t j = n8; j < n; j++) {
        s[j] *= scale;
        mx = std::max(mx, s[j]);
    }
    const __m256 m = _mm256_set1_ps(mx);
    __m256 sum8 = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    _mm256_store_ps(t, sum8);
    float sum = 0;
    for (float v : t) sum += v;
    for (int64_t j = n8; j < n; j++) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
    }
    const float inv = 1.0f / sum;
    const __m256 iv = _mm256_set1_ps(inv);
    for (int64_t j = 0; j < n8; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), iv));
    for (int64_t j = n8; j < n; j++) s[j] *= inv;
}

void to_f16(const float *x, uint16_t *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i *>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = f32_to_f16(x[i]);
}

// Attention rows of the f32 and the f16 KV cache (kernels.h DotsF32Fn, DotsF16Fn): one code over a
// loader of 8 elements (f16 rows widened exactly by vcvtph2ps) and of one.
inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
inline float load1(const float *p) { return *p; }
inline float load1(const uint16_t *p) { return _cvtsh_ss(*p); }
// the last n % 4 scores, one row at a time
inline void dot_row(const float *q, const float *k, int64_t hd, float *out) { *out = dot_f32(q, k, hd); }
inline void dot_row(const float *q, const uint16_t *k, int64_t hd, float *out) { dots_f16_scalar(q, k, 0, 1, hd, out); }

// Four scores at a time: one pass over q for rows j..j+3, their sums reduced together by vhaddps.
template <class T>
void dots_rows(const float *q, const T *K, int64_t stride, int64_t n, int64_t hd, float *out) {
    const int64_t h8 = hd / 8 * 8;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const T *k0 = K + j * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t i = 0; i < h8; i += 8) {
            const __m256 x = _mm256_loadu_ps(q + i);
            s0 = _mm256_fmadd_ps(x, load8(k0 + i), s0);
            s1 = _mm256_fmadd_ps(x, load8(k1 + i), s1);
            s2 = _mm256_fmadd_ps(x, load8(k2 + i), s2);
            s3 = _mm256_fmadd_ps(x, load8(k3 + i), s3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        alignas(16) float v[4];
        _mm_store_ps(v, r);
        for (int64_t i = h8; i < hd; i++) {
            v[0] += q[i] * load1(k0 + i);
            v[1] += q[i] * load1(k1 + i);
            v[2] += q[i] * load1(k2 + i);
            v[3] += q[i] * load1(k3 + i);
        }
        std::memcpy(out + j, v, sizeof v);
    }
    for (; j < n; j++) dot_row(q, K + j * stride, hd, out + j);
}

// 32 outputs at a time held in registers while the rows pass.
template <class T>
void wsum_rows(const float *w, const T *V, int64_t stride, int64_t n, int64_t hd, float *out) {
    int64_t i = 0;
    for (; i + 32 <= hd; i += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < n; j++) {
            const __m256 x = _mm256_set1_ps(w[j]);
            const T *v = V + j * stride + i;
            a0 = _mm256_fmadd_ps(x, load8(v), a0);
            a1 = _mm256_fmadd_ps(x, load8(v + 8), a1);
            a2 = _mm256_fmadd_ps(x, load8(v + 16), a2);
            a3 = _mm256_fmadd_ps(x, load8(v + 24), a3);
        }
        _mm256_storeu_ps(out + i, a0);
        _mm256_storeu_ps(out + i + 8, a1);
        _mm256_storeu_ps(out + i + 16, a2);
        _mm256_storeu_ps(out + i + 24, a3);
    }
    for (; i + 8 <= hd; i += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), load8(V + j * stride + i), a);
        _mm256_storeu_ps(out + i, a);
    }
    for (; i < hd; i++) {
        float a = 0;
        for (int64_t j = 0; j < n; j++) a += w[j] * load1(V + j * stride + i);
        out[i] = a;
    }
}

void dots_f32(const float *q, const float *K, int64_t stride, int64_t n, int64_t hd, float *out) { dots_rows(q, K, stride, n, hd, out); }
void wsum_f32(const float *w, const float *V, int64_t stride, int64_t n, int64_t hd, float *out) { wsum_rows(w, V, stride, n, hd, out); }
void dots_f16(const float *q, const uint16_t *K, int64_t stride, int64_t n, int64_t hd, float *out) { dots_rows(q, K, stride, n, hd, out); }
void wsum_f16(const float *w, const uint16_t *V, int64_t stride, int64_t n, int64_t hd, float *out) { wsum_rows(w, V, stride, n, hd, out); }

// Σ_b d_b · Σ_j q_bj x_bj over the Q8_0 blocks (34 bytes: f16 d, 32 int8) of one row.
float dot_q8(const uint8_t *row, const float *x, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        __m256 s = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * k))));
            s = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * 32 + 8 * k), s);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(dh)), s, acc);
    }
    return hsum256(acc);
}

float dot_q8q8(const uint8_t *row, const int8_t *q, const float *d, int64_t n) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2));
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q + b * 32));
        // |w| (u8) · sign(w)·x (s8): pairs of products ≤ 2·128·127 fit the int16 of vpmaddubsw
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones16);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(dh) * d[b]), acc);
    }
    return hsum256(acc);
}

static_assert(QK == 32, "one 32-column chunk is one activation block");

// ---- dense GEMM (kernels.h GemmDenseFn): F32 / F16 / Q8_0 rows × a block of tokens ----------------------
// R rows × T tokens of dots in R·T accumulators: each weight vector is loaded once per T tokens and each
// activation vector once per R rows (F32 4 × 3: 12 accumulators + 3 activations + 1 weight = the 16 ymm
// registers). x: T tokens' activations, `cols` apart; Y[t·ldy + r].
template <int R, int T>
inline void f32_tile(const float *const *w, const float *x, int64_t cols, float *Y, int64_t ldy) {
    __m256 acc[R][T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
        __m256 xv[T];
        for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(x + t * cols + j);
        for (int r = 0; r < R; r++) {
            const __m256 wv = _mm256_loadu_ps(w[r] + j);
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float s = hsum256(acc[r][t]);
            for (int64_t k = j; k < cols; k++) s += w[r][k] * x[t * cols + k];
            Y[t * ldy + r] = s;
        }
}

// The same for Q8_0 rows (34-byte blocks) × int8 activations, dot_q8q8's block sum per (row, token):
// |w| and w's bytes loaded once per T tokens, each token's block once per R rows.
template <int R, int T>
inline void q8_tile(const uint8_t *const *w, const QActs *a, int64_t nb, float *Y, int64_t ldy) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256 acc[R][T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i xv[T];
        float dx[T];
        for (int t = 0; t < T; t++) {
            xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(a[t].q.data() + b * 32));
            dx[t] = a[t].d[b];
        }
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w[r] + b * 34;
            uint16_t dh;
            std::memcpy(&dh, blk, 2);
            const float dw = _cvtsh_ss(dh);
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + 2)), aw = _mm256_sign_epi8(wv, wv);
            for (int t = 0; t < T; t++) {
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv)), ones16);
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * dx[t]), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) Y[t * ldy + r] = hsum256(acc[r][t]);
}

// Tokens [t0, t1) of R rows: whole tiles of 3 (F32) or 2 (Q8_0) tokens, then the rest.
template <int R>
void f32_tiles(const float *const *w, const float *X, int64_t cols, int t0, int t1, float *Y, int64_t ldy) {
    int t = t0;
    for (; t + 3 <= t1; t += 3) f32_tile<R, 3>(w, X + t * cols, cols, Y + t * ldy, ldy);
    if (t1 - t == 2) f32_tile<R, 2>(w, X + t * cols, cols, Y + t * ldy, ldy);
    if (t1 - t == 1) f32_tile<R, 1>(w, X + t * cols, cols, Y + t * ldy, ldy);
}

template <int R>
void q8_tiles(const uint8_t *const *w, const QActs *a, int64_t nb, int t0, int t1, float *Y, int64_t ldy) {
    int t = t0;
    for (; t + 2 <= t1; t += 2) q8_tile<R, 2>(w, a + t, nb, Y + t * ldy, ldy);
    if (t < t1) q8_tile<R, 1>(w, a + t, nb, Y + t * ldy, ldy);
}

void widen_f16(const uint16_t *h, int64_t n, float *out) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + j))));
    for (; j < n; j++) out[j] = _cvtsh_ss(h[j]);
}

void gemm_dense(const DenseRows &w, const float *X, const QActs *q8, int n_tok, float *Y, int64_t ldy, int64_t r0,
                int64_t r1) {
    const int64_t cols = w.cols, rb = dense_row_bytes(w);
    const bool isq8 = w.type == DT_Q8_0;
    const int tb = dense_token_block(isq8 ? cols + cols / 8 : cols * 4, isq8 ? 2 : 3);
    // One token (decode): one row at a time. Four interleaved row streams from memory ran the 30 MB
    // Q8_0 head of SmolLM2 at half the speed of one (nothing is shared when there is one token).
    thread_local avec<float> wide;   // four F16 rows widened to f32, once per block of tokens
    if (w.type == DT_F16) wide.resize(4 * cols);
    for (int t0 = 0; t0 < n_tok; t0 += tb) {
        const int t1 = std::min(n_tok, t0 + tb);
        for (int64_t r = r0; r < r1; r += 4) {
            const int rn = (int)std::min<int64_t>(4, r1 - r);
            float *Yr = Y + (r - r0);
            const uint8_t *rows[4];
            for (int i = 0; i < rn; i++) rows[i] = w.data + (r + i) * rb;
            if (isq8) {
                if (rn == 4 && n_tok > 1) q8_tiles<4>(rows, q8, cols / 32, t0, t1, Yr, ldy);
                else
                    for (int i = 0; i < rn; i++) q8_tiles<1>(rows + i, q8, cols / 32, t0, t1, Yr + i, ldy);
                continue;
            }
            const float *wf[4];
            for (int i = 0; i < rn; i++) {
                wf[i] = (const float *)rows[i];
                if (w.type == DT_F16) {
                    widen_f16((const uint16_t *)rows[i], cols, wide.data() + i * cols);
                    wf[i] = wide.data() + i * cols;
                }
            }
            if (rn == 4 && n_tok > 1) f32_tiles<4>(wf, X, cols, t0, t1, Yr, ldy);
            else
                for (int i = 0; i < rn; i++) f32_tiles<1>(wf + i, X, cols, t0, t1, Yr + i, ldy);
        }
    }
}

template <int N>
static void bytemask_rows(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    const int G = t.group, nc = G / 32;   // 32-column chunks (activation blocks) per group
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
            __m256 F[N];   // Σ over the group's blocks of d_b · P_ib (per lane)
            for (int i = 0; i < N; i++) F[i] = _mm256_setzero_ps();
            const int8_t *q = a.q.data() + g * G;
            const uint8_t *pg = pl + g * N * (G / 8);
            for (int c = 0; c < nc; c++) {
                const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q + c * 32));
                const __m256 dv = _mm256_set1_ps(a.d[g * nc + c]);
                for (int i = 0; i < N; i++) {
                    const __m256i vb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)load_u32(pg + i * (G / 8) + c * 4)), spread);
                    const __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(vb, bitsel), bitsel);
                    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_and_si256(m, qv)), ones16);
                    F[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dv, F[i]);
                }
            }
            for (int i = 0; i < N; i++) fv = _mm256_fmadd_ps(F[i], _mm256_set1_ps(2.0f * al[g * N + i]), fv);
        }
        y[r - r0] = hsum256(fv) + dot_f32(t.bias.data() + r * ng, a.dS.data(), ng);
    }
}

using RowsFn = void (*)(const BBTensor &, const QActs &, float *, int64_t, int64_t);

static RowsFn bytemask_fn(int n) {
    return with_planes(n, [](auto P) -> RowsFn { return bytemask_rows<decltype(P)::value>; });
}

static void gemv_bytemask(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (t.n_classes != 1 || t.bias.empty()) return gemv_scalar(t, a, y, r0, r1);
    bytemask_fn(t.n_planes)(t, a, y, r0, r1);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

// Prompt processing: a block of rows stays in L1 while every token passes over it.
static void gemm_bytemask(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.n_classes != 1 || t.bias.empty()) return gemm_scalar(t, acts, n_tok, Y, ldy, r0, r1);
    constexpr int64_t ROW_BLOCK = 16;
    const RowsFn fn = bytemask_fn(t.n_planes);
    for (int64_t rb = r0; rb < r1; rb += ROW_BLOCK) {
        const int64_t re = std::min(r1, rb + ROW_BLOCK);
        for (int k = 0; k < n_tok; k++) fn(t, acts[k], Y + k * ldy + (rb - r0), rb, re);
    }
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

// ---- avx2-lut: table lookup (T-MAC; layout and algebra in kernels_lut.cpp) -----------------------
//
// One 32-byte load holds the nibbles of 32 rows × 8 columns of one plane (lane 0: columns 4p..4p+3,
// lane 1: 4p+4..4p+7; rows j and j + 16 in the low and high nibble of byte j), so vpshufb on the pair's
// tables (lane 0 the even group's, lane 1 the odd group's) looks up 8 weights per byte pair; the low
// and high table bytes are interleaved back into int16 (vpunpck*bw) and added for one activation block
// (|·| ≤ 4·508), then widened and scaled by d_b.

constexpr const char *REPACK_LUT = "avx2-lut";

void repack_lut(BBTensor &t) { lut_repack(t, REPACK_LUT); }

// The activation tables of one token: per pair of 4-column groups, 32 low bytes then 32 high bytes
// (lane 0: columns 4p..4p+3, lane 1: 4p+4..4p+7), matching the repacked weights. An entry m of a
// group is Σ_k bit_k(m) q_k: vpmaddubsw of 0/1 coefficient bytes with the group's 4 activations
// broadcast, summed by vpmaddwd. Coefficient lanes hold entries 0-3 | 8-11 and 4-7 | 12-15, so that
// vpackssdw leaves the 16 entries in order. Equal to lut_tables_scalar (test_kernels: scalar-lut).
// 0/1 coefficient bytes: entries m0..m0+3 in lane 0, m1..m1+3 in lane 1, 4 bytes (bits 0..3) each
__m256i lut_coef(int m0, int m1) {
    alignas(32) uint8_t c[32];
    for (int e = 0; e < 8; e++)
        for (int k = 0; k < 4; k++) c[e * 4 + k] = (uint8_t)((((e < 4 ? m0 + e : m1 + e - 4) >> k) & 1));
    return _mm256_load_si256(reinterpret_cast<const __m256i *>(c));
}

// The 16 int16 table entries of the 4-column group at q, in order.
inline __m256i lut_entries(const int8_t *q, __m256i c1, __m256i c2) {
    const __m256i ones16 = _mm256_set1_epi16(1), x = _mm256_set1_epi32((int)load_u32(q));
    return _mm256_packs_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(c1, x), ones16),
                              _mm256_madd_epi16(_mm256_maddubs_epi16(c2, x), ones16));
}

void build_lut(const QActs &a, uint8_t *T) {
    const int64_t cols_pad = a.ngroups * a.group;
    const __m256i c1 = lut_coef(0, 8), c2 = lut_coef(4, 12), byte = _mm256_set1_epi16(0xff);
    for (int64_t p = 0; p < cols_pad / 8; p++) {
        const __m256i A = lut_entries(a.q.data() + p * 8, c1, c2), B = lut_entries(a.q.data() + p * 8 + 4, c1, c2);
        const __m256i lo = _mm256_packus_epi16(_mm256_and_si256(A, byte), _mm256_and_si256(B, byte));
        const __m256i hi = _mm256_packus_epi16(_mm256_srli_epi16(A, 8), _mm256_srli_epi16(B, 8));
        _mm256_store_si256(reinterpret_cast<__m256i *>(T + p * 64), _mm256_permute4x64_epi64(lo, 0xD8));
        _mm256_store_si256(reinterpret_cast<__m256i *>(T + p * 64 + 32), _mm256_permute4x64_epi64(hi, 0xD8));
    }
}

void prepare_lut(QActs &a) {
    a.lut.resize((size_t)lut_table_bytes(a));
    build_lut(a, a.lut.data());
}

// Software prefetch of the tile's three streams (plane nibbles, 2α, μ; kernels.h), kernels.h LUT_PREFETCH
// bytes ahead in the nibbles and as many (group, plane) steps ahead in the others: they advance
// 512 : 64 : 64/N bytes per (group, plane) at G = 128, and the layout puts tile rt + 1 right after tile
// rt in each. Harmless past the end (a prefetch never faults).
inline void prefetch2(const void *p) {   // the two cache lines at p
    _mm_prefetch(static_cast<const char *>(p), _MM_HINT_T0);
    _mm_prefetch(static_cast<const char *>(p) + 64, _MM_HINT_T0);
}

// 8 f16 as floats (vcvtph2ps, exact)
inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }

// y of the 32 rows of tile rt (out[32]) for one token.
template <int N>
void lut_tile(const BBTensor &t, const LutLayout &L, const QActs &a, const uint8_t *T, int64_t rt, float *out) {
    const int G = t.group, gb = G / 8, nb = G / QK;
    const int64_t ng = t.ngroups;
    const uint8_t *W = t.repacked.data();
    const uint16_t *A = reinterpret_cast<const uint16_t *>(W + L.alpha_off);
    const uint16_t *M = L.mu_off < 0 ? nullptr : reinterpret_cast<const uint16_t *>(W + L.mu_off);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256 fv[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *Tg = T + g * gb * 64;
        const __m256 dS = _mm256_set1_ps(a.dS[g]), half_dS = _mm256_set1_ps(-0.5f * a.dS[g]);
        for (int i = 0; i < N; i++) {
            const uint8_t *w = W + ((rt * ng + g) * N + i) * gb * 32;
            __m256 F[4] = {half_dS, half_dS, half_dS, half_dS};
            for (int b = 0; b < nb; b++) {
                prefetch2(w + b * 128 + LUT_PREFETCH);
                __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
                // unrolled: 6% faster GEMV on a Zen 4 (results.md §35; gcc kept a loop with register copies)
#pragma GCC unroll 4
                for (int p = b * 4; p < b * 4 + 4; p++) {
                    const __m256i tl = _mm256_load_si256(reinterpret_cast<const __m256i *>(Tg + p * 64));
                    const __m256i th = _mm256_load_si256(reinterpret_cast<const __m256i *>(Tg + p * 64 + 32));
                    const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i *>(w + p * 32));
                    const __m256i il = _mm256_and_si256(wv, low4), ih = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
                    const __m256i l0 = _mm256_shuffle_epi8(tl, il), h0 = _mm256_shuffle_epi8(th, il);
                    const __m256i l1 = _mm256_shuffle_epi8(tl, ih), h1 = _mm256_shuffle_epi8(th, ih);
                    acc[0] = _mm256_add_epi16(acc[0], _mm256_unpacklo_epi8(l0, h0));   // rows 0-7 (lane: column half)
                    acc[1] = _mm256_add_epi16(acc[1], _mm256_unpackhi_epi8(l0, h0));   // rows 8-15
                    acc[2] = _mm256_add_epi16(acc[2], _mm256_unpacklo_epi8(l1, h1));   // rows 16-23
                    acc[3] = _mm256_add_epi16(acc[3], _mm256_unpackhi_epi8(l1, h1));   // rows 24-31
                }
                // add the two column halves: rows 0-15 and 16-31 as int16
                const __m256i s01 = _mm256_add_epi16(_mm256_permute2x128_si256(acc[0], acc[1], 0x20),
                                                     _mm256_permute2x128_si256(acc[0], acc[1], 0x31));
                const __m256i s23 = _mm256_add_epi16(_mm256_permute2x128_si256(acc[2], acc[3], 0x20),
                                                     _mm256_permute2x128_si256(acc[2], acc[3], 0x31));
                const __m256 d = _mm256_set1_ps(a.d[g * nb + b]);
                F[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s01))), d, F[0]);
                F[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(s01, 1))), d, F[1]);
                F[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(s23))), d, F[2]);
                F[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(s23, 1))), d, F[3]);
            }
            const uint16_t *al = A + ((rt * ng + g) * N + i) * LUT_ROWS;
            prefetch2(al + LUT_PREFETCH / 16);
            for (int k = 0; k < 4; k++) fv[k] = _mm256_fmadd_ps(F[k], load8_f16(al + 8 * k), fv[k]);
        }
        if (M) {
            const uint16_t *mu = M + (rt * ng + g) * LUT_ROWS;
            prefetch2(mu + LUT_PREFETCH / 16 / N);
            for (int k = 0; k < 4; k++) fv[k] = _mm256_fmadd_ps(load8_f16(mu + 8 * k), dS, fv[k]);
        }
    }
    for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + 8 * k, fv[k]);
}

LutTileFn lut_fn(int n) {
    return with_planes(n, [](auto P) -> LutTileFn { return lut_tile<decltype(P)::value>; });
}

void gemv_lut(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (t.repacked_for != REPACK_LUT) return gemv_bytemask(t, a, y, r0, r1);
    lut_rows(t, &a, 1, y, 0, r0, r1, lut_fn(t.n_planes), build_lut);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

void gemm_lut(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.repacked_for != REPACK_LUT) return gemm_bytemask(t, acts, n_tok, Y, ldy, r0, r1);
    lut_rows(t, acts, n_tok, Y, ldy, r0, r1, lut_fn(t.n_planes), build_lut);
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

// ---- GEMM: tokens in the lanes (kernels_tokens.inc; the measured alternative, bench kernels) --------
//
// 8 tokens × 4 int8 activations a ymm; vpmaddubsw gives b_0 q_0 + b_1 q_1 per token pair (|·| ≤ 254)
// and the 8 steps of one activation block (QK = 32 columns) add in int16 (≤ 2032) before vpmaddwd
// widens them: P_i per token exactly.

#include "kernels_tokens.inc"

// Plane bits of rows [r, r + nr) as 0/1 bytes [nr][N][stride].
static void unpack_bits_tokens(const BBTensor &t, int64_t r, int nr, uint8_t *B) {
    const int N = t.n_planes, G = t.group;
    const int64_t ng = t.ngroups, cp = sign_stride(t);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bitsel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i ones8 = _mm256_set1_epi8(1);
    for (int rr = 0; rr < nr; rr++) {
        const uint8_t *pl = t.planes + (r + rr) * ng * N * (G / 8);
        for (int64_t g = 0; g < ng; g++)
            for (int i = 0; i < N; i++) {
                const uint8_t *bits = pl + (g * N + i) * (G / 8);
                for (int c = 0; c < G / 32; c++) {
                    const __m256i vb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)load_u32(bits + c * 4)), spread);
                    const __m256i m = _mm256_cmpeq_epi8(_mm256_and_si256(vb, bitsel), bitsel);   // 0xff where set
                    _mm256_storeu_si256(reinterpret_cast<__m256i *>(B + (rr * N + i) * cp + g * G + c * 32), _mm256_and_si256(m, ones8));
                }
            }
    }
}

struct TokAvx2 {
    static constexpr int LANES = 8, ROWS = 4;   // 3·4 ymm of sums + activations, scales, ones: the 16 registers
    using I = __m256i;
    using F = __m256;
    static I zero_i() { return _mm256_setzero_si256(); }
    static F zero_f() { return _mm256_setzero_ps(); }
    static I load_x(const int8_t *p) { return _mm256_load_si256(reinterpret_cast<const __m256i *>(p)); }
    static F load_f(const float *p) { return _mm256_load_ps(p); }
    static F set1_f(float x) { return _mm256_set1_ps(x); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static void store_f(float *p, F v) { _mm256_store_ps(p, v); }
    static I dot(I acc, int32_t w, I x) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(_mm256_set1_epi32(w), x)); }
    static F to_f(I acc) { return _mm256_cvtepi32_ps(_mm256_madd_epi16(acc, _mm256_set1_epi16(1))); }
    static void unpack_bits(const BBTensor &t, int64_t r, int nr, uint8_t *B) { unpack_bits_tokens(t, r, nr, B); }
};

// Tensors the lookup layout does not hold, and too few tokens to fill the lanes, go to the lookup
// GEMV's own GEMM (the same floats).
void gemm_lut_tokens8(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.repacked_for != REPACK_LUT || n_tok < 4) return gemm_lut(t, acts, n_tok, Y, ldy, r0, r1);
    gemm_tokens<TokAvx2>(t, acts, n_tok, Y, ldy, r0, r1);
}

}  // namespace
}  // namespace bb::avx2
BB_ISA_END

namespace bb {

void add_kernels_avx2(std::vector<Kernel> &v) {
    using namespace avx2;
    // Each GEMM computes its GEMV's floats (a token's result does not depend on its batch).
    // "avx2-lut-tokens": the lookup GEMV with the tokens-in-lanes GEMM (the measured alternative, bench kernels)
    v.push_back(Kernel{"avx2-lut", "avx2", AVX2, gemv_lut, gemm_lut, dot_f32, dot_q8, dot_q8q8, repack_lut, prepare_lut,
                       dots_f32, wsum_f32, swiglu_f32, gemm_dense, softmax_f32, dots_f16, wsum_f16, to_f16,
                       hadamard_f32});
    v.push_back(Kernel{"avx2-lut-tokens", "avx2", AVX2, gemv_lut, gemm_lut_tokens8, dot_f32, dot_q8, dot_q8q8, repack_lut, prepare_lut,
                       dots_f32, wsum_f32, swiglu_f32, gemm_dense, softmax_f32, dots_f16, wsum_f16, to_f16,
                       hadamard_f32});
    v.push_back(Kernel{"avx2-bytemask", "avx2", AVX2, gemv_bytemask, gemm_bytemask, dot_f32, dot_q8, dot_q8q8, nullptr, nullptr,
                       dots_f32, wsum_f32, swiglu_f32, gemm_dense, softmax_f32, dots_f16, wsum_f16, to_f16,
                       hadamard_f32});
}

}  // namespace bb
#endif  // x86-64
