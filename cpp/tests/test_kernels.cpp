// Every compiled-in kernel equals the scalar reference, and the scalar reference equals the spec's
// formula evaluated naively (dense W from formats/binary_basis_v1.md, then W·x in double).
//   test_kernels            all cases, exit code 0 when every check passed
//   test_kernels --quick    fewer random shapes
#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace bb;

static int g_fail = 0, g_checks = 0;
#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        g_checks++;                                                       \
        if (!(cond)) {                                                    \
            if (g_fail++ < 30) { std::printf("FAIL: " __VA_ARGS__); std::printf("\n"); } \
        }                                                                 \
    } while (0)

// A random binary-basis tensor that owns its component arrays.
struct Owned {
    std::vector<uint8_t> planes, colmask, elemclass, smask, scodes;
    std::vector<uint16_t> scales, offsets, zs, colscale;
    BBTensor t;
};

static void rand_bits(std::vector<uint8_t> &v, int64_t nrows, int64_t cols, int G, double p, std::mt19937_64 &rng,
                      int64_t runs_per_row = 1) {
    // nrows independent [runs_per_row][ngroups][G/8] runs; bits past `cols` stay zero (spec: padding).
    const int64_t ng = (cols + G - 1) / G, gb = G / 8;
    v.assign(nrows * runs_per_row * ng * gb, 0);
    std::bernoulli_distribution bern(p);
    for (int64_t r = 0; r < nrows; r++)
        for (int64_t g = 0; g < ng; g++)
            for (int64_t k = 0; k < runs_per_row; k++)
                for (int j = 0; j < G && g * G + j < cols; j++)
                    if (bern(rng)) v[((r * ng + g) * runs_per_row + k) * gb + j / 8] |= 1 << (j % 8);
}

// exact: every value a small integer, so every kernel must agree bit for bit.
static void make(Owned &o, int64_t rows, int64_t cols, int N, int G, uint32_t flags, bool exact, std::mt19937_64 &rng) {
    const int C = 1 + !!(flags & F_COLMASK) + !!(flags & F_ELEMCLASS), S = (flags & F_POW2) ? 1 : N;
    const int64_t ng = (cols + G - 1) / G;
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::uniform_int_distribution<int> ui(-2, 2);
    auto val = [&]() { return exact ? (float)ui(rng) : u(rng); };
    // planes: [rows][ng][N][G/8]
    {
        std::vector<uint8_t> tmp;
        rand_bits(tmp, rows, cols, G, 0.5, rng, N);
        o.planes = tmp;
    }
    o.scales.resize(rows * ng * C * S);
    for (auto &s : o.scales) s = f32_to_f16(val() * (exact ? 1.0f : 0.05f));
    if (flags & F_OFFSET) {
        o.offsets.resize(rows * ng * C);
        for (auto &s : o.offsets) s = f32_to_f16(val() * (exact ? 1.0f : 0.02f));
    }
    if (flags & F_COLMASK) rand_bits(o.colmask, 1, cols, G, 0.2, rng);
    if (flags & F_ELEMCLASS) rand_bits(o.elemclass, rows, cols, G, 0.3, rng);
    if (flags & F_SPARSE) {
        rand_bits(o.smask, rows, cols, G, 0.03, rng);
        int64_t nnz = 0;
        for (uint8_t b : o.smask) nnz += __builtin_popcount(b);
        o.scodes.resize(std::max<int64_t>(nnz, 1));
        for (auto &c : o.scodes) c = (uint8_t)(rng() & 255);
        o.zs.resize(rows * 2);
        for (int64_t r = 0; r < rows; r++) {
            o.zs[2 * r] = f32_to_f16(exact ? 1.0f : 0.01f * (1 + u(rng)));
            o.zs[2 * r + 1] = f32_to_f16(exact ? -128.0f : -1.0f + 0.1f * u(rng));
        }
    }
    if (flags & F_COLSCALE) {
        o.colscale.resize(cols);
        for (auto &k : o.colscale) k = f32_to_f16(exact ? ((rng() & 1) ? 1.0f : -1.0f) : 0.5f + u(rng) * 0.4f);
    }
    BBTensor &t = o.t;
    t = BBTensor{};
    t.rows = rows; t.cols = cols; t.n_planes = N; t.group = G; t.n_classes = C; t.flags = flags;
    t.planes = o.planes.data();
    t.scales_f16 = o.scales.data();
    t.offsets_f16 = (flags & F_OFFSET) ? o.offsets.data() : nullptr;
    t.colmask = (flags & F_COLMASK) ? o.colmask.data() : nullptr;
    t.elemclass = (flags & F_ELEMCLASS) ? o.elemclass.data() : nullptr;
    t.sparse_mask = (flags & F_SPARSE) ? o.smask.data() : nullptr;
    t.sparse_codes = (flags & F_SPARSE) ? o.scodes.data() : nullptr;
    t.sparse_zs = (flags & F_SPARSE) ? o.zs.data() : nullptr;
    t.colscale_f16 = (flags & F_COLSCALE) ? o.colscale.data() : nullptr;
}

