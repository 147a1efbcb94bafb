// Kernel registry and run-time selection (CPUID on x86-64, getauxval on aarch64): the engine's one
// CPU detector. Compiled for the baseline ISA, like every file (see "ISA isolation" in kernels.h).
#include "kernels.h"

#include <algorithm>
#include <cstdlib>
#include <sstream>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace bb {

// Each per-ISA file appends its kernels, fastest first. Weak, so that a build without one of the
// files (another architecture) still links.
__attribute__((weak)) void add_kernels_avx512(std::vector<Kernel> &);
__attribute__((weak)) void add_kernels_avx2(std::vector<Kernel> &);
__attribute__((weak)) void add_kernels_neon(std::vector<Kernel> &);
void add_kernels_scalar_lut(std::vector<Kernel> &);

static std::vector<std::string> detect() {
    std::vector<std::string> f;
#if defined(__x86_64__) || defined(_M_X64)
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27);
    uint64_t xcr0 = 0;
    if (osxsave) {
        uint32_t lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = ((uint64_t)hi << 32) | lo;
    }
    const bool ymm = (xcr0 & 6) == 6, zmm = (xcr0 & 0xe6) == 0xe6;  // OS saves the vector state
    if (c & (1u << 23)) f.push_back("popcnt");
    if (ymm && (c & (1u << 12))) f.push_back("fma");
    if (ymm && (c & (1u << 29))) f.push_back("f16c");
    unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
    __get_cpuid_count(7, 0, &a7, &b7, &c7, &d7);
    if (ymm && (b7 & (1u << 5))) f.push_back("avx2");
    if (zmm && (b7 & (1u << 16))) f.push_back("avx512f");
    if (zmm && (b7 & (1u << 30))) f.push_back("avx512bw");
    if (zmm && (b7 & (1u << 31))) f.push_back("avx512vl");
    if (zmm && (b7 & (1u << 17))) f.push_back("avx512dq");
    if (zmm && (c7 & (1u << 11))) f.push_back("avx512vnni");
    if (zmm && (c7 & (1u << 12))) f.push_back("avx512bitalg");
    if (zmm && (c7 & (1u << 14))) f.push_back("avx512vpopcntdq");
#elif defined(__aarch64__)
    const unsigned long hw = getauxval(AT_HWCAP);
    if (hw & HWCAP_ASIMD) f.push_back("neon");
    if (hw & HWCAP_ASIMDDP) f.push_back("dotprod");
#endif
    return f;
}

static const std::vector<std::string> &features() {
    static const std::vector<std::string> f = detect();
    return f;
}

bool cpu_has(const std::string &feature) {
    for (const auto &f : features())
        if (f == feature) return true;
    return false;
}

std::string cpu_features() {
    std::string s;
    for (const auto &f : features()) s += (s.empty() ? "" : " ") + f;
    return s;
}

std::string missing_features(const Kernel &k) {
    std::string missing, f;
    for (const char *p = k.features;; p++) {
        if (*p && *p != ',') {
            f += *p;
            continue;
        }
        if (!f.empty() && !cpu_has(f)) missing += (missing.empty() ? "" : " ") + f;
        f.clear();
        if (!*p) break;
    }
    return missing;
}

void run_gemm_dense(const Kernel &k, const DenseRows &w, const float *X, const QActs *q8, int n_tok, float *Y, int64_t ldy,
                    int64_t r0, int64_t r1) {
    if (k.gemm_dense) k.gemm_dense(w, X, q8, n_tok, Y, ldy, r0, r1);
    else gemm_dense_dots(w, X, q8, n_tok, Y, ldy, r0, r1, k.dot_f32, k.dot_q8q8);
}

bool Kernel::supported() const { return missing_features(*this).empty(); }

