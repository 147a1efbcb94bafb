#include "ops.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>

namespace bb {
namespace ops {

void rms_norm(const float *x, const float *w, float *out, int64_t n_tok, int64_t n, float eps) {
    for (int64_t t = 0; t < n_tok; t++) {
        const float *xt = x + t * n;
        float *ot = out + t * n;
        double ss = 0;
        for (int64_t i = 0; i < n; i++) ss += (double)xt[i] * xt[i];
        const float scale = (float)(1.0 / std::sqrt(ss / (double)n + (double)eps));
        for (int64_t i = 0; i < n; i++) ot[i] = xt[i] * scale * w[i];
    }
}

std::vector<float> rope_inv_freq(double base, int64_t n_rot, const std::vector<float> &factors, double linear) {
    // as transformers computes them (in double, then rounded), so both sides rotate by the same angles
    std::vector<float> f(n_rot / 2);
    for (int64_t i = 0; i < n_rot / 2; i++) {
        f[i] = (float)(1.0 / std::pow(base, (double)(2 * i) / (double)n_rot));
        if (!factors.empty()) f[i] /= factors[i];
        if (linear != 1.0) f[i] = (float)(f[i] / linear);
    }
    return f;
}

void rope(float *v, int64_t n_heads, int64_t head_dim, int64_t n_rot, int64_t pos, const std::vector<float> &inv_freq,
          RopeKind kind) {
    const int64_t half = n_rot / 2;
    thread_local std::vector<float> cs;
    cs.resize(n_rot);
    for (int64_t i = 0; i < half; i++) {
        const float a = (float)pos * inv_freq[i];
        cs[2 * i] = std::cos(a);
        cs[2 * i + 1] = std::sin(a);
    }
    // pair i: its two elements' offsets in the head
    const int64_t step = kind == ROPE_NEOX ? 1 : 2, other = kind == ROPE_NEOX ? half : 1;
    for (int64_t h = 0; h < n_heads; h++) {
        float *p = v + h * head_dim;
        for (int64_t i = 0; i < half; i++) {
            const float c = cs[2 * i], s = cs[2 * i + 1];
            float &a = p[i * step], &b = p[i * step + other];
            const float x0 = a, x1 = b;
            a = x0 * c - x1 * s;
            b = x0 * s + x1 * c;
        }
    }
}

// the scores of a head's window, its softmax (soft-capped first if asked), the weighted sum of values
template <class T, class Dots, class Wsum>
static void attend(const float *q, const T *kc, const T *vc, int64_t pos, const AttnParams &p, const Kernel &k, float *sc,
                   float *out, Dots dots, Wsum wsum) {
    const int64_t hd = p.head_dim, p0 = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0, len = pos + 1 - p0;
    float *s = sc + p0;
    dots(q, kc + p0 * p.kv_stride, p.kv_stride, len, hd, s);
    if (p.softcap > 0) {   // scores = softcap · tanh(scale · q·k / softcap), then the softmax
        for (int64_t j = 0; j < len; j++) s[j] = p.softcap * std::tanh(s[j] * p.scale / p.softcap);
        k.softmax_f32(s, len, 1.0f);
    } else {
        k.softmax_f32(s, len, p.scale);
    }
    wsum(s, vc + p0 * p.kv_stride, p.kv_stride, len, hd, out);
}

void attend_head(const float *q, const float *kc, const float *vc, int64_t pos, const AttnParams &p, const Kernel &k,
                 float *sc, float *out) {
    attend(q, kc, vc, pos, p, k, sc, out, k.dots_f32, k.wsum_f32);
}

void attend_head(const float *q, const uint16_t *kc, const uint16_t *vc, int64_t pos, const AttnParams &p, const Kernel &k,
                 float *sc, float *out) {
    attend(q, kc, vc, pos, p, k, sc, out, k.dots_f16, k.wsum_f16);
}

void swiglu(float *g, const float *u, int64_t n, const Kernel &k) { k.swiglu_f32(g, u, n); }

void hadamard(float *x, const float *s, int64_t n_tok, int64_t n, int block, const Kernel &k) {
    for (int64_t t = 0; t < n_tok; t++) k.hadamard_f32(x + t * n, s, n, block);
}

std::vector<float> online_signs(int64_t n, uint64_t seed) {
    std::vector<float> s(n);
    for (int64_t i = 0; i < n; i++) {
        uint64_t z = seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        s[i] = (z >> 63) ? -1.0f : 1.0f;
    }
    return s;
}

void geglu_tanh(float *g, const float *u, int64_t n) {
    const float k = 0.7978845608028654f;   // sqrt(2/pi): gelu's tanh approximation (gelu_pytorch_tanh)
    for (int64_t i = 0; i < n; i++) {
        const float x = g[i];
        g[i] = 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x))) * u[i];
    }
}

void softcap(float *x, int64_t n, float cap) {
    for (int64_t i = 0; i < n; i++) x[i] = cap * std::tanh(x[i] / cap);
}

void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

}  // namespace ops
}  // namespace bb
