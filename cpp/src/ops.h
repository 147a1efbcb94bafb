// The operations the architectures share (cpp/src/models/*.cpp), on plain f32 rows: RMSNorm, RoPE
// (llama.cpp's two layouts), one attention head over a KV cache (grouped-query, optional sliding
// window and logit soft-capping), the gated MLP activations. Each is written once here so a new
// architecture is a list of calls, as llama.cpp's graph builders are.
#pragma once
#include <cstdint>
#include <vector>

namespace bb {
struct Kernel;
namespace ops {

// out = x / rms(x) * w over rows of n (in place when out == x). Gemma's (1 + w) is not a variant
// here: its files hold 1 + w, as llama.cpp's converter writes them (bitbasis.arch norm_offset).
void rms_norm(const float *x, const float *w, float *out, int64_t n_tok, int64_t n, float eps);

// RoPE on the first n_rot dims of each of n_heads heads of one token at position pos.
// NORMAL rotates adjacent pairs (2i, 2i+1) (llama: q/k rows permuted at conversion to match);
// NEOX rotates (i, i + n_rot/2), HF's rotate_half (Qwen, Gemma, Phi-3: rows as trained).
enum RopeKind { ROPE_NORMAL = 0, ROPE_NEOX = 2 };
void rope(float *v, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos, const std::vector<float> &inv_freq,
          RopeKind kind);

// RoPE inverse frequencies base^(-2i/n_rot), divided by per-frequency factors (llama-3 scaling's
// rope_freqs tensor) when given, and by a linear scaling factor.
std::vector<float> rope_inv_freq(double base, int64_t n_rot, const std::vector<float> &factors, double linear);

struct AttnParams {
    int64_t head_dim = 0, kv_stride = 0;  // floats per cached position (n_head_kv * head_dim)
    float scale = 1.f;                    // multiplies q·k (1/sqrt(head_dim) unless the model says)
    float softcap = 0.f;                  // > 0: scores = softcap * tanh(scores / softcap) (Gemma 2)
    int64_t window = 0;                   // > 0: a query at p sees keys p - window < j <= p only
};
// One query head at position pos against cached keys/values kc, vc (already offset to its kv head):
// softmax(scale * q·k) · v into out[head_dim]. sc: scratch of at least pos + 1 floats. The scores and
// the weighted sum of values are the kernel's attention rows (k.dots_f32, k.wsum_f32).
void attend_head(const float *q, const float *kc, const float *vc, int64_t pos, const AttnParams &p, const Kernel &k,
                 float *sc, float *out);
// The same over an f16 cache (k.dots_f16, k.wsum_f16; Model's cache of quantized files).
void attend_head(const float *q, const uint16_t *kc, const uint16_t *vc, int64_t pos, const AttnParams &p, const Kernel &k,
                 float *sc, float *out);

void swiglu(float *g, const float *u, int64_t n, const Kernel &k);   // g = silu(g) * u (Llama, Qwen, Phi-3): k.swiglu_f32
void geglu_tanh(float *g, const float *u, int64_t n);   // g = gelu_tanh(g) * u (Gemma)
void softcap(float *x, int64_t n, float cap);           // x = cap * tanh(x / cap)
void add(float *x, const float *y, int64_t n);          // x += y (the residual stream)

// The online rotation before ffn_down (bitbasis.rotate; the file's W_down holds W·Hᵀ): each of n_tok rows of
// n floats ← H·x, H = blockdiag(H_b/√b)·diag(s), by the kernel's fast Walsh–Hadamard transform (k.hadamard_f32).
void hadamard(float *x, const float *s, int64_t n_tok, int64_t n, int block, const Kernel &k);
// Its signs s_i = ±1, i < n: the top bit of splitmix64's i-th output from seed (bitbasis.rotate.online_signs).
std::vector<float> online_signs(int64_t n, uint64_t seed);

}  // namespace ops
}  // namespace bb