const std::vector<Kernel> &all_kernels() {
    static const std::vector<Kernel> ks = [] {
        std::vector<Kernel> v;
        if (add_kernels_avx512) add_kernels_avx512(v);
        if (add_kernels_avx2) add_kernels_avx2(v);
        if (add_kernels_neon) add_kernels_neon(v);
        v.push_back(Kernel{"scalar", "scalar", "", gemv_scalar, gemm_scalar, dot_f32_scalar, dot_q8_scalar, dot_q8q8_scalar, nullptr});
        add_kernels_scalar_lut(v);   // after "scalar", which stays the scalar ISA's default
        // AVX-512 default: the lookup kernels (their GEMV beat both AVX-512 GEMVs at every N and shape on a
        // Xeon with VPOPCNTDQ, docs/results.md §15) with 64-row lookup tiles for the GEMV (results.md §44)
        // and an AVX-512 tokens-in-lanes GEMM that computes the lookup tile's floats in the same order
        // (kernels_avx512.cpp): a token's result must not depend on how many tokens share its matmul (a
        // GEMV step, a prompt batch, a server batch), and int8 activations turn two summation orders into
        // visibly different logits (0.23 on SmolLM2 N = 4, a seeded server reply that differed from the
        // same request streamed: results.md §39). add_kernels_avx512 registers only the GEMV, its repack
        // and the GEMM; the rest of the set (tables, dense dots, attention rows) is avx2-lut's.
        const Kernel *lut = nullptr;
        for (const auto &k : v)
            if (std::string(k.name) == "avx2-lut") lut = &k;
        for (auto &k : v)
            if (std::string(k.name) == "avx512-lut") {
                Kernel whole = *lut;   // add_kernels_avx2 is compiled in wherever add_kernels_avx512 is
                whole.name = k.name, whole.isa = k.isa, whole.features = k.features, whole.gemv = k.gemv, whole.gemm = k.gemm;
                whole.repack = k.repack;
                k = whole;
            }
        return v;
    }();
    return ks;
}

const Kernel *find_kernel(const std::string &name) {
    for (const auto &k : all_kernels())
        if (name == k.name) return &k;
    return nullptr;
}

static std::string kernel_names() {
    std::string s;
    for (const auto &k : all_kernels()) s += (s.empty() ? "" : ", ") + std::string(k.name);
    return s;
}

// The default kernel of an ISA: the first supported one of that ISA in all_kernels() order.
static const Kernel *isa_default(const std::string &isa) {
    for (const auto &k : all_kernels())
        if (isa == k.isa && k.supported()) return &k;
    return nullptr;
}

const Kernel &select_kernel() {
    if (const char *name = std::getenv("BITBASIS_KERNEL"); name && *name) {
        const Kernel *k = find_kernel(name);
        if (!k) throw std::runtime_error(std::string("BITBASIS_KERNEL=") + name + ": unknown kernel (built: " +
                                         kernel_names() + ")");
        if (!k->supported())
            throw std::runtime_error(std::string("BITBASIS_KERNEL=") + name + ": this CPU lacks " + missing_features(*k) +
                                     " (has: " + cpu_features() + ")");
        return *k;
    }
    if (const char *isa = std::getenv("BITBASIS_ISA"); isa && *isa) {
        const std::string s = isa;
        if (s != "scalar" && s != "avx2" && s != "avx512" && s != "neon")
            throw std::runtime_error("BITBASIS_ISA=" + s + ": must be scalar, avx2, avx512 or neon");
        const Kernel *k = isa_default(s);
        if (!k) {   // name what is missing: the ISA's kernel that lacks the fewest features
            std::string lack;
            auto words = [](const std::string &w) { return std::count(w.begin(), w.end(), ' ') + !w.empty(); };
            for (const auto &kk : all_kernels())
                if (s == kk.isa && (lack.empty() || words(missing_features(kk)) < words(lack))) lack = missing_features(kk);
            if (lack.empty())
                throw std::runtime_error("BITBASIS_ISA=" + s + ": this build has no " + s + " kernels (built: " +
                                         kernel_names() + ")");
            throw std::runtime_error("BITBASIS_ISA=" + s + ": this CPU lacks " + lack + " (has: " + cpu_features() + ")");
        }
        return *k;
    }
    for (const auto &k : all_kernels())
        if (k.supported()) return k;
    return all_kernels().back();
}

void bb_repack(BBTensor &t, const std::string &kernel) {
    t.repacked.clear();
    t.repacked.shrink_to_fit();
    t.repacked_for.clear();
    if (kernel.empty() || kernel == "scalar") return;
    const Kernel *k = find_kernel(kernel);
    if (!k) k = isa_default(kernel);
    if (!k || !k->supported()) throw std::runtime_error("bb_prepare: unknown or unsupported kernel '" + kernel + "'");
    if (k->repack) k->repack(t);
}

}  // namespace bb