static std::vector<float> rand_x(int64_t cols, int G, bool exact, std::mt19937_64 &rng) {
    std::vector<float> x(cols);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_int_distribution<int> ui(-127, 127);
    for (auto &v : x) v = exact ? (float)ui(rng) : nd(rng);
    (void)G;
    if (exact)  // one ±127 per activation block: d = 1 exactly and q = x
        for (int64_t b = 0; b * QK < cols; b++) x[b * QK + (rng() % std::min<int64_t>(QK, cols - b * QK))] = (rng() & 1) ? 127.0f : -127.0f;
    if (!exact && cols > 3) x[rng() % cols] = 0.0f;
    return x;
}

// The spec evaluated literally: dense W then Σ W·x, with x the int8-quantized activations for dense
// elements and the raw activations for sparse ones.
static std::vector<double> naive(const BBTensor &t, const QActs &a) {
    const int N = t.n_planes, C = t.n_classes, G = t.group;
    const int64_t gb = G / 8, ng = t.ngroups;
    auto bit = [](const uint8_t *p, int64_t j) { return (p[j >> 3] >> (j & 7)) & 1; };
    std::vector<double> y(t.rows, 0.0);
    for (int64_t r = 0; r < t.rows; r++) {
        int64_t sp = t.sparse_row_start.empty() ? 0 : t.sparse_row_start[r];
        for (int64_t col = 0; col < t.cols; col++) {
            const int64_t g = col / G;
            const int j = (int)(col % G);
            int c = 0;
            if (t.colmask && bit(t.colmask + g * gb, j)) c = 1;
            else if (t.elemclass && bit(t.elemclass + (r * ng + g) * gb, j)) c = C - 1;
            const uint8_t *pl = t.planes + (r * ng + g) * N * gb;
            double w = 0;
            for (int i = 0; i < N; i++) {
                const double al = (t.flags & F_POW2) ? f16_to_f32(t.scales_f16[(r * ng + g) * C + c]) * std::ldexp(1.0, i)
                                                     : f16_to_f32(t.scales_f16[((r * ng + g) * C + c) * N + i]);
                w += bit(pl + i * gb, j) ? al : -al;
            }
            if (t.offsets_f16) w += f16_to_f32(t.offsets_f16[(r * ng + g) * C + c]);
            const double xq = (double)a.d[col / QK] * a.q[col];   // = colscale·x, quantized
            if (t.sparse_mask && bit(t.sparse_mask + (r * ng) * gb, col)) {
                const double v = f16_to_f32(t.sparse_zs[2 * r]) * (double)t.sparse_codes[sp++] + f16_to_f32(t.sparse_zs[2 * r + 1]);
                y[r] += v * a.x[col];
            } else {
                y[r] += w * xq;
            }
        }
    }
    return y;
}

static const char *flag_str(uint32_t f) {
    static char buf[64];
    std::snprintf(buf, sizeof buf, "%s%s%s%s%s%s", f & F_OFFSET ? "O" : "", f & F_COLMASK ? "C" : "", f & F_ELEMCLASS ? "E" : "",
                  f & F_SPARSE ? "S" : "", f & F_POW2 ? "P" : "", f & F_COLSCALE ? "K" : "");
    return buf;
}

// Compare `got` with `ref` (double): |got − ref| ≤ tol · (|ref| + scale), scale = mean |ref| of the
// rows, so rows that cancel to ~0 are judged on the tensor's magnitude, not on their own.
static bool close(const float *got, const double *ref, int64_t n, double tol, double *worst) {
    double scale = 0;
    for (int64_t i = 0; i < n; i++) scale += std::fabs(ref[i]);
    scale = scale / n + 1e-30;
    bool ok = true;
    *worst = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = std::fabs(got[i] - ref[i]) / (std::fabs(ref[i]) + scale);
        if (!(e <= tol)) ok = false;
        if (!(e <= *worst)) *worst = e;
    }
    return ok;
}

