// Llama 1/2/3 and Mistral: pre-norm blocks of grouped-query attention and a SwiGLU MLP. RoPE rotates
// adjacent pairs (the converter permuted the q/k rows, as llama.cpp's does); Llama 3's RoPE scaling
// arrives as the rope_freqs tensor and Mistral's sliding window as attention.sliding_window (both
// read in model.cpp).
#include "../model.h"

namespace bb {

void load_llama_tensors(Model &m, Layer &L, int64_t il) {
    const HParams &h = m.hparams();
    const int64_t E = h.n_embd, F = h.n_ff, qd = h.n_head * h.head_dim, kvd = h.n_head_kv * h.head_dim;
    L.attn_norm = m.load_vector(blk_name(il, "attn_norm.weight"), E, true);
    L.ffn_norm = m.load_vector(blk_name(il, "ffn_norm.weight"), E, true);
    m.load_linear(L.wq, blk_name(il, "attn_q.weight"), qd, E);
    m.load_linear(L.wk, blk_name(il, "attn_k.weight"), kvd, E);
    m.load_linear(L.wv, blk_name(il, "attn_v.weight"), kvd, E);
    m.load_linear(L.wo, blk_name(il, "attn_output.weight"), E, qd);
    m.load_linear(L.wgate, blk_name(il, "ffn_gate.weight"), F, E);
    m.load_linear(L.wup, blk_name(il, "ffn_up.weight"), F, E);
    m.load_linear(L.wdown, blk_name(il, "ffn_down.weight"), E, F);
}

void llama_load(Model &m) {
    for (int64_t il = 0; il < m.hparams().n_layer; il++) {
        Layer &L = m.layers()[il];
        load_llama_tensors(m, L, il);
        L.swa = m.hparams().n_swa > 0;   // Mistral: every layer, when the file has a window
    }
}

void attention_residual(Model &m, Layer &L, int64_t il, Step &s) {
    const HParams &h = m.hparams();
    const int64_t n = s.n, E = h.n_embd, qd = h.n_head * h.head_dim;
    m.attention(s, L, il);
    m.set_input(1, s.att.data(), n, qd);
    m.matmul(L.wo, 1, s.o.data());
    ops::add(s.x, s.o.data(), n * E);
}

// x += Wdown · (silu(Wgate h) ⊙ Wup h),  h = rmsnorm(x)
void swiglu_ffn_residual(Model &m, Layer &L, Step &s) {
    const HParams &h = m.hparams();
    const int64_t n = s.n, E = h.n_embd, F = h.n_ff;
    ops::rms_norm(s.x, L.ffn_norm.data(), s.hb.data(), n, E, h.eps);
    m.set_input(0, s.hb.data(), n, E);
    m.matmul({{L.wgate, s.g.data()}, {L.wup, s.u.data()}}, 0);
    ops::swiglu(s.g.data(), s.u.data(), n * F, m.kernel());
    m.rotate_ffn_down_input(s.g.data(), n);
    m.set_input(2, s.g.data(), n, F);
    m.matmul(L.wdown, 2, s.o.data());
    ops::add(s.x, s.o.data(), n * E);
}

void llama_block(Model &m, Layer &L, int64_t il, Step &s) {
    const HParams &h = m.hparams();
    // attention: x += Wo · attn(rope(Wq h), rope(Wk h), Wv h),  h = rmsnorm(x)
    ops::rms_norm(s.x, L.attn_norm.data(), s.hb.data(), s.n, h.n_embd, h.eps);
    m.set_input(0, s.hb.data(), s.n, h.n_embd);
    m.matmul({{L.wq, s.q.data()}, {L.wk, s.k.data()}, {L.wv, s.v.data()}}, 0);
    attention_residual(m, L, il, s);
    swiglu_ffn_residual(m, L, s);
}

}  // namespace bb
