// Phi-3: Llama's block with fused linears, kept fused as llama.cpp stores them: attn_qkv holds the
// [q; k; v] rows, ffn_up the [gate; up] rows; each product is split by rows after the one matmul.
// NEOX RoPE over the first rope.dimension_count dims of a head (partial rotary).
#include "../model.h"

#include <cstring>

namespace bb {

void phi3_load(Model &m) {
    HParams &h = m.hparams();
    h.rope_kind = ops::ROPE_NEOX;
    const int64_t E = h.n_embd, F = h.n_ff, qd = h.n_head * h.head_dim, kvd = h.n_head_kv * h.head_dim;
    for (int64_t il = 0; il < h.n_layer; il++) {
        Layer &L = m.layers()[il];
        L.attn_norm = m.load_vector(blk_name(il, "attn_norm.weight"), E, true);
        L.ffn_norm = m.load_vector(blk_name(il, "ffn_norm.weight"), E, true);
        m.load_linear(L.wqkv, blk_name(il, "attn_qkv.weight"), qd + 2 * kvd, E);
        m.load_linear(L.wo, blk_name(il, "attn_output.weight"), E, qd);
        m.load_linear(L.wup, blk_name(il, "ffn_up.weight"), 2 * F, E);
        m.load_linear(L.wdown, blk_name(il, "ffn_down.weight"), E, F);
        L.swa = h.n_swa > 0;
    }
}

// rows [r0, r0 + w) of each token's `width`-row product into dst [n][w]
static void take_rows(const float *src, int64_t n, int64_t width, int64_t r0, int64_t w, float *dst) {
    for (int64_t t = 0; t < n; t++) std::memcpy(dst + t * w, src + t * width + r0, w * sizeof(float));
}

void phi3_block(Model &m, Layer &L, int64_t il, Step &s) {
    const HParams &h = m.hparams();
    const int64_t n = s.n, E = h.n_embd, F = h.n_ff, qd = h.n_head * h.head_dim, kvd = h.n_head_kv * h.head_dim;
    ops::rms_norm(s.x, L.attn_norm.data(), s.hb.data(), n, E, h.eps);
    m.set_input(0, s.hb.data(), n, E);
    m.matmul(L.wqkv, 0, s.fused.data());
    take_rows(s.fused.data(), n, qd + 2 * kvd, 0, qd, s.q.data());
    take_rows(s.fused.data(), n, qd + 2 * kvd, qd, kvd, s.k.data());
    take_rows(s.fused.data(), n, qd + 2 * kvd, qd + kvd, kvd, s.v.data());
    attention_residual(m, L, il, s);

    ops::rms_norm(s.x, L.ffn_norm.data(), s.hb.data(), n, E, h.eps);
    m.set_input(0, s.hb.data(), n, E);
    m.matmul(L.wup, 0, s.fused.data());
    take_rows(s.fused.data(), n, 2 * F, 0, F, s.g.data());
    take_rows(s.fused.data(), n, 2 * F, F, F, s.u.data());
    ops::swiglu(s.g.data(), s.u.data(), n * F, m.kernel());
    m.rotate_ffn_down_input(s.g.data(), n);
    m.set_input(2, s.g.data(), n, F);
    m.matmul(L.wdown, 2, s.o.data());
    ops::add(s.x, s.o.data(), n * E);
}

}  // namespace bb