static void run_case(int64_t rows, int64_t cols, int N, int G, uint32_t flags, bool exact, std::mt19937_64 &rng) {
    Owned o;
    make(o, rows, cols, N, G, flags, exact, rng);
    bb_prepare(o.t, "");
    // 19 tokens: a whole 16- or 8-token lane tile of the tokens-in-lanes GEMMs and a partial one
    const int ntok = 19;
    std::vector<QActs> acts(ntok);
    for (int k = 0; k < ntok; k++) {
        const auto x = rand_x(cols, G, exact, rng);
        quantize_acts(x.data(), cols, G, o.t.colscale.empty() ? nullptr : o.t.colscale.data(), acts[k]);
    }
    char what[160];
    std::snprintf(what, sizeof what, "[%lldx%lld] N=%d G=%d flags=%s %s", (long long)rows, (long long)cols, N, G,
                  flag_str(flags), exact ? "exact" : "random");
    // scalar reference vs the spec evaluated naively
    std::vector<float> yref(rows * ntok);
    gemm_scalar(o.t, acts.data(), ntok, yref.data(), rows, 0, rows);
    for (int k = 0; k < 3; k++) {   // the spec on 3 tokens (naive is slow); the rest through gemm_scalar
        const auto yn = naive(o.t, acts[k]);
        double worst;
        if (exact) {
            bool eq = true;
            for (int64_t r = 0; r < rows; r++) eq &= (double)yref[k * rows + r] == yn[r];
            CHECK(eq, "scalar != naive (exact) %s", what);
        } else {
            CHECK(close(yref.data() + k * rows, yn.data(), rows, 1e-4, &worst), "scalar vs naive %s: rel err %.3g", what, worst);
        }
    }
    std::vector<double> yrefd(yref.begin(), yref.end());
    for (const Kernel &kern : all_kernels()) {
        if (!kern.supported() || std::string(kern.name) == "scalar") continue;
        for (int rp = 0; rp < 2; rp++) {          // on-disk layout, then the kernel's repacked copy
            bb_repack(o.t, rp ? kern.name : "");
            // a lookup kernel's layout holds every one-class tensor of a sane file (its 2α and μ as f16)
            if (rp && o.t.n_classes == 1 && std::strstr(kern.name, "-lut"))
                CHECK(!o.t.repacked_for.empty(), "%s did not repack %s", kern.name, what);
            if (rp && o.t.repacked_for.empty()) continue;
            // gemv over a split row range, as threads call it, on activations that went through the
            // kernel's activation stage; gemm on activations that did not (the kernel's own fallback)
            std::vector<QActs> pacts = acts;
            if (kern.prepare_acts)
                for (auto &q : pacts) kern.prepare_acts(q);
            std::vector<float> y(rows * ntok, NAN);
            const int64_t mid = rows / 3;
            for (int k = 0; k < ntok; k++) {
                kern.gemv(o.t, pacts[k], y.data() + k * rows, 0, mid);
                kern.gemv(o.t, pacts[k], y.data() + k * rows + mid, mid, rows);
            }
            std::vector<float> Y(rows * ntok, NAN);
            kern.gemm(o.t, acts.data(), ntok, Y.data(), rows, 0, mid);
            kern.gemm(o.t, acts.data(), ntok, Y.data() + mid, rows, mid, rows);
            // batch invariance: a token's result is the same alone (gemv) or in a batch (gemm), bit for bit
            // (the server re-runs a cached prompt's last token alone: results.md §39)
            CHECK(std::memcmp(y.data(), Y.data(), y.size() * sizeof(float)) == 0, "%s gemm != gemv bit for bit%s %s", kern.name,
                  rp ? " repacked" : "", what);
            std::vector<float> Y2(rows * 2, NAN);   // and a batch too small for the lanes (a GEMM's own fallback)
            kern.gemm(o.t, acts.data(), 2, Y2.data(), rows, 0, rows);
            CHECK(std::memcmp(y.data(), Y2.data(), Y2.size() * sizeof(float)) == 0, "%s gemm of 2 tokens != gemv bit for bit%s %s",
                  kern.name, rp ? " repacked" : "", what);
            for (int which = 0; which < 2; which++) {
                const std::vector<float> &got = which ? Y : y;
                double worst = 0;
                if (exact) {
                    bool eq = true;
                    for (int64_t i = 0; i < rows * ntok; i++) eq &= got[i] == yref[i];
                    CHECK(eq, "%s %s%s != scalar (exact) %s", kern.name, which ? "gemm" : "gemv", rp ? " repacked" : "", what);
                } else {
                    CHECK(close(got.data(), yrefd.data(), rows * ntok, 1e-5, &worst), "%s %s%s vs scalar %s: rel err %.3g",
                          kern.name, which ? "gemm" : "gemv", rp ? " repacked" : "", what, worst);
                }
            }
        }
    }
}

