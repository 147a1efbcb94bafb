// Table-lookup (T-MAC) kernels: what every ISA shares — the repacked weight layout, the activation
// tables, the row/token driver — and "scalar-lut", the plain C++ reference of the lookup itself (the
// AVX2 and NEON tile functions must equal it; test_kernels checks all of them against gemv_scalar).
//
// Algebra (kernels.h): y = Σ_g [Σ_i 2 α_i Σ_b d_b P_ib] + (μ − Σ_i α_i)·dS_g, P_ib = Σ_{j ∈ b, bit_i(j)=1} q_j.
// For 4 columns the 16 partial sums P[m] = Σ_{k: bit k of m} q_k of the int8 activations are one table;
// a row's 4 plane bits of those columns (a nibble) index it, so a 16-entry byte lookup (vpshufb, tbl)
// handles 4 weights. |P| ≤ 4·127 needs 16 bits: each table is kept as its low and its high bytes,
// looked up twice and put back together — exact, so these kernels equal the scalar reference
// (T-MAC instead quantizes the table to 8 bits, which would not be).
#include "kernels.h"

#include <algorithm>
#include <cstring>

namespace bb {

LutLayout::LutLayout(const BBTensor &t, int64_t tile_rows) : rows(tile_rows) {
    ntiles = (t.rows + rows - 1) / rows;
    plane_bytes = ntiles * t.ngroups * t.n_planes * (t.group / 4) * (rows / 2);
    alpha_off = plane_bytes;
    const int64_t mu = alpha_off + ntiles * t.ngroups * t.n_planes * rows * 2;
    mu_off = t.offsets.empty() ? -1 : mu;
    total = mu + (t.offsets.empty() ? 0 : ntiles * t.ngroups * rows * 2);
}

// Where row j of a tile keeps its nibble of a 4-column group: the byte (of rows / 2) and the shift.
// 32 rows: byte j % 16, low nibble for j < 16. 64 rows (one 256-bit vpshufb of one column group's
// table, broadcast to both lanes, then vpunpck{l,h}bw with the high table bytes): row j = 16 z + 8 L + m
// sits in lane L, byte (z & 1)·8 + m, nibble z / 2, so that the four int16 sums that vpunpck gives,
// (low nibbles: bytes 0-7, 8-15; high: 0-7, 8-15), each widened to 16 int32 lanes, are rows 16z..16z+15
// in order (kernels_avx512.cpp lut_tile64).
static inline void lut_nibble(int64_t rows, int64_t j, int64_t &byte, int &shift) {
    if (rows == LUT_ROWS) {
        byte = j % 16, shift = j < 16 ? 0 : 4;
    } else {
        const int64_t z = j / 16, L = (j % 16) / 8, m = j % 8;
        byte = L * 16 + (z & 1) * 8 + m, shift = (int)(z / 2) * 4;
    }
}

// x as f16 when f16 holds it exactly (the file's α and μ are f16, so only a hostile file fails this)
static bool exact_f16(float x, uint16_t &h) {
    h = f32_to_f16(x);
    return f16_to_f32(h) == x;
}

void lut_repack(BBTensor &t, const char *kernel, int64_t tile_rows) {
    if (t.n_classes != 1) return;   // classes: the kernels hand these to the scalar path
    const LutLayout L(t, tile_rows);
    const int64_t R = L.rows, cb = R / 2;   // bytes per 4-column group
    const int N = t.n_planes, G = t.group, gb = G / 8;
    const int64_t ng = t.ngroups;
    avec<uint8_t> W((size_t)L.total, 0);
    uint16_t *A = reinterpret_cast<uint16_t *>(W.data() + L.alpha_off);
    uint16_t *M = L.mu_off < 0 ? nullptr : reinterpret_cast<uint16_t *>(W.data() + L.mu_off);
    for (int64_t r = 0; r < t.rows; r++) {
        const int64_t rt = r / R, j = r % R;
        int64_t byte;
        int shift;
        lut_nibble(R, j, byte, shift);
        for (int64_t g = 0; g < ng; g++) {
            for (int i = 0; i < N; i++) {
                const uint8_t *bits = t.planes + ((r * ng + g) * N + i) * gb;
                uint8_t *dst = W.data() + ((rt * ng + g) * N + i) * (G / 4) * cb;
                for (int c4 = 0; c4 < G / 4; c4++) {
                    const uint8_t nib = (bits[c4 / 2] >> (4 * (c4 & 1))) & 0xF;
                    dst[c4 * cb + byte] |= (uint8_t)(nib << shift);
                }
                if (!exact_f16(2.0f * t.scales[(r * ng + g) * N + i], A[((rt * ng + g) * N + i) * R + j])) return;
            }
            if (M && !exact_f16(t.offsets[r * ng + g], M[(rt * ng + g) * R + j])) return;
        }
    }
    t.repacked = std::move(W);
    t.repacked_for = kernel;
}

void lut_tables_scalar(const QActs &a, uint8_t *T) {
    const int64_t cp = a.ngroups * a.group;
    for (int64_t c4 = 0; c4 < cp / 4; c4++) {
        const int8_t *q = a.q.data() + c4 * 4;
        int16_t P[16];
        P[0] = 0;
        for (int k = 0; k < 4; k++)
            for (int m = 0; m < (1 << k); m++) P[(1 << k) + m] = (int16_t)(P[m] + q[k]);
        uint8_t *lo = T + (c4 / 2) * 64 + (c4 & 1) * 16;
        for (int m = 0; m < 16; m++) {
            lo[m] = (uint8_t)(P[m] & 0xff);
            lo[32 + m] = (uint8_t)((uint16_t)P[m] >> 8);
        }
    }
}

void lut_rows(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1,
              LutTileFn tile, void (*tables)(const QActs &, uint8_t *), int64_t tile_rows) {
    const LutLayout L(t, tile_rows);
    const int64_t tbytes = lut_table_bytes(acts[0]);
    thread_local avec<uint8_t> own;   // tables of tokens whose activations skipped the activation stage
    thread_local std::vector<const uint8_t *> T;
    T.resize(n_tok);
    size_t missing = 0;
    for (int k = 0; k < n_tok; k++) missing += (int64_t)acts[k].lut.size() != tbytes;
    if (own.size() < missing * tbytes) own.resize(missing * tbytes);
    for (int k = 0, m = 0; k < n_tok; k++) {
        if ((int64_t)acts[k].lut.size() == tbytes) {
            T[k] = acts[k].lut.data();
        } else {
            tables(acts[k], own.data() + m * tbytes);
            T[k] = own.data() + m++ * tbytes;
        }
    }
    alignas(64) float out[LUT_ROWS64];
    const int64_t R = L.rows;
    for (int64_t rt = r0 / R; rt * R < r1; rt++) {   // tiles outer: a tile stays in L1 over the tokens
        const int64_t a = std::max(r0, rt * R), e = std::min(r1, (rt + 1) * R);
        for (int k = 0; k < n_tok; k++) {
            tile(t, L, acts[k], T[k], rt, out);
            for (int64_t r = a; r < e; r++) Y[k * ldy + (r - r0)] = out[r - rt * R];
        }
    }
}

// ---- scalar-lut: the lookup in plain C++, the reference for the SIMD tile functions ---------------

namespace {

constexpr const char *SCALAR_LUT = "scalar-lut";

void tile_scalar(const BBTensor &t, const LutLayout &L, const QActs &a, const uint8_t *T, int64_t rt, float *out) {
    const int N = t.n_planes, G = t.group, nb = G / QK;
    const int64_t ng = t.ngroups;
    const uint8_t *W = t.repacked.data();
    const uint16_t *A = reinterpret_cast<const uint16_t *>(W + L.alpha_off);
    const uint16_t *M = L.mu_off < 0 ? nullptr : reinterpret_cast<const uint16_t *>(W + L.mu_off);
    float fv[LUT_ROWS] = {0};
    for (int64_t g = 0; g < ng; g++) {
        for (int i = 0; i < N; i++) {
            const uint8_t *w = W + ((rt * ng + g) * N + i) * (G / 4) * 16;
            float F[LUT_ROWS];
            for (int j = 0; j < LUT_ROWS; j++) F[j] = -0.5f * a.dS[g];
            for (int b = 0; b < nb; b++) {
                int32_t P[LUT_ROWS] = {0};
                for (int c4 = b * QK / 4; c4 < (b + 1) * QK / 4; c4++) {
                    const int64_t c = g * G / 4 + c4;   // the 4-column group within the whole row
                    const uint8_t *lo = T + (c / 2) * 64 + (c & 1) * 16, *hi = lo + 32;
                    for (int j = 0; j < LUT_ROWS; j++) {
                        const int m = (w[c4 * 16 + j % 16] >> (j < 16 ? 0 : 4)) & 0xF;
                        P[j] += (int16_t)(lo[m] | hi[m] << 8);
                    }
                }
                for (int j = 0; j < LUT_ROWS; j++) F[j] += (float)P[j] * a.d[g * nb + b];
            }
            for (int j = 0; j < LUT_ROWS; j++) fv[j] += F[j] * f16_to_f32(A[((rt * ng + g) * N + i) * LUT_ROWS + j]);
        }
        if (M)
            for (int j = 0; j < LUT_ROWS; j++) fv[j] += f16_to_f32(M[(rt * ng + g) * LUT_ROWS + j]) * a.dS[g];
    }
    std::memcpy(out, fv, sizeof fv);
}

void repack_scalar(BBTensor &t) { lut_repack(t, SCALAR_LUT); }

void prepare_scalar(QActs &a) {
    a.lut.resize((size_t)lut_table_bytes(a));
    lut_tables_scalar(a, a.lut.data());
}

void gemv_scalar_lut(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1) {
    if (t.repacked_for != SCALAR_LUT) return gemv_scalar(t, a, y, r0, r1);
    lut_rows(t, &a, 1, y, 0, r0, r1, tile_scalar, lut_tables_scalar);
    if (t.flags & F_SPARSE) add_sparse(t, a, y, r0, r1);
}

void gemm_scalar_lut(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1) {
    if (t.repacked_for != SCALAR_LUT) return gemm_scalar(t, acts, n_tok, Y, ldy, r0, r1);
    lut_rows(t, acts, n_tok, Y, ldy, r0, r1, tile_scalar, lut_tables_scalar);
    if (t.flags & F_SPARSE) add_sparse_gemm(t, acts, n_tok, Y, ldy, r0, r1);
}

}  // namespace

void add_kernels_scalar_lut(std::vector<Kernel> &v) {
    v.push_back(Kernel{SCALAR_LUT, "scalar", "", gemv_scalar_lut, gemm_scalar_lut, dot_f32_scalar, dot_q8_scalar,
                       dot_q8q8_scalar, repack_scalar, prepare_scalar});
}

}  // namespace bb
