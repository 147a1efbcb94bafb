// The scalar reference kernel: every flag and class of formats/binary_basis_v1.md, written to read
// like the spec. SIMD kernels are tested against it and fall back to it for exotic flags.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace bb {

float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {                 // inf / nan
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {             // normal
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {             // ±0
        bits = sign;
    } else {                           // subnormal: renormalize
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

void quantize_acts(const float *x, int64_t cols, int group, const float *colscale, QActs &out) {
    const int64_t ng = (cols + group - 1) / group, n = ng * group, nb = n / QK;
    out.group = group;
    out.cols = cols;
    out.ngroups = ng;
    out.nblocks = nb;
    out.lut.clear();
    out.x.assign(n, 0.0f);
    out.q.assign(n, 0);
    out.d.assign(nb, 0.0f);
    out.qsum.assign(nb, 0);
    out.dS.assign(ng, 0.0f);
    std::memcpy(out.x.data(), x, cols * sizeof(float));
    // Written so that the baseline (SSE2) compiler vectorizes it: no libm call per element (std::nearbyint
    // is one without SSE4.1), the NaN test kept apart from the max. Rounding: adding and subtracting
    // 1.5·2^23 rounds |v| < 2^22 to the nearest integer, ties to even — exactly what nearbyint does in
    // the default rounding mode (|v| ≤ 127 here), so every kernel sees the same q as before.
    constexpr float ROUND = 12582912.0f;
    float xs[QK];
    for (int64_t b = 0; b < nb; b++) {
        const int64_t c0 = b * QK, c1 = std::min<int64_t>(cols, c0 + QK), m = c1 - c0;
        if (colscale)
            for (int64_t j = 0; j < m; j++) xs[j] = x[c0 + j] * colscale[c0 + j];
        else
            for (int64_t j = 0; j < m; j++) xs[j] = x[c0 + j];
        float amax = 0.0f;
        int nan = 0;
        for (int64_t j = 0; j < m; j++) {
            const float a = std::fabs(xs[j]);
            amax = a > amax ? a : amax;
            nan |= a != a;   // a NaN must zero the block: left in xs it would make the int conversion undefined
        }
        if (nan || !(amax > 0.0f) || !std::isfinite(amax)) continue;  // all zero (or non-finite): q = 0, d = 0
        const float id = 127.0f / amax;
        if (!std::isfinite(id)) continue;  // amax so tiny (subnormal) that 127/amax overflows: q = 0, d = 0
        int32_t s = 0;
        int8_t *q = out.q.data() + c0;
        for (int64_t j = 0; j < m; j++) {
            float v = (xs[j] * id + ROUND) - ROUND;
            v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
            q[j] = (int8_t)(int)v;
            s += (int)v;
        }
        out.d[b] = amax / 127.0f;
        out.qsum[b] = s;
    }
    for (int64_t b = 0; b < nb; b++) out.dS[b * QK / group] += out.d[b] * (float)out.qsum[b];
}

static void prepare_sparse(BBTensor &t);

// Dense dot products (f32, and Q8_0 rows dequantized on the fly: all in float, so F32/F16/Q8_0
// weights give what the float reference gives), with fixed-width partial sums the compiler can
// vectorize for the baseline ISA.
float dot_f32_scalar(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void hadamard_f32_scalar(float *x, const float *s, int64_t n, int b) {
    for (int64_t i = 0; i < n; i++) x[i] *= s[i];
    for (int64_t o = 0; o < n; o += b)
        for (int h = 1; h < b; h *= 2)
            for (int64_t j = o; j < o + b; j += 2 * h)
                for (int64_t i = j; i < j + h; i++) {
                    const float a = x[i], c = x[i + h];
                    x[i] = a + c;
                    x[i + h] = a - c;
                }
    const float scale = 1.0f / std::sqrt((float)b);
    for (int64_t i = 0; i < n; i++) x[i] *= scale;
}

void swiglu_f32_scalar(float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// Round to nearest even, overflow to inf, subnormals exact (F. Giesen's float_to_half_fast3_rtne); NaN
// gives a quiet NaN.
uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint16_t o;
    if (x >= (127u + 16) << 23) {   // ≥ 2^16: inf, or NaN
        o = x > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (x < 113u << 23) {     // below f16's smallest normal: the float adder rounds at 2^-24
        const uint32_t magic_u = ((127u - 15) + (23 - 10) + 1) << 23;
        float fx, magic;
        std::memcpy(&fx, &x, 4);
        std::memcpy(&magic, &magic_u, 4);
        fx += magic;
        uint32_t r;
        std::memcpy(&r, &fx, 4);
        o = (uint16_t)(r - magic_u);
    } else {                          // rebias the exponent, round the 13 dropped bits to even
        const uint32_t odd = (x >> 13) & 1;
        x += ((uint32_t)(15 - 127) << 23) + 0xfff + odd;
        o = (uint16_t)(x >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

void to_f16_scalar(const float *x, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = f32_to_f16(x[i]);
}

void dots_f16_scalar(const float *q, const uint16_t *K, int64_t stride, int64_t n, int64_t hd, float *out) {
    for (int64_t j = 0; j < n; j++) {
        float s = 0;
        for (int64_t i = 0; i < hd; i++) s += q[i] * f16_to_f32(K[j * stride + i]);
        out[j] = s;
    }
}

void wsum_f16_scalar(const float *w, const uint16_t *V, int64_t stride, int64_t n, int64_t hd, float *out) {
    std::fill(out, out + hd, 0.0f);
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < hd; i++) out[i] += w[j] * f16_to_f32(V[j * stride + i]);
}

void softmax_f32_scalar(float *s, int64_t n, float scale) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        s[j] *= scale;
        mx = std::max(mx, s[j]);
    }
    float sum = 0;
    for (int64_t j = 0; j < n; j++) {
        s[j] = std::exp(s[j] - mx);
        sum += s[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

void dots_f32_scalar(const float *q, const float *K, int64_t stride, int64_t n, int64_t hd, float *out) {
    for (int64_t j = 0; j < n; j++) out[j] = dot_f32_scalar(q, K + j * stride, hd);
}

void wsum_f32_scalar(const float *w, const float *V, int64_t stride, int64_t n, int64_t hd, float *out) {
    std::fill(out, out + hd, 0.0f);
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < hd; i++) out[i] += w[j] * V[j * stride + i];
}

// Σ_b d_b · Σ_j q_bj x_bj over the Q8_0 blocks (34 bytes: f16 d, 32 int8) of one row.
float dot_q8_scalar(const uint8_t *row, const float *x, int64_t n) {
    float total = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const int8_t *q = (const int8_t *)(blk + 2);
        const float *xb = x + b * 32;
        float acc[16] = {0};
        for (int j = 0; j < 16; j++) acc[j] = (float)q[j] * xb[j] + (float)q[16 + j] * xb[16 + j];
        float s = 0;
        for (int j = 0; j < 16; j++) s += acc[j];
        total += f16_to_f32(dh) * s;
    }
    return total;
}

float dot_q8q8_scalar(const uint8_t *row, const int8_t *q, const float *d, int64_t n) {
    float total = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        const uint8_t *blk = row + b * 34;
        uint16_t dh;
        std::memcpy(&dh, blk, 2);
        const int8_t *w = (const int8_t *)(blk + 2);
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += (int32_t)w[j] * q[b * 32 + j];
        total += f16_to_f32(dh) * d[b] * (float)s;
    }
    return total;
}

int64_t dense_row_bytes(const DenseRows &w) {
    return w.type == DT_F32 ? w.cols * 4 : w.type == DT_F16 ? w.cols * 2 : w.cols / 32 * 34;
}

int dense_token_block(int64_t bytes_per_token, int multiple) {
    const int64_t n = std::max<int64_t>(1, ((int64_t)128 << 10) / std::max<int64_t>(1, bytes_per_token) / multiple);
    return (int)std::min<int64_t>(n * multiple, 1 << 16);
}

void gemm_dense_dots(const DenseRows &w, const float *X, const QActs *q8, int n_tok, float *Y, int64_t ldy, int64_t r0,
                     int64_t r1, DotF32Fn dot_f32, DotQ8Q8Fn dot_q8q8) {
    const int64_t cols = w.cols, rb = dense_row_bytes(w);
    const int tb = dense_token_block(w.type == DT_Q8_0 ? cols + cols / 8 : cols * 4, 1);
    thread_local std::vector<float> wide;   // an F16 row widened to f32, once per block of tokens
    wide.resize(cols);
    for (int t0 = 0; t0 < n_tok; t0 += tb) {
        const int t1 = std::min(n_tok, t0 + tb);
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row = w.data + r * rb;
            if (w.type == DT_Q8_0) {
                for (int t = t0; t < t1; t++) Y[t * ldy + r - r0] = dot_q8q8(row, q8[t].q.data(), q8[t].d.data(), cols);
                continue;
            }
            const float *wr = (const float *)row;
            if (w.type == DT_F16) {
                for (int64_t j = 0; j < cols; j++) wide[j] = f16_to_f32(((const uint16_t *)row)[j]);
                wr = wide.data();
            }
            for (int t = t0; t < t1; t++) Y[t * ldy + r - r0] = dot_f32(wr, X + t * cols, cols);
        }
    }
}

void bb_prepare(BBTensor &t, const std::string &isa) {
    if (t.rows < 1 || t.cols < 1 || t.n_planes < 1 || t.n_planes > 8 || t.group < 64 || t.group % 64)
        throw std::runtime_error("bb_prepare: invalid binary-basis header");
    const int N = t.n_planes, C = t.n_classes, S = (t.flags & F_POW2) ? 1 : N;
    t.ngroups = (t.cols + t.group - 1) / t.group;
    const int64_t rg = t.rows * t.ngroups;
    t.scales.resize(rg * C * N);
    for (int64_t k = 0; k < rg * C; k++)
        for (int i = 0; i < N; i++)   // POW2: α_i = α_0 · 2^i (exact in f32)
            t.scales[k * N + i] = (t.flags & F_POW2) ? f16_to_f32(t.scales_f16[k]) * (float)(1u << i)
                                                     : f16_to_f32(t.scales_f16[k * S + i]);
    t.offsets.clear();
    if (t.flags & F_OFFSET) {
        t.offsets.resize(rg * C);
        for (int64_t k = 0; k < rg * C; k++) t.offsets[k] = f16_to_f32(t.offsets_f16[k]);
    }
    t.colscale.clear();
    if (t.flags & F_COLSCALE) {
        t.colscale.resize(t.cols);
        for (int64_t j = 0; j < t.cols; j++) t.colscale[j] = f16_to_f32(t.colscale_f16[j]);
    }
    t.bias.clear();
    if (C == 1) {
        t.bias.resize(rg);
        for (int64_t k = 0; k < rg; k++) {
            float b = t.offsets.empty() ? 0.0f : t.offsets[k];
            for (int i = 0; i < N; i++) b -= t.scales[k * N + i];
            t.bias[k] = b;
        }
    }
    t.sparse_row_start.clear();
    t.sparse_col.clear();
    t.sparse_dense.clear();
    if (t.flags & F_SPARSE) prepare_sparse(t);
    bb_repack(t, isa);
}

static inline bool bit(const uint8_t *p, int64_t j) { return (p[j >> 3] >> (j & 7)) & 1; }

// Class of column j (within group g's G/8-byte runs) of row r: spec "class c = ...".
static inline int class_of(const BBTensor &t, int64_t r, int64_t g, int j) {
    const int64_t gb = t.group / 8;
    if (t.colmask && bit(t.colmask + g * gb, j)) return 1;
    if (t.elemclass && bit(t.elemclass + (r * t.ngroups + g) * gb, j)) return t.n_classes - 1;
    return 0;
}

// Debugging aid, not a kernel: BITBASIS_DEBUG_FLOAT_ACTS=1 with BITBASIS_ISA=scalar makes the scalar
// reference multiply the dequantized weights (spec formula, sparse values included) by the float
// activations, skipping the int8 activation quantization. It isolates that quantization's share of
// the engine's difference from the float PyTorch reference.
static void gemv_float_acts(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    const int N = t.n_planes, C = t.n_classes, G = t.group;
    const int64_t gb = G / 8, nb = t.ngroups * gb;
    const bool off = !t.offsets.empty();
    for (int64_t r = r0; r < r1; r++) {
        double acc = 0.0;
        int64_t idx = t.sparse_row_start.empty() ? 0 : t.sparse_row_start[r];
        for (int64_t col = 0; col < t.cols; col++) {
            const int64_t g = col / G;
            const int j = (int)(col % G);
            if (t.sparse_mask && bit(t.sparse_mask + r * nb, col)) {
                acc += (double)(f16_to_f32(t.sparse_zs[2 * r]) * (float)t.sparse_codes[idx++] + f16_to_f32(t.sparse_zs[2 * r + 1])) * a.x[col];
                continue;
            }
            const int c = C == 1 ? 0 : class_of(t, r, g, j);
            const uint8_t *pl = t.planes + (r * t.ngroups + g) * N * gb;
            const float *al = t.scales.data() + ((r * t.ngroups + g) * C + c) * N;
            double w = off ? t.offsets[(r * t.ngroups + g) * C + c] : 0.0;
            for (int i = 0; i < N; i++) w += bit(pl + i * gb, j) ? al[i] : -al[i];
            acc += w * a.x[col] * (t.colscale.empty() ? 1.0 : (double)t.colscale[col]);
        }
        y[r - r0] = (float)acc;
    }
}

void gemv_scalar(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    static const bool float_acts = [] {
        const char *e = std::getenv("BITBASIS_DEBUG_FLOAT_ACTS");
        return e && *e && std::string(e) != "0";
    }();
    if (float_acts) return gemv_float_acts(t, a, y, r0, r1);
    const int N = t.n_planes, C = t.n_classes, G = t.group;
    const int64_t gb = G / 8;
    const bool off = !t.offsets.empty();
    for (int64_t r = r0; r < r1; r++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < t.ngroups; g++) {
            const uint8_t *pl = t.planes + (r * t.ngroups + g) * N * gb;
            const float *al = t.scales.data() + (r * t.ngroups + g) * C * N;
            for (int b = 0; b < G / QK; b++) {   // activation blocks of the group
                int32_t S[3] = {0, 0, 0}, P[3][8] = {};
                const int8_t *q = a.q.data() + g * G;
                for (int j = b * QK; j < (b + 1) * QK; j++) {
                    const int c = C == 1 ? 0 : class_of(t, r, g, j);
                    S[c] += q[j];
                    for (int i = 0; i < N; i++)
                        if (bit(pl + i * gb, j)) P[c][i] += q[j];
                }
                // Σ_j (Σ_i α_i s_ij + μ) q_j = Σ_i α_i (2 P_i − S) + μ S, per class; integers exact.
                float part = 0.0f;
                for (int c = 0; c < C; c++) {
                    for (int i = 0; i < N; i++) part += al[c * N + i] * (float)(2 * P[c][i] - S[c]);
                    if (off) part += t.offsets[(r * t.ngroups + g) * C + c] * (float)S[c];
                }
                acc += a.d[g * (G / QK) + b] * part;
            }
        }
        y[r - r0] = acc;
    }
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

void gemm_scalar(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    for (int k = 0; k < n_tok; k++) gemv_scalar(t, acts[k], Y + k * ldy, r0, r1);
}

// Each sparse element's column and the dense value it replaces (spec order: planes ascending, then
// μ), computed once here so that the kernels' correction is a plain sparse dot product.
static void prepare_sparse(BBTensor &t) {
    const int N = t.n_planes, C = t.n_classes, G = t.group;
    const int64_t gb = G / 8, nb = t.ngroups * gb;
    const bool off = !t.offsets.empty();
    t.sparse_row_start.assign(t.rows + 1, 0);
    for (int64_t r = 0; r < t.rows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            for (uint32_t bits = t.sparse_mask[r * nb + b]; bits; bits &= bits - 1) {
                const int64_t col = b * 8 + __builtin_ctz(bits), g = col / G;
                const int j = (int)(col % G), c = C == 1 ? 0 : class_of(t, r, g, j);
                const uint8_t *pl = t.planes + (r * t.ngroups + g) * N * gb;
                const float *al = t.scales.data() + ((r * t.ngroups + g) * C + c) * N;
                float dense = 0.0f;
                for (int i = 0; i < N; i++) dense += bit(pl + i * gb, j) ? al[i] : -al[i];
                if (off) dense += t.offsets[(r * t.ngroups + g) * C + c];
                t.sparse_col.push_back((uint32_t)col);
                t.sparse_dense.push_back(dense);
            }
        }
        t.sparse_row_start[r + 1] = (int64_t)t.sparse_col.size();
    }
}

void add_sparse(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float zs = f16_to_f32(t.sparse_zs[2 * r]), zm = f16_to_f32(t.sparse_zs[2 * r + 1]);
        float acc = 0.0f;
        for (int64_t e = t.sparse_row_start[r]; e < t.sparse_row_start[r + 1]; e++) {
            const uint32_t col = t.sparse_col[e];
            const float v = zs * (float)t.sparse_codes[e] + zm;
            acc += v * a.x[col] - t.sparse_dense[e] * (a.d[col / QK] * (float)a.q[col]);
        }
        y[r - r0] += acc;
    }
}

// The same for n_tok tokens at once. The activations are transposed to [column][token] first, so the
// inner loop runs over contiguous tokens (vectorizable) and each sparse element is read once, not
// once per token; the sums are the ones add_sparse forms for each token, in the same order.
void add_sparse_gemm(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (n_tok == 1) return add_sparse(t, acts[0], Y, r0, r1);
    thread_local std::vector<float> xt, xqt, acc;
    const int64_t cols = t.cols;
    xt.resize(cols * n_tok);
    xqt.resize(cols * n_tok);
    acc.resize(n_tok);
    for (int k = 0; k < n_tok; k++)
        for (int64_t j = 0; j < cols; j++) {
            xt[j * n_tok + k] = acts[k].x[j];
            xqt[j * n_tok + k] = acts[k].d[j / QK] * (float)acts[k].q[j];
        }
    for (int64_t r = r0; r < r1; r++) {
        const float zs = f16_to_f32(t.sparse_zs[2 * r]), zm = f16_to_f32(t.sparse_zs[2 * r + 1]);
        std::fill(acc.begin(), acc.end(), 0.0f);
        float *__restrict ac = acc.data();
        for (int64_t e = t.sparse_row_start[r]; e < t.sparse_row_start[r + 1]; e++) {
            const int64_t col = t.sparse_col[e];
            const float v = zs * (float)t.sparse_codes[e] + zm, dn = t.sparse_dense[e];
            const float *__restrict xa = xt.data() + col * n_tok, *__restrict xb = xqt.data() + col * n_tok;
            for (int k = 0; k < n_tok; k++) ac[k] += v * xa[k] - dn * xb[k];
        }
        for (int k = 0; k < n_tok; k++) Y[k * ldy + (r - r0)] += ac[k];
    }
}

}  // namespace bb