static void test_dispatch() {
    unsetenv("BITBASIS_KERNEL");
    setenv("BITBASIS_ISA", "scalar", 1);
    CHECK(std::string(select_kernel().name) == "scalar", "BITBASIS_ISA=scalar picks %s", select_kernel().name);
    for (const char *isa : {"avx2", "avx512", "neon"}) {
        setenv("BITBASIS_ISA", isa, 1);
        bool any = false;
        for (const auto &k : all_kernels()) any |= (std::string(k.isa) == isa && k.supported());
        try {
            const Kernel &k = select_kernel();
            CHECK(any && std::string(k.isa) == isa, "BITBASIS_ISA=%s picked %s", isa, k.name);
        } catch (const std::exception &e) {
            CHECK(!any, "BITBASIS_ISA=%s threw although supported: %s", isa, e.what());
            // a refusal names what is missing: a feature this CPU lacks, or that the build has none
            const std::string msg = e.what();
            bool named = msg.find("this build has no") != std::string::npos;
            for (const auto &k : all_kernels())
                if (std::string(k.isa) == isa) {
                    const std::string lack = missing_features(k);
                    named |= !lack.empty() && msg.find(lack.substr(0, lack.find(' '))) != std::string::npos;
                }
            CHECK(named && msg.find('\n') == std::string::npos, "BITBASIS_ISA=%s refusal does not name the missing feature: %s",
                  isa, e.what());
        }
    }
    // every kernel's features are names the detector knows (a typo would make a kernel unusable)
    for (const auto &k : all_kernels()) {
        const std::string f = k.features;
        size_t a = 0;
        while (a < f.size()) {
            const size_t b = std::min(f.find(',', a), f.size());
            const std::string one = f.substr(a, b - a);
            CHECK(std::string(" popcnt fma f16c avx2 avx512f avx512bw avx512vl avx512dq avx512vnni avx512bitalg "
                              "avx512vpopcntdq neon dotprod ").find(" " + one + " ") != std::string::npos,
                  "kernel %s: unknown feature '%s'", k.name, one.c_str());
            a = b + 1;
        }
    }
    setenv("BITBASIS_ISA", "mmx", 1);
    bool threw = false;
    try { select_kernel(); } catch (const std::exception &) { threw = true; }
    CHECK(threw, "BITBASIS_ISA=mmx accepted");
    unsetenv("BITBASIS_ISA");
    setenv("BITBASIS_KERNEL", "no-such-kernel", 1);
    threw = false;
    try { select_kernel(); } catch (const std::exception &) { threw = true; }
    CHECK(threw, "BITBASIS_KERNEL=no-such-kernel accepted");
    for (const auto &k : all_kernels()) {
        if (!k.supported()) continue;
        setenv("BITBASIS_KERNEL", k.name, 1);
        CHECK(std::string(select_kernel().name) == k.name, "BITBASIS_KERNEL=%s", k.name);
    }
    unsetenv("BITBASIS_KERNEL");
    CHECK(select_kernel().supported(), "default kernel unsupported");
}

// Every kernel set's dense dots (model.cpp's F32 / Q8_0 weights) equal the scalar ones.
static void test_dense_dots(std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::uniform_int_distribution<int> w8(-128, 127);
    for (int64_t n : {32, 96, 576, 1000, 1536}) {
        const int64_t nq = n / 32 * 32;
        std::vector<float> a(n), b(n);
        for (auto &v : a) v = u(rng);
        for (auto &v : b) v = u(rng);
        std::vector<uint8_t> row(nq / 32 * 34);
        for (int64_t blk = 0; blk < nq / 32; blk++) {
            const uint16_t dh = f32_to_f16(0.01f * (1 + blk % 7));
            std::memcpy(row.data() + blk * 34, &dh, 2);
            for (int j = 0; j < 32; j++) row[blk * 34 + 2 + j] = (uint8_t)(int8_t)w8(rng);
        }
        QActs qa;
        quantize_acts(b.data(), nq, 64, nullptr, qa);
        const double f_ref = dot_f32_scalar(a.data(), b.data(), n), q_ref = dot_q8_scalar(row.data(), b.data(), nq);
        const double qq_ref = dot_q8q8_scalar(row.data(), qa.q.data(), qa.d.data(), nq);
        for (const Kernel &k : all_kernels()) {
            if (!k.supported()) continue;
            const double f = k.dot_f32(a.data(), b.data(), n), q = k.dot_q8(row.data(), b.data(), nq);
            const double qq = k.dot_q8q8(row.data(), qa.q.data(), qa.d.data(), nq);
            CHECK(std::fabs(f - f_ref) <= 1e-5 * (1 + std::fabs(f_ref)), "%s dot_f32 n=%lld: %g vs %g", k.name, (long long)n, f, f_ref);
            CHECK(std::fabs(q - q_ref) <= 1e-5 * (1 + std::fabs(q_ref)), "%s dot_q8 n=%lld: %g vs %g", k.name, (long long)n, q, q_ref);
            CHECK(std::fabs(qq - qq_ref) <= 1e-5 * (1 + std::fabs(qq_ref)), "%s dot_q8q8 n=%lld: %g vs %g", k.name, (long long)n, qq, qq_ref);
        }
        // int8 activations cost little against the float dot (per-32 scales): within 2% of its size
        CHECK(std::fabs(qq_ref - q_ref) <= 0.02 * (1 + std::fabs(q_ref)), "dot_q8q8 far from dot_q8 n=%lld: %g vs %g",
              (long long)n, qq_ref, q_ref);
    }
}

