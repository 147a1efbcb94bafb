// The golden test vectors of the binary-basis format (formats/vectors/, written by
// tools/make_vectors.py, described in formats/vectors/README.md), read with the engine's own GGUF
// reader and loader (gguf.h, bb_load.h: what the model loader runs) and multiplied by every kernel
// this CPU supports.
//
//   test_vectors [--quick] [DIR]
//
// DIR: the directory of *.gguf vector files; else $BITBASIS_VECTORS; else formats/vectors under the
// current directory. When none exists the test fails, except with --quick (tools/sanitize.sh runs
// every test program that way from the repository root), where it prints "vectors not found,
// skipped" and exits 0. Nothing else is read: no path is baked in at compile time, so the same
// binary runs under qemu or on another machine.
//
// For every binary-basis weight <case>.weight of a file, with F32 tensors <case>.dequant [rows, cols],
// <case>.x [n_vec, cols], <case>.y [n_vec, rows]:
//   reader   the loader accepts it; the spec's formula evaluated on what it points at (f16 through
//            the engine's f16_to_f32) equals <case>.dequant bit for bit (the vectors are chosen so
//            that every order of summation is exact);
//   acts     quantize_acts is exact on <case>.x: every 32-column block gets d = 2^E (or 0) and
//            d·q = x·k exactly, as the generator intends;
//   kernels  for each supported kernel, after bb_prepare(t, kernel) (its repack) and again on the
//            on-disk layout: gemv (over a split row range, as threads call it) and gemm give <case>.y
//            within 1e-5 relative; and probes: W·(127·e_j) / 127 is column j of <case>.dequant within
//            1e-5 (every kernel; with --quick the scalar reference only).
// One line per file and kernel, then a summary "N files, T tensors, K kernels: C checks, F failed";
// exit status 0 only when every check passed.
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bb_load.h"
#include "gguf.h"
#include "kernels.h"

using namespace bb;

