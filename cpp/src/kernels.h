// Binary-basis matrix × activation kernels (spec: formats/binary_basis_v1.md).
//
// The on-disk layout is one and the same on every CPU; `bb_prepare` expands scales to f32 and may
// build an ISA-specific repacked copy of the planes. Every kernel computes exactly what
// `gemv_scalar` computes: the integer part (Σ over ±1 signs of int8 activations) is exact, the
// float part is summed in a fixed order per (row, group), so SIMD results equal the scalar
// reference up to float reassociation across groups (tests allow 1e-5 relative). Within one kernel set
// the GEMM computes each token's floats exactly as the GEMV does (bit for bit, test_kernels), so a
// token's result does not depend on how many tokens share its matmul.
//
// Files: kernels_scalar.cpp (reference, quantize_acts, bb_prepare, portable dense dots), kernels_avx512.cpp (bit-serial
// vpopcntq and masked-select vpdpbusd gemv; the 64-row lookup gemv and its tokens-in-lanes vpdpbusd gemm),
// kernels_avx2.cpp (lookup and byte-mask gemv, tokens-in-lanes vpmaddubsw gemm), kernels_tokens.inc (the
// tokens-in-lanes GEMM driver both include), kernels_lut.cpp (the lookup layouts and driver), kernels_neon.cpp (lookup and byte-mask gemv with sdot or pairwise adds), kernels_dispatch.cpp (registry, CPU detection),
// kernels_capi.cpp (bbk_* test/benchmark entry points used by bitbasis.bench). SIMD kernels handle
// one class (no COLMASK/ELEMCLASS) with any N, G, OFFSET, POW2, COLSCALE, SPARSE and hand other
// tensors to the scalar reference.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

namespace bb {

// 64-byte aligned storage for repacked planes and kernel buffers: a 512-bit load that straddles two
// cache lines costs two.
template <class T>
struct Aligned64 {
    using value_type = T;
    Aligned64() = default;
    template <class U>
    Aligned64(const Aligned64<U> &) {}
    T *allocate(size_t n) { return static_cast<T *>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T *p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U>
    bool operator==(const Aligned64<U> &) const { return true; }
    template <class U>
    bool operator!=(const Aligned64<U> &) const { return false; }
};
template <class T>
using avec = std::vector<T, Aligned64<T>>;

enum : uint32_t { F_OFFSET = 1, F_COLMASK = 2, F_ELEMCLASS = 4, F_SPARSE = 8, F_POW2 = 16, F_COLSCALE = 32 };

// One binary-basis weight: raw pointers into the (mmapped) file, validated by the loader, plus the
// data prepared once at load.
struct BBTensor {
    int64_t rows = 0, cols = 0;
    int n_planes = 0, group = 0, n_classes = 1;
    int64_t ngroups = 0;
    uint32_t flags = 0;
    const uint8_t *planes = nullptr;        // [rows][ngroups][N][G/8]
    const uint16_t *scales_f16 = nullptr;   // [rows][ngroups][C][S], S = N or 1 (POW2)
    const uint16_t *offsets_f16 = nullptr;  // [rows][ngroups][C] or null
    const uint8_t *colmask = nullptr;       // [ngroups][G/8] or null
    const uint8_t *elemclass = nullptr;     // [rows][ngroups][G/8] or null
    const uint8_t *sparse_mask = nullptr;   // [rows][ngroups][G/8] or null
    const uint8_t *sparse_codes = nullptr;  // [nnz] u8
    const uint16_t *sparse_zs = nullptr;    // [rows][2] f16 (scale, min)
    const uint16_t *colscale_f16 = nullptr; // [cols] or null
    std::vector<uint8_t> owned;             // the components above when made at load (llama.cpp's low-bit
                                            // types, llamacpp_types.h), else empty: they point into the file