// Every kernel set's tiled dense GEMM (F32, F16, Q8_0 rows × many tokens) equals one scalar dot per (row,
// token): row counts that are not a multiple of the 4-row tiles, token counts that are not a multiple of
// the token tiles and that cross a token block (cols 2048 f32: 16 tokens a block), a row range [r0, r1).
static void test_dense_gemm(std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::uniform_int_distribution<int> w8(-128, 127);
    for (int64_t cols : {32, 96, 200, 576, 2048})
        for (int n_tok : {1, 2, 3, 5, 7, 37}) {
            const int64_t rows = 1 + rng() % 13, r0 = rng() % rows, r1 = r0 + 1 + rng() % (rows - r0);
            std::vector<float> X(n_tok * cols), wf(rows * cols);
            for (auto &v : X) v = u(rng);
            for (auto &v : wf) v = u(rng);
            std::vector<uint16_t> wh(rows * cols);
            for (int64_t i = 0; i < rows * cols; i++) wh[i] = f32_to_f16(wf[i]);
            const int64_t nq = cols / 32 * 32;
            std::vector<uint8_t> wq(rows * (nq / 32) * 34);
            for (int64_t blk = 0; blk < rows * (nq / 32); blk++) {
                const uint16_t dh = f32_to_f16(0.01f * (1 + blk % 7));
                std::memcpy(wq.data() + blk * 34, &dh, 2);
                for (int j = 0; j < 32; j++) wq[blk * 34 + 2 + j] = (uint8_t)(int8_t)w8(rng);
            }
            std::vector<QActs> q8(n_tok);
            for (int t = 0; t < n_tok; t++) quantize_acts(X.data() + t * cols, nq, 64, nullptr, q8[t]);
            const DenseRows ws[3] = {{DT_F32, (const uint8_t *)wf.data(), cols}, {DT_F16, (const uint8_t *)wh.data(), cols},
                                     {DT_Q8_0, wq.data(), nq}};
            for (const DenseRows &w : ws) {
                if (w.cols == 0) continue;
                // the reference: one scalar dot per (row, token)
                // (and Σ|w x|, the scale of the float reassociation error: 1e-5 of it)
                std::vector<float> ref((size_t)n_tok * (r1 - r0)), mag(ref.size()), wide(cols);
                for (int64_t r = r0; r < r1; r++) {
                    const uint8_t *row = w.data + r * dense_row_bytes(w);
                    for (int64_t j = 0; j < cols; j++) wide[j] = w.type == DT_F16 ? f16_to_f32(((const uint16_t *)row)[j]) : 0;
                    const float *wr = w.type == DT_F16 ? wide.data() : (const float *)row;
                    for (int t = 0; t < n_tok; t++) {
                        const size_t i = t * (r1 - r0) + r - r0;
                        if (w.type == DT_Q8_0) {
                            ref[i] = dot_q8q8_scalar(row, q8[t].q.data(), q8[t].d.data(), w.cols);
                            mag[i] = std::fabs(ref[i]);   // exact int32 block sums: only the blocks' float sum differs
                            continue;
                        }
                        ref[i] = dot_f32_scalar(wr, X.data() + t * cols, cols);
                        for (int64_t j = 0; j < cols; j++) mag[i] += std::fabs(wr[j] * X[t * cols + j]);
                    }
                }
                for (const Kernel &k : all_kernels()) {
                    if (!k.supported()) continue;
                    const int64_t ldy = r1 - r0 + 3;   // a wider output row than the range, as a caller's
                    std::vector<float> Y((size_t)n_tok * ldy, NAN);
                    run_gemm_dense(k, w, X.data(), q8.data(), n_tok, Y.data(), ldy, r0, r1);
                    std::vector<float> Y1((size_t)n_tok * ldy, NAN);   // one token at a time: the same bits
                    for (int t = 0; t < n_tok; t++)
                        run_gemm_dense(k, w, X.data() + t * cols, q8.data() + t, 1, Y1.data() + t * ldy, ldy, r0, r1);
                    CHECK(std::memcmp(Y.data(), Y1.data(), Y.size() * sizeof(float)) == 0,
                          "%s gemm_dense type %u cols=%lld n=%d != one token at a time, bit for bit", k.name, w.type, (long long)cols, n_tok);
                    for (int t = 0; t < n_tok; t++)
                        for (int64_t r = r0; r < r1; r++) {
                            const double y = Y[t * ldy + r - r0], yr = ref[t * (r1 - r0) + r - r0];
                            CHECK(std::fabs(y - yr) <= 1e-5 * (1 + mag[t * (r1 - r0) + r - r0]), "%s gemm_dense type %u cols=%lld n=%d r=%lld t=%d: %g vs %g",
                                  k.name, w.type, (long long)cols, n_tok, (long long)r, t, y, yr);
                        }
                }
            }
        }
}

// The thread pool hands out every index of [0, n) exactly once per call, in pieces that start at multiples
// of `align`, to thread ids below size(), also when the calls follow each other closely (a worker that
// woke late must not run a piece of the previous call's job).
static void test_pool() {
    for (int threads : {2, 3}) {
        ThreadPool pool(threads);
        for (int rep = 0; rep < 200; rep++) {
            const int64_t n = 1 + (rep * 7919) % 1000, align = rep % 3 == 0 ? 1 : rep % 3 == 1 ? 4 : 32;
            std::vector<std::atomic<int>> hits(n);
            std::atomic<bool> bad{false};
            const int tag = rep;
            pool.parallel_for(n, align, [&, tag](int64_t a, int64_t b, int tid) {
                if (a % align || a >= b || b > n || tid < 0 || tid >= pool.size() || tag != rep) bad = true;
                for (int64_t i = a; i < b; i++) hits[i]++;
            });
            int64_t wrong = 0;
            for (auto &h : hits) wrong += h.load() != 1;
            CHECK(!bad && wrong == 0, "pool %d threads n=%lld align=%lld: %lld indices not run once", threads,
                  (long long)n, (long long)align, (long long)wrong);
        }
    }
}