namespace {

int g_checks = 0, g_fail = 0;

// Record one check; print the first failures in full.
bool check(bool ok, const std::string &what) {
    g_checks++;
    if (!ok && g_fail++ < 40) std::printf("  FAIL: %s\n", what.c_str());
    return ok;
}

std::string fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char *f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

bool is_dir(const std::string &p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::vector<std::string> gguf_files(const std::string &dir) {
    std::vector<std::string> out;
    if (DIR *d = opendir(dir.c_str())) {
        while (const dirent *e = readdir(d)) {
            const std::string n = e->d_name;
            if (n.size() > 5 && n.compare(n.size() - 5, 5, ".gguf") == 0 && n[0] != '.') out.push_back(n);
        }
        closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
}

// An F32 tensor of numpy shape [rows, cols] (GGUF: ne[0] = cols), copied out of the mapping.
std::vector<float> f32_matrix(const GGUFFile &f, const std::string &name, int64_t rows, int64_t cols) {
    const GTensor *t = f.tensor(name);
    if (!t) throw std::runtime_error("tensor " + name + " is missing");
    if (t->type != TT_F32 || t->n_dims > 2 || t->ne[0] != cols || t->nelements() != rows * cols)
        throw std::runtime_error(fmt("tensor %s: %s [%lld, %lld], expected F32 [%lld, %lld]", name.c_str(),
                                     ttype_name(t->type), (long long)t->ne[1], (long long)t->ne[0], (long long)rows,
                                     (long long)cols));
    std::vector<float> v(rows * cols);
    std::memcpy(v.data(), t->data, v.size() * sizeof(float));
    return v;
}

inline bool bit(const uint8_t *p, int64_t j) { return (p[j >> 3] >> (j & 7)) & 1; }

// formats/binary_basis_v1.md evaluated literally on the loaded tensor, in float, in the spec's order
// (planes ascending, then μ, then the column scale; sparse values replace).
std::vector<float> dequant_spec(const BBTensor &t) {
    const int N = t.n_planes, C = t.n_classes, G = t.group, S = (t.flags & F_POW2) ? 1 : N;
    const int64_t gb = G / 8, ng = t.ngroups;
    std::vector<float> w(t.rows * t.cols);
    int64_t sp = 0;
    for (int64_t r = 0; r < t.rows; r++)
        for (int64_t col = 0; col < t.cols; col++) {
            const int64_t g = col / G, j = col % G, rg = r * ng + g;
            int c = 0;
            if (t.colmask && bit(t.colmask + g * gb, j)) c = 1;
            else if (t.elemclass && bit(t.elemclass + rg * gb, j)) c = C - 1;
            float v = 0.0f;
            for (int i = 0; i < N; i++) {
                const float a = (t.flags & F_POW2) ? f16_to_f32(t.scales_f16[(rg * C + c) * S]) * (float)(1u << i)
                                                   : f16_to_f32(t.scales_f16[(rg * C + c) * S + i]);
                v += bit(t.planes + (rg * N + i) * gb, j) ? a : -a;
            }
            if (t.offsets_f16) v += f16_to_f32(t.offsets_f16[rg * C + c]);
            if (t.colscale_f16) v *= f16_to_f32(t.colscale_f16[col]);
            if (t.sparse_mask && bit(t.sparse_mask + r * ng * gb, col))
                v = f16_to_f32(t.sparse_zs[2 * r]) * (float)t.sparse_codes[sp++] + f16_to_f32(t.sparse_zs[2 * r + 1]);
            w[r * t.cols + col] = v;
        }
    return w;
}

// max over i of |got − ref| / (|ref| + scale), scale = mean |ref| (a vector that cancels to ~0 is
// judged on the magnitude of its neighbours, as in test_kernels.cpp). NaN counts as infinitely wrong.
double rel_err(const float *got, const double *ref, int64_t n) {
    double scale = 0;
    for (int64_t i = 0; i < n; i++) scale += std::fabs(ref[i]);
    scale = scale / n + 1e-30;
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        const double e = std::fabs((double)got[i] - ref[i]) / (std::fabs(ref[i]) + scale);
        if (!(e <= worst)) worst = std::isnan(e) ? INFINITY : e;
    }
    return worst;
}

constexpr double TOL = 1e-5;

struct Case {
    std::string name;                 // <case>; the weight is <case>.weight
    std::unique_ptr<BBTensor> t;
    std::vector<float> W, X, Y;       // [rows][cols], [n_vec][cols], [n_vec][rows]
    int64_t n_vec = 0;
    std::vector<QActs> acts;          // quantized X (column scale applied)
};

// The loader's path: header, every rule of the spec, bb_prepare; then the expected tensors.
Case load_case(const GGUFFile &f, const std::string &weight) {
    Case c;
    c.name = weight.size() > 7 && weight.compare(weight.size() - 7, 7, ".weight") == 0 ? weight.substr(0, weight.size() - 7)
                                                                                      : weight;
    c.t = load_bb(f, weight);
    if (!c.t) throw std::runtime_error("no bitbasis.tensor." + weight);
    bb_prepare(*c.t, "");
    const BBTensor &t = *c.t;
    c.W = f32_matrix(f, c.name + ".dequant", t.rows, t.cols);
    const GTensor *xt = f.tensor(c.name + ".x");
    if (!xt) throw std::runtime_error("tensor " + c.name + ".x is missing");
    c.n_vec = xt->ne[0] ? xt->nelements() / xt->ne[0] : 0;
    if (c.n_vec < 1) throw std::runtime_error("tensor " + c.name + ".x is empty");
    c.X = f32_matrix(f, c.name + ".x", c.n_vec, t.cols);
    c.Y = f32_matrix(f, c.name + ".y", c.n_vec, t.rows);
    c.acts.resize(c.n_vec);
    for (int64_t k = 0; k < c.n_vec; k++)
        quantize_acts(c.X.data() + k * t.cols, t.cols, t.group, t.colscale.empty() ? nullptr : t.colscale.data(),
                      c.acts[k]);
    return c;
}

// reader + acts checks of one case; returns false on any failure.
bool check_reader(const std::string &file, const Case &c) {
    const BBTensor &t = *c.t;
    bool ok = true;
    const std::vector<float> w = dequant_spec(t);
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < w.size(); i++)
        if (!(w[i] == c.W[i])) bad++, first = first < 0 ? (int64_t)i : first;
    ok &= check(bad == 0, fmt("%s %s: dequantized %lld of %lld values differ from .dequant (first [%lld, %lld]: %.9g vs %.9g)",
                              file.c_str(), c.name.c_str(), (long long)bad, (long long)w.size(),
                              (long long)(first < 0 ? 0 : first / t.cols), (long long)(first < 0 ? 0 : first % t.cols),
                              first < 0 ? 0.0 : w[first], first < 0 ? 0.0 : c.W[first]));
    for (int64_t k = 0; k < c.n_vec; k++) {
        const QActs &a = c.acts[k];
        bool exact = true;
        for (int64_t b = 0; b < a.nblocks; b++) {
            int e;
            exact &= a.d[b] == 0.0f || std::frexp(a.d[b], &e) == 0.5f;   // a power of two
        }
        for (int64_t j = 0; j < t.cols; j++) {
            const float xk = t.colscale.empty() ? c.X[k * t.cols + j] : c.X[k * t.cols + j] * t.colscale[j];
            exact &= a.d[j / QK] * (float)a.q[j] == xk;
        }
        ok &= check(exact, fmt("%s %s: x[%lld] does not quantize exactly (d not a power of two or d*q != x*k)",
                               file.c_str(), c.name.c_str(), (long long)k));
    }
    return ok;
}

// Probes: W·(127 e_j) = 127 W[:, j] (d = |k_j| and q = ±127 exactly), so the kernel's dequantization
// of column j shows through; compared with column j of .dequant after dividing back by 127.
double check_probes(const std::string &file, Case &c, const Kernel &k, const char *lay) {
    const BBTensor &t = *c.t;
    const int64_t rows = t.rows, cols = t.cols, chunk = 64;
    std::vector<float> x(cols, 0.0f);
    std::vector<QActs> acts(chunk);
    std::vector<float> Y(rows * chunk);
    double wscale = 0;    // the tensor's magnitude: a value that cancels to ~0 is judged on it
    for (float v : c.W) wscale += std::fabs(v);
    wscale = wscale / c.W.size() + 1e-30;
    int64_t bad = 0, first = -1;
    double worst = 0;
    for (int64_t j0 = 0; j0 < cols; j0 += chunk) {
        const int64_t n = std::min(chunk, cols - j0);
        for (int64_t j = 0; j < n; j++) {
            x[j0 + j] = 127.0f;
            quantize_acts(x.data(), cols, t.group, t.colscale.empty() ? nullptr : t.colscale.data(), acts[j]);
            x[j0 + j] = 0.0f;
        }
        std::fill(Y.begin(), Y.end(), NAN);
        k.gemm(t, acts.data(), (int)n, Y.data(), rows, 0, rows);
        for (int64_t j = 0; j < n; j++)
            for (int64_t r = 0; r < rows; r++) {
                const double w = c.W[r * cols + j0 + j], got = Y[j * rows + r] / 127.0;
                double e = std::fabs(got - w) / (std::fabs(w) + wscale);
                if (std::isnan(e)) e = INFINITY;
                worst = std::max(worst, e);
                if (!(e <= TOL)) bad++, first = first < 0 ? r * cols + j0 + j : first;
            }
    }
    check(bad == 0, fmt("%s %s %s probes (%s): %lld of %lld values off (first [%lld, %lld]), rel err %.3g > %g",
                        file.c_str(), k.name, c.name.c_str(), lay, (long long)bad, (long long)(rows * cols),
                        (long long)(first < 0 ? 0 : first / cols), (long long)(first < 0 ? 0 : first % cols), worst,
                        TOL));
    return worst;
}

// One kernel on one case: y through gemv and gemm (repacked and on-disk layout) and, if `probes`,
// the columns of W (check_probes) on the loader's layout. Returns the worst relative error (INFINITY
// on NaN).
double check_kernel(const std::string &file, Case &c, const Kernel &k, bool probes) {
    BBTensor &t = *c.t;
    const int64_t rows = t.rows, nv = c.n_vec, mid = rows / 3;
    double worst = 0;
    std::vector<double> ref(rows);
    for (int layout = 0; layout < 2; layout++) {   // 0: bb_prepare(t, kernel) as the loader does; 1: on-disk
        if (layout == 0) bb_prepare(t, k.name);
        else {
            if (t.repacked_for.empty()) continue;    // no repack: layout 0 was the on-disk one
            bb_repack(t, "");
        }
        const char *lay = layout ? "on-disk" : (t.repacked_for.empty() ? "on-disk" : "repacked");
        std::vector<float> y(rows * nv, NAN), Y(rows * nv, NAN);
        for (int64_t v = 0; v < nv; v++) {
            k.gemv(t, c.acts[v], y.data() + v * rows, 0, mid);
            k.gemv(t, c.acts[v], y.data() + v * rows + mid, mid, rows);
        }
        k.gemm(t, c.acts.data(), (int)nv, Y.data(), rows, 0, mid);
        k.gemm(t, c.acts.data(), (int)nv, Y.data() + mid, rows, mid, rows);
        for (int which = 0; which < 2; which++) {
            const std::vector<float> &got = which ? Y : y;
            for (int64_t v = 0; v < nv; v++) {
                for (int64_t r = 0; r < rows; r++) ref[r] = c.Y[v * rows + r];
                const double e = rel_err(got.data() + v * rows, ref.data(), rows);
                worst = std::max(worst, e);
                check(e <= TOL, fmt("%s %s %s %s (%s): y[%lld] rel err %.3g > %g", file.c_str(), k.name, c.name.c_str(),
                                    which ? "gemm" : "gemv", lay, (long long)v, e, TOL));
            }
        }
        if (layout == 0 && probes) worst = std::max(worst, check_probes(file, c, k, lay));
    }
    return worst;
}

}  // namespace