    // prepared by bb_prepare()
    std::vector<float> scales;              // [rows][ngroups][C][N], POW2 expanded
    std::vector<float> offsets;             // [rows][ngroups][C] (empty without F_OFFSET)
    std::vector<float> colscale;            // [cols] (empty without F_COLSCALE)
    std::vector<int64_t> sparse_row_start;  // [rows + 1] index into sparse_codes
    std::vector<uint32_t> sparse_col;       // [nnz] column of each sparse element
    std::vector<float> sparse_dense;        // [nnz] the dense value it replaces
    std::vector<float> bias;                // [rows][ngroups] μ − Σ_i α_i (only when C == 1), so that
                                            // Σ_j w_j q_j = Σ_i 2 α_i P_i + bias · S
    avec<uint8_t> repacked;                 // optional ISA-specific copy of the planes (64-byte aligned)
    std::string repacked_for;               // which kernel the copy is for
};

// Activations of one token, quantized to int8 per block of QK = 32 columns (symmetric,
// d = max|x|/127, q = round(x/d)), zero-padded to ngroups*G (G is a multiple of 64, so a group holds
// G/QK whole blocks). One scale per 32 and not per group: SmolLM2-class models have a few outlier
// activation channels, and one scale per G = 128 left the other columns of their group only a few
// int8 levels (GPTQ 4-bit SmolLM2: engine perplexity +2.4% over the float reference with one scale
// per 128, +0.7% with one per 32; llama.cpp's Q8_0 activations use 32 too). The column scale
// (F_COLSCALE) is applied before quantizing: q/d approximate x[j]·k[j]; `x` keeps the raw
// activations for the sparse values.
constexpr int QK = 32;

struct QActs {
    int group = 0;
    int64_t cols = 0, ngroups = 0, nblocks = 0;
    std::vector<float> x;       // [ngroups*G] raw float activations (before column scale), zero padded
    std::vector<int8_t> q;      // [ngroups*G]
    std::vector<float> d;       // [nblocks] scale of each block of QK columns: x ≈ d * q
    std::vector<int32_t> qsum;  // [nblocks] Σ q over the block
    std::vector<float> dS;      // [ngroups] Σ_{blocks b of group g} d_b · qsum_b (in block order): the
                                // bias term's activation sum, shared by every kernel
    avec<uint8_t> lut;          // what Kernel::prepare_acts built from q (e.g. lookup tables), once per
                                // matmul before the rows are split among threads; quantize_acts empties it
};

void quantize_acts(const float *x, int64_t cols, int group, const float *colscale, QActs &out);

// Expand f16 scales/offsets, compute sparse row starts, and repack for `kernel` (a kernel name or an
// ISA name, i.e. its default kernel; "" or "scalar": no repack). Kernels never require a repacked
// copy: they use it when `repacked_for` names them and read the on-disk layout otherwise.
void bb_prepare(BBTensor &t, const std::string &kernel);
void bb_repack(BBTensor &t, const std::string &kernel);   // the repack step alone

// y[r - r0] = Σ_j W[r, j] x[j] for r in [r0, r1).
// Dense part per (row r, group g, block b of g, class c):
//     d_b · [Σ_i α[r,g,c,i] · (2·Σ_{j∈b,c, bit_i=1} q_j − Σ_{j∈b,c} q_j) + μ[r,g,c] · Σ_{j∈b,c} q_j]
// (one class: Σ_b d_b Σ_i 2 α_i P_ib + (μ − Σ_i α_i) · dS_g, the form the SIMD kernels use)
// Sparse elements (F_SPARSE) replace the dense value: y += v · x_j − dense(r,j) · d_b · q_j, i.e. the
// dense contribution the integer part added is removed exactly and the sparse weight multiplies the
// raw float activation x_j, so the (outlier) sparse weights keep their 8-bit precision.
using GemvFn = void (*)(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1);

// Many tokens at once (prompt processing): Y[t][r - r0] for t < n_tok; acts[t] per token.
using GemmFn = void (*)(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy,
                        int64_t r0, int64_t r1);

// Dense dot products (model.cpp's F32 / F16→F32 / Q8_0 weights and attention): part of each ISA's
// kernel set so that one CPU check covers every wide instruction the engine runs.
using DotF32Fn = float (*)(const float *a, const float *b, int64_t n);
using DotQ8Fn = float (*)(const uint8_t *row, const float *x, int64_t n);   // row: n/32 Q8_0 blocks
// Q8_0 row · int8 activations (QActs' q and per-32 scales d, QK = 32 = Q8_0's block): Σ_b d_w d_b Σ_j w_j q_j
// with the block sums exact in int32 (llama.cpp's Q8_0 × Q8_0 vec_dot).
using DotQ8Q8Fn = float (*)(const uint8_t *row, const int8_t *q, const float *d, int64_t n);
// Attention over a KV cache, one query head: out[j] = q · K[j] for rows K[j] = K + j·stride, j < n
// (the scores), and out[i] = Σ_{j<n} w[j] · V[j·stride + i] for i < hd (the weighted sum of values; out
// is overwritten). Rows of a cache are far apart, hence the stride; j outer in the scalar reference.
using DotsF32Fn = void (*)(const float *q, const float *K, int64_t stride, int64_t n, int64_t hd, float *out);
using WsumF32Fn = void (*)(const float *w, const float *V, int64_t stride, int64_t n, int64_t hd, float *out);
// g[i] = silu(g[i]) · u[i] = g[i] / (1 + e^(−g[i])) · u[i], the SwiGLU gate (Llama, Qwen, Phi-3).
using SwigluFn = void (*)(float *g, const float *u, int64_t n);
void swiglu_f32_scalar(float *g, const float *u, int64_t n);
// The KV cache in f16 (Model: quantized files, where the kernel set widens f16 in hardware): keys and values
// are rounded to f16 when stored (to_f16: round to nearest even, as F16C's vcvtps2ph and NEON's fcvtn) and
// widened exactly when read; the same scores and weighted sums as DotsF32Fn / WsumF32Fn over those rows.
// Half the cache bytes: attention reads the whole cache every token (§35: 2.3x faster at 192 positions).
using DotsF16Fn = void (*)(const float *q, const uint16_t *K, int64_t stride, int64_t n, int64_t hd, float *out);
using WsumF16Fn = void (*)(const float *w, const uint16_t *V, int64_t stride, int64_t n, int64_t hd, float *out);
using ToF16Fn = void (*)(const float *x, uint16_t *y, int64_t n);
uint16_t f32_to_f16(float f);
void to_f16_scalar(const float *x, uint16_t *y, int64_t n);
void dots_f16_scalar(const float *q, const uint16_t *K, int64_t stride, int64_t n, int64_t hd, float *out);
void wsum_f16_scalar(const float *w, const uint16_t *V, int64_t stride, int64_t n, int64_t hd, float *out);
// The attention weights of one query from its scores, in place: s[j] = e^(c·s[j] − m) / Σ_k e^(c·s[k] − m),
// m = max_k c·s[k], c = scale.
using SoftmaxFn = void (*)(float *s, int64_t n, float scale);
void softmax_f32_scalar(float *s, int64_t n, float scale);
// The online rotation (bitbasis.rotate, QuaRot's R4): x ← blockdiag(H_b/√b)·diag(s)·x over one row of n = (n/b)·b
// floats, H_b Sylvester's Hadamard matrix of order b (a power of two), s = ±1 signs: the fast Walsh–Hadamard
// transform, butterflies of stride 1, 2, …, b/2 in that order (x_i, x_{i+h} ← x_i + x_{i+h}, x_i − x_{i+h}), then
// the scale 1/√b. Every variant does the same additions in the same order, so they agree bit for bit.
using HadamardFn = void (*)(float *x, const float *s, int64_t n, int b);
void hadamard_f32_scalar(float *x, const float *s, int64_t n, int b);

// Dense weights (ggml's F32, F16 and Q8_0 row layouts: the token embedding / head, unquantized files) times
// n_tok tokens: Y[t·ldy + r − r0] = W[r] · x_t for r in [r0, r1). F32 and F16 multiply the float activations
// X [n_tok][cols] (F16 rows widened exactly to f32 first); Q8_0 multiplies each token's int8 activations q8[t]
// (QK = 32 blocks, quantized once per matmul: ggml's vec_dot_type) as dot_q8q8 does. Tiled as a GEMM: tokens
// in blocks whose activations stay in L2, rows in small groups whose weights stay in L1 (or registers)
// while a block's tokens pass, so each weight is read from memory once per block of tokens instead of once
// per token; rows are split among threads by the caller.
enum DenseType : uint32_t { DT_F32 = 0, DT_F16 = 1, DT_Q8_0 = 8 };   // = ggml_type (gguf.h TT_*)
struct DenseRows {
    uint32_t type;
    const uint8_t *data;   // row r at data + r · row_bytes
    int64_t cols;          // a multiple of 32 for Q8_0
};
int64_t dense_row_bytes(const DenseRows &w);
using GemmDenseFn = void (*)(const DenseRows &w, const float *X, const QActs *q8, int n_tok, float *Y, int64_t ldy,
                             int64_t r0, int64_t r1);
// The same tiling over one (row, token) dot at a time, with dot functions given (DotF32Fn on widened rows,
// DotQ8Q8Fn): the reference, and the dense GEMM of a kernel set without its own.
void gemm_dense_dots(const DenseRows &w, const float *X, const QActs *q8, int n_tok, float *Y, int64_t ldy, int64_t r0,
                     int64_t r1, DotF32Fn dot_f32, DotQ8Q8Fn dot_q8q8);
// How many tokens a block of the tiled dense GEMM holds: their activations (bytes_per_token each) fit
// ~128 KiB, half a small L2, at least `multiple` and a multiple of it.
int dense_token_block(int64_t bytes_per_token, int multiple);
void dots_f32_scalar(const float *q, const float *K, int64_t stride, int64_t n, int64_t hd, float *out);
void wsum_f32_scalar(const float *w, const float *V, int64_t stride, int64_t n, int64_t hd, float *out);

struct Kernel {
    const char *name;      // "avx512-lut", "avx512-vpopcnt", "avx2-lut", "avx2-bytemask", "neon-dotprod", "scalar", ...
    const char *isa;       // "scalar" | "avx2" | "avx512" | "neon"
    const char *features;  // cpu_features() names the code needs, comma separated ("" = baseline). On x86
                           // the same string is the BB_ISA_BEGIN target of the code, so what is
                           // compiled in and what is checked cannot drift apart.
    GemvFn gemv;
    GemmFn gemm;
    DotF32Fn dot_f32;
    DotQ8Fn dot_q8;
    DotQ8Q8Fn dot_q8q8;
    void (*repack)(BBTensor &t) = nullptr;  // optional load-time repack (fills t.repacked)
    // optional activation stage (ggml's vec_dot_type): called once per quantized activation vector,
    // before gemv/gemm split the rows among threads, to fill a.lut; the kernel rebuilds it itself
    // when a.lut is empty (a caller that skipped this stage)
    void (*prepare_acts)(QActs &a) = nullptr;
    // attention rows; a kernel set without its own uses the portable ones
    DotsF32Fn dots_f32 = dots_f32_scalar;
    WsumF32Fn wsum_f32 = wsum_f32_scalar;
    SwigluFn swiglu_f32 = swiglu_f32_scalar;
    // dense weights × many tokens; nullptr: gemm_dense_dots over this set's dot_f32 / dot_q8q8
    GemmDenseFn gemm_dense = nullptr;
    SoftmaxFn softmax_f32 = softmax_f32_scalar;
    // f16 KV cache rows; nullptr (no hardware conversion): the model keeps an f32 cache
    DotsF16Fn dots_f16 = nullptr;
    WsumF16Fn wsum_f16 = nullptr;
    ToF16Fn to_f16 = nullptr;
    HadamardFn hadamard_f32 = hadamard_f32_scalar;