// Every kernel set's attention rows over a cache of T (float or f16) against the scalar ones (dots_ref,
// wsum_ref), within 1e-5 of the same sums over magnitudes (Kf: the cache's values as floats).
template <class T>
using RowsFn = void (*)(const float *, const T *, int64_t, int64_t, int64_t, float *);

template <class T>
static void check_attention_rows(const char *type, const std::vector<float> &q, const std::vector<T> &K, const std::vector<float> &Kf,
                                 const std::vector<float> &w, int64_t stride, int64_t n, int64_t hd, RowsFn<T> dots_ref,
                                 RowsFn<T> wsum_ref, RowsFn<T> Kernel::*dots, RowsFn<T> Kernel::*wsum) {
    std::vector<float> s_ref(n), o_ref(hd), s_abs(n, 0.0f), o_abs(hd, 0.0f);
    dots_ref(q.data(), K.data(), stride, n, hd, s_ref.data());
    wsum_ref(w.data(), K.data(), stride, n, hd, o_ref.data());
    for (int64_t j = 0; j < n; j++)   // the error scale: the same sums over magnitudes
        for (int64_t i = 0; i < hd; i++) {
            s_abs[j] += std::fabs(q[i] * Kf[j * stride + i]);
            o_abs[i] += std::fabs(w[j] * Kf[j * stride + i]);
        }
    for (const Kernel &k : all_kernels()) {
        if (!k.supported() || !(k.*dots)) continue;
        std::vector<float> s(n, NAN), o(hd, NAN);
        (k.*dots)(q.data(), K.data(), stride, n, hd, s.data());
        (k.*wsum)(w.data(), K.data(), stride, n, hd, o.data());
        bool ok = true;
        for (int64_t j = 0; j < n; j++) ok &= std::fabs(s[j] - s_ref[j]) <= 1e-5 * (1 + s_abs[j]);
        CHECK(ok, "%s dots_%s hd=%lld n=%lld differs from scalar", k.name, type, (long long)hd, (long long)n);
        ok = true;
        for (int64_t i = 0; i < hd; i++) ok &= std::fabs(o[i] - o_ref[i]) <= 1e-5 * (1 + o_abs[i]);
        CHECK(ok, "%s wsum_%s hd=%lld n=%lld differs from scalar", k.name, type, (long long)hd, (long long)n);
    }
}

// Every kernel set's attention rows (scores q·K[j], weighted sums of V rows) equal the scalar ones,
// on strided rows as a KV cache holds them, head dims with and without a tail of 8.
static void test_attention_rows(std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int64_t hd : {64, 128, 80, 6}) {
        for (int64_t n : {1, 3, 4, 7, 33}) {
            const int64_t stride = 3 * hd + 5;
            std::vector<float> q(hd), K(n * stride), w(n);
            for (auto &v : q) v = u(rng);
            for (auto &v : K) v = u(rng);
            for (auto &v : w) v = 0.5f * (u(rng) + 1.0f);   // softmax weights are ≥ 0
            check_attention_rows<float>("f32", q, K, K, w, stride, n, hd, dots_f32_scalar, wsum_f32_scalar, &Kernel::dots_f32,
                                        &Kernel::wsum_f32);
        }
    }
}

// Every kernel set's SwiGLU gate equals the scalar one (std::exp) within 1e-6 relative, on the range
// activations take and beyond (exp's clamps: large |g| must give g·u and 0, not inf or NaN).
static void test_swiglu(std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int64_t n = 1003;   // a tail after the last 8
    std::vector<float> g(n), up(n);
    for (int64_t i = 0; i < n; i++) {
        g[i] = i < 8 ? std::vector<float>{-200.f, -88.f, -30.f, -1e-6f, 0.f, 1e-6f, 30.f, 200.f}[i] : 12.0f * u(rng);
        up[i] = u(rng);
    }
    std::vector<float> ref = g;
    swiglu_f32_scalar(ref.data(), up.data(), n);
    for (const Kernel &k : all_kernels()) {
        if (!k.supported()) continue;
        std::vector<float> got = g;
        k.swiglu_f32(got.data(), up.data(), n);
        double worst = 0;
        for (int64_t i = 0; i < n; i++) {
            const double e = std::fabs((double)got[i] - ref[i]) / (std::fabs((double)ref[i]) + 1e-30);
            if (!(e <= worst)) worst = e;   // NaN counts as worst
        }
        CHECK(worst <= 1e-6, "%s swiglu_f32 vs scalar: rel err %.3g", k.name, worst);
    }
}