int main(int argc, char **argv) {
    bool quick = false;
    std::string dir, source;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "--quick") quick = true;
        else if (a == "-h" || a == "--help") {
            std::printf("usage: test_vectors [--quick] [DIR]  (DIR, else $BITBASIS_VECTORS, else ./formats/vectors)\n");
            return 0;
        } else if (!a.empty() && a[0] == '-') {
            std::fprintf(stderr, "test_vectors: unknown option %s\n", a.c_str());
            return 2;
        } else if (dir.empty()) dir = a, source = "argument";
        else {
            std::fprintf(stderr, "test_vectors: more than one DIR\n");
            return 2;
        }
    }
    if (dir.empty()) {
        if (const char *e = std::getenv("BITBASIS_VECTORS"); e && *e) dir = e, source = "BITBASIS_VECTORS";
    }
    if (dir.empty()) dir = "formats/vectors", source = "default";
    const std::vector<std::string> files = is_dir(dir) ? gguf_files(dir) : std::vector<std::string>{};
    if (files.empty()) {
        if (quick && source == "default") {
            std::printf("test_vectors: vectors not found (no *.gguf in ./formats/vectors; pass DIR or set "
                        "BITBASIS_VECTORS), skipped\n");
            return 0;
        }
        std::printf("test_vectors: FAIL: no *.gguf vector files in %s (%s)\n", dir.c_str(), source.c_str());
        return 1;
    }

    std::printf("vectors: %s (%s)%s\ncpu: %s\nkernels:", dir.c_str(), source.c_str(), quick ? " --quick" : "",
                cpu_features().c_str());
    std::vector<const Kernel *> kernels;
    for (const Kernel &k : all_kernels()) {
        std::printf(" %s%s", k.name, k.supported() ? "" : "(unsupported)");
        if (k.supported()) kernels.push_back(&k);
    }
    std::printf("\n");

    int n_tensors = 0;
    for (const std::string &fname : files) {
        const std::string path = dir + "/" + fname;
        const int fail0 = g_fail;
        std::vector<Case> cases;
        try {
            GGUFFile f(path);
            int64_t version = 0;
            check(f.get_int("bitbasis.version", version) && version == 1,
                  fmt("%s: bitbasis.version %lld, expected 1", fname.c_str(), (long long)version));
            const std::string pre = "bitbasis.tensor.";
            for (const auto &kv : f.kv()) {
                if (kv.first.compare(0, pre.size(), pre) != 0) continue;
                try {
                    cases.push_back(load_case(f, kv.first.substr(pre.size())));
                } catch (const std::exception &e) {
                    check(false, fmt("%s: %s", fname.c_str(), e.what()));
                }
            }
            check(!cases.empty(), fmt("%s: no binary-basis tensors", fname.c_str()));
            int64_t values = 0;
            for (const Case &c : cases) {
                check_reader(fname, c);
                values += c.t->rows * c.t->cols;
            }
            n_tensors += (int)cases.size();
            std::printf("%-28s %-22s %2zu tensors, %lld values: %s\n", fname.c_str(), "reader", cases.size(),
                        (long long)values, g_fail == fail0 ? "dequant exact, acts exact, OK" : "FAILED");
            for (const Kernel *k : kernels) {
                const int kfail0 = g_fail;
                double worst = 0;
                const bool probes = !quick || std::string(k->name) == "scalar";
                for (Case &c : cases) worst = std::max(worst, check_kernel(fname, c, *k, probes));
                std::printf("%-28s %-22s y%s: worst rel err %.2g: %s\n", fname.c_str(), k->name,
                            probes ? " + column probes" : "", worst, g_fail == kfail0 ? "OK" : "FAILED");
            }
        } catch (const std::exception &e) {   // the file itself did not open
            check(false, fmt("%s: %s", fname.c_str(), e.what()));
            std::printf("%-28s %-22s FAILED\n", fname.c_str(), "reader");
        }
    }
    std::printf("test_vectors: %zu files, %d tensors, %zu kernels: %d checks, %d failed\n", files.size(), n_tensors,
                kernels.size(), g_checks, g_fail);
    return g_fail ? 1 : 0;
}
