// C entry points for testing and benchmarking the kernels (declared in cpp/include/bitbasis_kernels.h).
// Not part of the model API in bitbasis.h.
#include "bitbasis_kernels.h"
#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using namespace bb;

static thread_local std::string g_err;

extern "C" const char *bbk_error(void) { return g_err.c_str(); }

// "name isa supported;..." for every compiled-in kernel, then the default one.
extern "C" const char *bbk_kernels(void) {
    static thread_local std::string s;
    s.clear();
    for (const auto &k : all_kernels()) s += std::string(k.name) + " " + k.isa + " " + (k.supported() ? "1" : "0") + ";";
    return s.c_str();
}

extern "C" const char *bbk_default_kernel(void) {
    try {
        return select_kernel().name;
    } catch (const std::exception &e) {
        g_err = e.what();
        return nullptr;
    }
}

extern "C" const char *bbk_cpu_features(void) {
    static const std::string s = cpu_features();
    return s.c_str();
}

extern "C" const char *bbk_compiler(void) {
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#else
    return "unknown";
#endif
}

static const Kernel &kernel_by_name(const char *name) {
    if (!name || !*name) return select_kernel();
    const Kernel *k = find_kernel(name);
    if (!k) throw std::runtime_error(std::string("unknown kernel ") + name);
    if (!k->supported())
        throw std::runtime_error(std::string("kernel ") + name + ": this CPU lacks " + missing_features(*k));
    return *k;
}

extern "C" int bbk_hadamard(const char *kernel, float *x, int64_t n_tok, int64_t n, int block, uint32_t seed) {
    try {
        const Kernel &k = kernel_by_name(kernel);
        if (block < 1 || (block & (block - 1)) || n < 1 || n % block || n_tok < 0)
            throw std::runtime_error("hadamard: block " + std::to_string(block) + " is not a power of two dividing " +
                                     std::to_string(n));
        ops::hadamard(x, ops::online_signs(n, seed).data(), n_tok, n, block, k);
        return 0;
    } catch (const std::exception &e) {
        g_err = e.what();
        return -1;
    }
}

// Y[t][r] = Σ_j W[r,j] x[t][j] for a tensor given as its component arrays (numpy buffers, the
// on-disk layout; absent components NULL). repack: also run the kernel's load-time repack.
// Returns 0, or -1 with bbk_error() set.
extern "C" int bbk_matmul(const char *kernel, int repack, int64_t rows, int64_t cols, int n_planes, int group, uint32_t flags,
                          const uint8_t *planes, const uint16_t *scales, const uint16_t *offsets, const uint8_t *colmask,
                          const uint8_t *elemclass, const uint8_t *smask, const uint8_t *scodes, const uint16_t *zs,
                          const uint16_t *colscale, const float *x, int n_tok, float *y) {
    try {
        const Kernel &k = kernel_by_name(kernel);
        BBTensor t;
        t.rows = rows; t.cols = cols; t.n_planes = n_planes; t.group = group; t.flags = flags;
        t.n_classes = 1 + !!(flags & F_COLMASK) + !!(flags & F_ELEMCLASS);
        t.planes = planes; t.scales_f16 = scales; t.offsets_f16 = offsets; t.colmask = colmask;
        t.elemclass = elemclass; t.sparse_mask = smask; t.sparse_codes = scodes; t.sparse_zs = zs; t.colscale_f16 = colscale;
        bb_prepare(t, repack ? k.name : "");
        std::vector<QActs> acts(n_tok);
        for (int i = 0; i < n_tok; i++)
            quantize_acts(x + i * cols, cols, group, t.colscale.empty() ? nullptr : t.colscale.data(), acts[i]);
        if (k.prepare_acts)
            for (auto &a : acts) k.prepare_acts(a);
        if (n_tok == 1) k.gemv(t, acts[0], y, 0, rows);
        else k.gemm(t, acts.data(), n_tok, y, rows, 0, rows);
        return 0;
    } catch (const std::exception &e) {
        g_err = e.what();
        return -1;
    }
}

// ---- benchmark ----------------------------------------------------------------------------------