// The f16 KV cache: f32_to_f16 rounds to nearest even (ties, the largest finite, overflow, subnormals,
// a round trip of every finite f16), every kernel set's to_f16 equals it bit for bit, and its rows
// (dots_f16, wsum_f16) equal the scalar ones on strided rows as the cache holds them.
// Every kernel set's online rotation (the fast Walsh–Hadamard transform) equals the scalar one, on the
// widths of SmolLM2 (576 = 9·64, 1536 = 3·512), Gemma 3 (640 = 5·128) and blocks below a register.
static void test_hadamard(std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> u(-4.0f, 4.0f);
    for (auto nb : {std::make_pair(576, 64), std::make_pair(1536, 512), std::make_pair(640, 128), std::make_pair(24, 8),
                    std::make_pair(12, 4), std::make_pair(6, 2), std::make_pair(5, 1), std::make_pair(2048, 512)}) {
        const int64_t n = nb.first;
        const int b = nb.second;
        std::vector<float> x(n), ref, s = ops::online_signs(n, 7);
        for (auto &v : x) v = u(rng);
        ref = x;
        hadamard_f32_scalar(ref.data(), s.data(), n, b);
        for (const Kernel &k : all_kernels()) {
            if (!k.supported()) continue;
            std::vector<float> got = x;
            k.hadamard_f32(got.data(), s.data(), n, b);
            double worst = 0;
            for (int64_t i = 0; i < n; i++) worst = std::max(worst, (double)std::fabs(got[i] - ref[i]));
            CHECK(worst <= 1e-5, "%s hadamard_f32 n=%lld b=%d vs scalar: max err %.3g", k.name, (long long)n, b, worst);
        }
    }
}

static void test_kv_f16(std::mt19937_64 &rng) {
    CHECK(f32_to_f16(1.0f) == 0x3c00 && f32_to_f16(-2.0f) == 0xc000 && f32_to_f16(65504.0f) == 0x7bff, "f32_to_f16 basics");
    CHECK(f32_to_f16(65519.0f) == 0x7bff && f32_to_f16(65520.0f) == 0x7c00 && f32_to_f16(1e9f) == 0x7c00, "f32_to_f16 overflow");
    CHECK(f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00 && f32_to_f16(1.0f + 3.0f / 2048) == 0x3c02, "f32_to_f16 ties to even");
    CHECK(f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001 && f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000 &&
              f32_to_f16(std::ldexp(3.0f, -25)) == 0x0002, "f32_to_f16 subnormals");
    CHECK((f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (f32_to_f16(NAN) & 0x3ff) != 0, "f32_to_f16 NaN");
    bool trip = true;
    for (uint32_t h = 0; h < 0x10000; h++)
        if ((h & 0x7c00) != 0x7c00) trip &= f32_to_f16(f16_to_f32((uint16_t)h)) == h;
    CHECK(trip, "f16 -> f32 -> f16 round trip");
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> x(1003);
    for (size_t i = 0; i < x.size(); i++) x[i] = std::ldexp(u(rng), (int)(i % 40) - 28);   // 2^-28 .. 2^11: subnormal to large
    x[0] = 1e6f, x[1] = -70000.0f, x[2] = 0.0f, x[3] = -0.0f;
    std::vector<uint16_t> ref(x.size());
    to_f16_scalar(x.data(), ref.data(), (int64_t)x.size());
    for (int64_t hd : {64, 128, 80, 6}) {
        for (int64_t n : {1, 3, 4, 7, 33}) {
            const int64_t stride = 3 * hd + 5;
            std::vector<float> q(hd), Kf(n * stride), w(n);
            for (auto &v : q) v = u(rng);
            for (auto &v : Kf) v = u(rng);
            for (auto &v : w) v = 0.5f * (u(rng) + 1.0f);
            std::vector<uint16_t> K(Kf.size());
            to_f16_scalar(Kf.data(), K.data(), (int64_t)K.size());
            check_attention_rows<uint16_t>("f16", q, K, Kf, w, stride, n, hd, dots_f16_scalar, wsum_f16_scalar, &Kernel::dots_f16,
                                           &Kernel::wsum_f16);
        }
    }
    for (const Kernel &k : all_kernels()) {
        if (!k.supported() || !k.to_f16) continue;
        CHECK(k.dots_f16 && k.wsum_f16, "%s has to_f16 without the f16 rows", k.name);
        std::vector<uint16_t> got(x.size(), 0xffff);
        k.to_f16(x.data(), got.data(), (int64_t)x.size());
        CHECK(got == ref, "%s to_f16 differs from f32_to_f16", k.name);
    }
}

// Every kernel set's softmax equals the scalar one (std::exp, sums in order) within 1e-6 relative per
// weight: lengths with and without a tail of 8, scores far below the max (weights that underflow to 0).
static void test_softmax(std::mt19937_64 &rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int64_t n : {1, 5, 8, 37, 300}) {
        std::vector<float> x(n);
        for (int64_t j = 0; j < n; j++) x[j] = j == 2 ? -1e4f : 20.0f * u(rng);
        std::vector<float> ref = x;
        softmax_f32_scalar(ref.data(), n, 0.125f);
        for (const Kernel &k : all_kernels()) {
            if (!k.supported()) continue;
            std::vector<float> got = x;
            k.softmax_f32(got.data(), n, 0.125f);
            double worst = 0;
            for (int64_t j = 0; j < n; j++) {
                const double e = std::fabs((double)got[j] - ref[j]) / (ref[j] + 1e-30);
                if (!(e <= worst)) worst = e;   // NaN counts as worst
            }
            CHECK(worst <= 1e-6, "%s softmax_f32 n=%lld vs scalar: rel err %.3g", k.name, (long long)n, worst);
        }
    }
}