    bool supported() const;                 // this CPU has every feature
};

// The features of `k` this CPU lacks, space separated ("" when it can run k).
std::string missing_features(const Kernel &k);

// All kernels compiled in; the first supported one for an ISA is that ISA's default.
const std::vector<Kernel> &all_kernels();
// Choose from BITBASIS_ISA (scalar|avx2|avx512|neon) or BITBASIS_KERNEL (a kernel name), else the
// fastest supported default. Throws std::runtime_error naming an unsupported request.
const Kernel &select_kernel();
std::string cpu_features();                 // e.g. "avx2 fma f16c avx512f ... " or "neon dotprod"
bool cpu_has(const std::string &feature);   // one name from cpu_features()
// k's dense GEMM (k.gemm_dense, else gemm_dense_dots over k's dots)
void run_gemm_dense(const Kernel &k, const DenseRows &w, const float *X, const QActs *q8, int n_tok, float *Y, int64_t ldy,
                    int64_t r0, int64_t r1);
const Kernel *find_kernel(const std::string &name);  // by name; nullptr if not compiled in

// The scalar reference (every flag and class). Also the tail / fallback for other kernels.
// BITBASIS_DEBUG_FLOAT_ACTS=1 (debugging only, with BITBASIS_ISA=scalar): gemv_scalar multiplies the
// dequantized weights by the float activations instead, to measure what the int8 rounding costs.
void gemv_scalar(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1);
void gemm_scalar(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1);

// Sparse correction shared by every kernel (float): one token, and n_tok tokens (GEMM layout).
void add_sparse(const BBTensor &t, const QActs &a, float *y, int64_t r0, int64_t r1);
void add_sparse_gemm(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1);

float f16_to_f32(uint16_t h);

// ---- table lookup (kernels_lut.cpp) ----------------------------------------------------------------
// The repacked layout of the lookup kernels (t.repacked, one class only): rows in tiles of 32; per
// (tile, group, plane) and 4-column group c4, 16 bytes whose byte j holds the plane bits of columns
// 4c4..4c4+3 of row j (low nibble) and row j + 16 (high nibble); then 2α as f16 [tile][g][plane][32]
// and, for tensors with offsets, μ as f16 [tile][g][32] — the file's own f16 values (2α exactly), so
// a token reads no more scale bytes than the file holds (2α and μ − Σα as f32 made an N = 2, G = 128
// tile without offsets read 2.75 bits per weight instead of 2.25: results.md §48). Activation tables (QActs::lut, 8 bytes per column): per pair of
// 4-column groups, the 16 entries' low bytes (32: even group, odd group), then their high bytes (32).
// The 64-row variant (LUT_ROWS64, avx512-lut's GEMV) has 32 bytes per c4, placed for one 256-bit
// lookup of one column group (lut_nibble), and [..][64] scales.
//
// The float sequence every lookup tile and the tokens-in-lanes GEMM share, per row, from fv = 0: per
// group g and plane i, F = −dS_g / 2, F = fma(P_ib, d_b, F) over the blocks b in order (F is then the
// ±1 dot of plane i, halved), fv = fma(F, 2α_i, fv); after the planes, fv = fma(μ, dS_g, fv) when the
// tensor has offsets. That is Σ_i 2α_i Σ_b d_b P_ib + (μ − Σ_i α_i) dS_g without a stored μ − Σα.
constexpr int LUT_ROWS = 32, LUT_ROWS64 = 64;
// How far ahead (bytes of plane nibbles) the x86 lookup tiles prefetch: the hardware prefetchers alone
// left a 7B-shape GEMV from memory at 2/3 of its cache-hot speed; 2048 gained 21 % (N = 2), more than
// 512, 1024 or 4096 (results.md §44b).
constexpr int64_t LUT_PREFETCH = 2048;

struct LutLayout {   // byte offsets inside t.repacked
    int64_t rows, ntiles, plane_bytes, alpha_off, mu_off, total;   // rows: a tile's, LUT_ROWS or LUT_ROWS64;
                                                                    // mu_off: −1 without offsets
    explicit LutLayout(const BBTensor &t, int64_t tile_rows = LUT_ROWS);
};

inline int64_t lut_table_bytes(const QActs &a) { return a.ngroups * a.group * 8; }
// sets t.repacked_for = kernel; tile_rows: LUT_ROWS or LUT_ROWS64. Leaves the tensor unrepacked (its
// kernel's fallback) when it has classes or a 2α or μ that f16 cannot hold exactly (a hostile file).
void lut_repack(BBTensor &t, const char *kernel, int64_t tile_rows = LUT_ROWS);
void lut_tables_scalar(const QActs &a, uint8_t *T);       // the tables, in plain C++

// y of the L.rows rows of tile rt for one token, into out[L.rows] (rows past t.rows: anything).
// The one switch (N): calls f(std::integral_constant<int, N>{}) for n = 1..7, N = 8 otherwise (the
// kernel templates are instantiated per plane count); each kernel family picks its instantiation with
// with_planes(n, [](auto P) -> Fn { return kernel<decltype(P)::value>; }).
template <typename F>
inline auto with_planes(int n, F f) {
    switch (n) {
        case 1: return f(std::integral_constant<int, 1>{});
        case 2: return f(std::integral_constant<int, 2>{});
        case 3: return f(std::integral_constant<int, 3>{});
        case 4: return f(std::integral_constant<int, 4>{});
        case 5: return f(std::integral_constant<int, 5>{});
        case 6: return f(std::integral_constant<int, 6>{});
        case 7: return f(std::integral_constant<int, 7>{});
        default: return f(std::integral_constant<int, 8>{});
    }
}

using LutTileFn = void (*)(const BBTensor &t, const LutLayout &L, const QActs &a, const uint8_t *T, int64_t rt, float *out);
// The driver every ISA shares: rows [r0, r1) of n_tok tokens, tiles outer and tokens inner (a tile's
// weights stay in L1 while the tokens pass); tables from acts[k].lut, else built with `tables`.
void lut_rows(const BBTensor &t, const QActs *acts, int n_tok, float *Y, int64_t ldy, int64_t r0, int64_t r1,
              LutTileFn tile, void (*tables)(const QActs &, uint8_t *), int64_t tile_rows = LUT_ROWS);

// The portable dense dots (the scalar kernel set's), fixed-width partial sums the compiler vectorizes
// for the baseline ISA.
float dot_f32_scalar(const float *a, const float *b, int64_t n);
float dot_q8_scalar(const uint8_t *row, const float *x, int64_t n);
float dot_q8q8_scalar(const uint8_t *row, const int8_t *q, const float *d, int64_t n);

// ---- ISA isolation ----------------------------------------------------------------------------------
// No file is compiled with -mavx2 / -mavx512* (or any other ISA flag): a translation unit built with
// such a flag compiles *every* function it emits for that ISA, including its out-of-line copies of
// header templates (std::vector<int>::assign, ...). Those copies are COMDAT: the linker keeps one for
// the whole library, possibly the AVX-512 one, and then ordinary code runs it on any CPU (a SIGILL in
// std::vector<int>::_M_fill_assign from model.cpp on every AVX2-only CPU, issue 15).
// Instead, a file's wide code sits between BB_ISA_BEGIN("<features>") and BB_ISA_END, inside
// `namespace bb::<isa> { namespace { ... } }`:
//  - functions *defined* in the region are compiled for <features>; header templates instantiated
//    from there keep the file's baseline target (inlined copies inside a wide function are wide, which
//    is fine; out-of-line copies, the ones the linker shares, are baseline);
//  - the anonymous namespace gives every wide function internal linkage, so none can be merged with,
//    or called by name from, another file: the only way in is a Kernel entry, which select_kernel()
//    hands out only when the CPU has k.features.
// tests/test_isa_isolation.py disassembles the built library and fails if any instruction beyond the
// x86-64 baseline appears outside bb::avx2:: / bb::avx512:: (and CI runs everything under qemu as a
// Haswell (AVX2) and a Nehalem (SSE4.2) CPU). The feature strings double as Kernel::features.
#define BB_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define BB_ISA_BEGIN(features) BB_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define BB_ISA_END BB_PRAGMA(clang attribute pop)
#else
#define BB_ISA_BEGIN(features) BB_PRAGMA(GCC push_options) BB_PRAGMA(GCC target(features))
#define BB_ISA_END BB_PRAGMA(GCC pop_options)
#endif

}  // namespace bb