template <class T>
struct Aligned {   // 64-byte aligned array, like an mmapped tensor
    T *p = nullptr;
    explicit Aligned(size_t n) { p = static_cast<T *>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
    ~Aligned() { std::free(p); }
};

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One random tensor and its arrays (BiLLM-like class masks: ~10% salient columns, ~20% of the
// other elements in class C-1); copies share nothing, so cycling through them misses the caches.
struct BenchTensor {
    Aligned<uint8_t> planes, colmask, elemclass;
    Aligned<uint16_t> scales, offsets;
    BBTensor t;
    int64_t pbytes, nscales, noffsets, ncolmask, nelem;
    BenchTensor(int64_t rows, int64_t cols, int n_planes, int group, uint32_t flags)
        : planes(rows * ((cols + group - 1) / group) * n_planes * (group / 8)),
          colmask(((cols + group - 1) / group) * (group / 8)),
          elemclass(rows * ((cols + group - 1) / group) * (group / 8)),
          scales(rows * ((cols + group - 1) / group) * ((flags & F_POW2) ? 1 : n_planes) * n_classes_of(flags)),
          offsets(rows * ((cols + group - 1) / group) * n_classes_of(flags)) {
        const int C = n_classes_of(flags);
        const int64_t ng = (cols + group - 1) / group;
        pbytes = rows * ng * n_planes * (group / 8);
        nscales = rows * ng * ((flags & F_POW2) ? 1 : n_planes) * C;
        noffsets = rows * ng * C;
        ncolmask = ng * (group / 8);
        nelem = rows * ng * (group / 8);
        t.rows = rows; t.cols = cols; t.n_planes = n_planes; t.group = group; t.flags = flags; t.n_classes = C;
        t.planes = planes.p; t.scales_f16 = scales.p; t.offsets_f16 = (flags & F_OFFSET) ? offsets.p : nullptr;
        t.colmask = (flags & F_COLMASK) ? colmask.p : nullptr;
        t.elemclass = (flags & F_ELEMCLASS) ? elemclass.p : nullptr;
    }
    static int n_classes_of(uint32_t flags) { return 1 + !!(flags & F_COLMASK) + !!(flags & F_ELEMCLASS); }
    void randomize(std::mt19937_64 &rng) {
        const int64_t cols = t.cols, group = t.group, ng = (cols + group - 1) / group;
        for (int64_t i = 0; i < pbytes; i += 8) {
            const uint64_t v = rng();
            std::memcpy(planes.p + i, &v, std::min<int64_t>(8, pbytes - i));
        }
        // padding columns must be zero (spec); clear them
        for (int64_t r = 0; r < t.rows; r++)
            for (int i = 0; i < t.n_planes; i++)
                for (int64_t c = cols - (ng - 1) * group; c < group; c++)
                    planes.p[((r * ng + ng - 1) * t.n_planes + i) * (group / 8) + c / 8] &= (uint8_t)~(1u << (c % 8));
        for (int64_t i = 0; i < nscales; i++) scales.p[i] = (uint16_t)(0x2000 + (rng() & 0x3ff));   // ~0.01
        for (int64_t i = 0; i < noffsets; i++) offsets.p[i] = (uint16_t)(0x1c00 + (rng() & 0x3ff));
        std::bernoulli_distribution sal(0.1), ec(0.2);
        for (int64_t i = 0; i < ncolmask; i++) {
            uint8_t b = 0;
            for (int u = 0; u < 8; u++) b |= (i * 8 + u < cols && sal(rng)) << u;
            colmask.p[i] = b;
        }
        for (int64_t i = 0; i < nelem; i++) {
            const int64_t col0 = (i % ncolmask) * 8;
            uint8_t b = 0;
            for (int u = 0; u < 8; u++) b |= (col0 + u < cols && ec(rng)) << u;
            elemclass.p[i] = b;
        }
    }
    void copy_from(const BenchTensor &o) {
        std::memcpy(planes.p, o.planes.p, pbytes);
        std::memcpy(scales.p, o.scales.p, nscales * 2);
        std::memcpy(offsets.p, o.offsets.p, noffsets * 2);
        std::memcpy(colmask.p, o.colmask.p, ncolmask);
        std::memcpy(elemclass.p, o.elemclass.p, nelem);
    }
    int64_t weight_bytes() const {   // every component the kernel reads from the file
        const uint32_t f = t.flags;
        return pbytes + nscales * 2 + ((f & F_OFFSET) ? noffsets * 2 : 0) + ((f & F_COLMASK) ? ncolmask : 0) +
               ((f & F_ELEMCLASS) ? nelem : 0);
    }
};

static constexpr int64_t kMaxAutoFootprint = (int64_t)512 << 20;

static int64_t l3_bytes() {
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (v > 0) return v;
#endif
    return 0;
}

// 4x the L3, at most 512 MiB: sysconf reports the whole socket's L3 on some CPUs (EPYC: 384 MiB)
// while one core's reach is its own slice (32 MiB), so 512 MiB is beyond any cache either way.
extern "C" int64_t bbk_auto_footprint(void) {
    return l3_bytes() > 0 ? std::min(4 * l3_bytes(), kMaxAutoFootprint) : kMaxAutoFootprint;
}

extern "C" int bbk_bench(const char *kernel, int64_t rows, int64_t cols, int n_planes, int group, uint32_t flags, int n_tok,
                         int n_threads, double min_seconds, int64_t footprint_bytes, double *best, double *median,
                         double *weight_bytes, int *copies) {
    try {
        if (flags & (F_SPARSE | F_COLSCALE | ~63u))
            throw std::runtime_error("bench: only OFFSET, POW2, COLMASK and ELEMCLASS flags");
        if (rows < 1 || cols < 1 || n_planes < 1 || n_planes > 8 || group < 8 || group % 8 || n_tok < 1 || n_threads < 1)
            throw std::runtime_error("bench: bad shape, planes, group, tokens or threads");
        const Kernel &k = kernel_by_name(kernel);
        std::vector<std::unique_ptr<BenchTensor>> ts_;
        ts_.emplace_back(new BenchTensor(rows, cols, n_planes, group, flags));
        std::mt19937_64 rng(7);
        ts_[0]->randomize(rng);
        const int64_t wb = ts_[0]->weight_bytes();
        if (footprint_bytes < 0) footprint_bytes = bbk_auto_footprint();
        const int64_t n_copies = std::max<int64_t>(1, std::min<int64_t>(4096, (footprint_bytes + wb - 1) / wb));
        for (int64_t c = 1; c < n_copies; c++) {
            ts_.emplace_back(new BenchTensor(rows, cols, n_planes, group, flags));
            ts_.back()->copy_from(*ts_[0]);
        }
        for (auto &bt : ts_) bb_prepare(bt->t, k.name);
        *weight_bytes = (double)wb;
        *copies = (int)n_copies;
        std::vector<QActs> acts(n_tok);
        std::normal_distribution<float> nd;
        std::vector<float> x(cols);
        for (int i = 0; i < n_tok; i++) {
            for (auto &v : x) v = nd(rng);
            quantize_acts(x.data(), cols, group, nullptr, acts[i]);
        }
        std::vector<float> y((size_t)rows * n_tok);
        ThreadPool pool(n_threads);
        size_t next = 0;
        auto call = [&] {
            const BBTensor &t = ts_[next]->t;
            next = (next + 1) % ts_.size();
            if (k.prepare_acts)   // the activation stage runs once per matmul, as in the model
                for (auto &a : acts) k.prepare_acts(a);
            if (n_tok == 1)
                pool.parallel_for(rows, 16, [&](int64_t r0, int64_t r1, int) { k.gemv(t, acts[0], y.data() + r0, r0, r1); });
            else
                pool.parallel_for(rows, 16, [&](int64_t r0, int64_t r1, int) { k.gemm(t, acts.data(), n_tok, y.data() + r0, rows, r0, r1); });
        };
        call();   // warm up (thread_local buffers); every copy's pages were touched when it was filled
        call();
        std::vector<double> ts;
        const double start = now();
        while (ts.size() < 3 || (now() - start < min_seconds && ts.size() < 100000)) {
            const double t0 = now();
            call();
            ts.push_back(now() - t0);
        }
        std::sort(ts.begin(), ts.end());
        *best = ts.front();
        *median = ts[ts.size() / 2];
        return 0;
    } catch (const std::exception &e) {
        g_err = e.what();
        return -1;
    }
}

// Sum of a slice with 8 independent accumulators (local, so they live in registers); the AVX2
// build reads 32 bytes per load so that one core is not limited by 16-byte SSE2 loads.
#define BBK_SUM_SLICE_BODY                                   \
    uint64_t acc[8] = {};                                    \
    for (int64_t i = a; i < b; i += 8)                       \
        for (int u = 0; u < 8; u++) acc[u] += p[i + u];      \
    for (int u = 0; u < 8; u++) s[u] += acc[u];
#if defined(__x86_64__)
BB_ISA_BEGIN("avx2")   // "ISA isolation" in kernels.h: internal linkage, called only after cpu_has("avx2")
namespace bb::avx2 {
namespace {
void sum_slice(const uint64_t *__restrict p, int64_t a, int64_t b, uint64_t *__restrict s) { BBK_SUM_SLICE_BODY }
}  // namespace
}  // namespace bb::avx2
BB_ISA_END
#endif
static void sum_slice(const uint64_t *__restrict p, int64_t a, int64_t b, uint64_t *__restrict s) {
#if defined(__x86_64__)
    if (cpu_has("avx2")) return bb::avx2::sum_slice(p, a, b, s);
#endif
    BBK_SUM_SLICE_BODY
}

// STREAM-style read bandwidth: every thread sums its slice of a buffer much larger than the caches.
// Returns the best GB/s over the repetitions, or -1.
extern "C" double bbk_read_bandwidth(int64_t bytes, int n_threads, double min_seconds) {
    try {
        const int64_t n = bytes / 8 / 64 * 64;
        Aligned<uint64_t> buf(n);
        ThreadPool pool(n_threads);
        std::vector<uint64_t> sink(n_threads * 8);
        pool.parallel_for(n, 64, [&](int64_t a, int64_t b, int) {   // first touch (pieces go to free threads: roughly the readers)
            for (int64_t i = a; i < b; i++) buf.p[i] = (uint64_t)i;
        });
        double best = 1e30;
        const double start = now();
        for (int rep = 0; rep < 3 || (now() - start < min_seconds && rep < 1000); rep++) {
            const double t0 = now();
            pool.parallel_for(n, 64, [&](int64_t a, int64_t b, int tid) {
                uint64_t s[8] = {};
                sum_slice(buf.p, a, b, s);
                for (int u = 0; u < 8; u++) sink[tid * 8 + u] += s[u];
            });
            best = std::min(best, now() - t0);
        }
        static std::atomic<uint64_t> keep{0};
        for (auto v : sink) keep += v;
        return (double)n * 8 / best / 1e9;
    } catch (const std::exception &e) {
        g_err = e.what();
        return -1;
    }
}