static void test_f16() {
    CHECK(f16_to_f32(0x3c00) == 1.0f, "f16 1.0");
    CHECK(f16_to_f32(0xc000) == -2.0f, "f16 -2.0");
    CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24), "f16 smallest subnormal");
    CHECK(f16_to_f32(0x7bff) == 65504.0f, "f16 max");
    CHECK(std::isinf(f16_to_f32(0x7c00)), "f16 inf");
    CHECK(std::isnan(f16_to_f32(0x7e00)), "f16 nan");
    for (uint32_t h = 0; h < 0x7c00; h++) {  // every finite positive value round-trips through f32
        if (f32_to_f16(f16_to_f32((uint16_t)h)) != h && h >= 0x0400) { CHECK(false, "f16 round trip %x", h); break; }
    }
}

// A 2α that f16 cannot hold (a hostile file's α near the f16 maximum) keeps the tensor out of the
// lookup layout: the lookup kernels fall back and still equal the scalar reference.
static void test_lut_f16_refusal(std::mt19937_64 &rng) {
    Owned o;
    make(o, 40, 256, 2, 64, F_OFFSET, false, rng);
    o.scales[3] = f32_to_f16(40000.0f);   // 2α = 80000 > 65504
    bb_prepare(o.t, "");
    QActs a;
    const auto x = rand_x(o.t.cols, o.t.group, false, rng);
    quantize_acts(x.data(), o.t.cols, o.t.group, nullptr, a);
    std::vector<float> yref(o.t.rows);
    gemv_scalar(o.t, a, yref.data(), 0, o.t.rows);
    const std::vector<double> yrefd(yref.begin(), yref.end());
    for (const Kernel &kern : all_kernels()) {
        if (!kern.supported() || !std::strstr(kern.name, "-lut")) continue;
        bb_repack(o.t, kern.name);
        CHECK(o.t.repacked_for.empty(), "%s repacked a 2α beyond f16", kern.name);
        QActs pa = a;
        if (kern.prepare_acts) kern.prepare_acts(pa);
        std::vector<float> y(o.t.rows, NAN);
        kern.gemv(o.t, pa, y.data(), 0, o.t.rows);
        double worst;
        CHECK(close(y.data(), yrefd.data(), o.t.rows, 1e-5, &worst), "%s fallback vs scalar: rel err %.3g", kern.name, worst);
    }
}

int main(int argc, char **argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    std::printf("cpu: %s\nkernels:", cpu_features().c_str());
    for (const auto &k : all_kernels()) std::printf(" %s%s", k.name, k.supported() ? "" : "(unsupported)");
    std::printf("\n");
    test_f16();
    test_dispatch();
    std::mt19937_64 rng(42);
    test_dense_dots(rng);
    test_dense_gemm(rng);
    test_pool();
    test_attention_rows(rng);
    test_swiglu(rng);
    test_hadamard(rng);
    test_softmax(rng);
    test_kv_f16(rng);
    test_lut_f16_refusal(rng);
    // every flag combination (64) × a few plane counts, on odd shapes with cols not a multiple of G
    // (--quick: fewer plane counts and group sizes, smaller shapes; for qemu)
    const std::vector<int> flagN = quick ? std::vector<int>{2, 7} : std::vector<int>{1, 3, 8};
    for (uint32_t flags = 0; flags < 64; flags++)
        for (int N : flagN)
            for (bool exact : {true, false})
                run_case(1 + rng() % 37, exact ? 1 + rng() % 200 : 1 + rng() % (quick ? 300 : 700), N, 64 * (1 + rng() % 3),
                         flags, exact, rng);
    // the fast kernels' common cases: N = 1..8, offsets and POW2, many shapes and group sizes
    const int reps = quick ? 1 : 3;
    const std::vector<int> groups = quick ? std::vector<int>{64, 128, 192, 576} : std::vector<int>{64, 128, 192, 256, 576, 1024};
    for (int rep = 0; rep < reps; rep++)
        for (int N = 1; N <= 8; N++)
            for (uint32_t flags : {0u, (uint32_t)F_OFFSET, (uint32_t)(F_OFFSET | F_POW2), (uint32_t)F_POW2})
                for (int G : groups) {
                    run_case(1 + rng() % 70, 1 + rng() % (quick ? 700 : 1500), N, G, flags, false, rng);
                    run_case(1 + rng() % 20, 1 + rng() % 200, N, G, flags, true, rng);
                }
    // shapes that are exact multiples (no padding) and a wide one
    run_case(64, 4096, 2, 128, F_OFFSET, false, rng);
    run_case(33, 1536, 1, 64, 0, false, rng);
    run_case(17, 2048, 4, 2048, F_OFFSET | F_POW2, false, rng);
    std::printf("%d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
