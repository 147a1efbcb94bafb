/* Kernel test and benchmark hooks of libbitbasis (cpp/src/kernels_capi.cpp): not the model API
 * (that is bitbasis.h). Read by bitbasis/bench.py (cffi) and cpp/bench/bench_kernels.cpp, so the
 * declarations exist once. All functions return 0 / a value on success and -1 with bbk_error() set. */
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char *bbk_error(void);
/* "name isa supported;..." for every compiled-in kernel */
const char *bbk_kernels(void);
const char *bbk_default_kernel(void);
const char *bbk_cpu_features(void);
const char *bbk_compiler(void);

/* x[t] <- H x[t] for n_tok rows of n floats, H = blockdiag(H_b / sqrt(b)) diag(s) with the signs s of seed: the online
 * rotation through a kernel's hadamard_f32 (kernels.h). Returns 0, or -1 with bbk_error() set. */
int bbk_hadamard(const char *kernel, float *x, int64_t n_tok, int64_t n, int block, uint32_t seed);

/* Y[t][r] = sum_j W[r,j] x[t][j] for a tensor given as its on-disk component arrays (absent ones NULL);
 * repack: also run the kernel's load-time repack. */
int bbk_matmul(const char *kernel, int repack, int64_t rows, int64_t cols, int n_planes, int group, uint32_t flags,
               const uint8_t *planes, const uint16_t *scales, const uint16_t *offsets, const uint8_t *colmask,
               const uint8_t *elemclass, const uint8_t *smask, const uint8_t *scodes, const uint16_t *zs,
               const uint16_t *colscale, const float *x, int n_tok, float *y);

/* Time one kernel on random tensors (n_tok = 1: GEMV, more: GEMM). Successive calls cycle through
 * copies of the tensor whose total size is at least footprint_bytes, so weights come from memory,
 * not from the last-level cache; footprint_bytes < 0 picks 4x the L3 size, at most 512 MiB (512 MiB
 * if unknown),
 * 0 times one (cache-hot) copy. Writes best and median seconds per call, the weight bytes of one
 * copy and the number of copies. */
int bbk_bench(const char *kernel, int64_t rows, int64_t cols, int n_planes, int group, uint32_t flags, int n_tok,
              int n_threads, double min_seconds, int64_t footprint_bytes, double *best, double *median,
              double *weight_bytes, int *copies);

/* The footprint bbk_bench uses for footprint_bytes < 0. */
int64_t bbk_auto_footprint(void);

/* STREAM-style read bandwidth over a buffer of `bytes`: best GB/s. */
double bbk_read_bandwidth(int64_t bytes, int n_threads, double min_seconds);

#ifdef __cplusplus
}
#endif
