// Qwen 3 (dense): Llama's block with an RMSNorm over each head of q and of k before RoPE (NEOX),
// no biases.
#include "../model.h"

namespace bb {

void qwen3_load(Model &m) {
    HParams &h = m.hparams();
    h.rope_kind = ops::ROPE_NEOX;
    for (int64_t il = 0; il < h.n_layer; il++) {
        Layer &L = m.layers()[il];
        load_llama_tensors(m, L, il);
        L.q_norm = m.load_vector(blk_name(il, "attn_q_norm.weight"), h.head_dim, true);
        L.k_norm = m.load_vector(blk_name(il, "attn_k_norm.weight"), h.head_dim, true);
    }
}

void qwen3_block(Model &m, Layer &L, int64_t il, Step &s) {
    const HParams &h = m.hparams();
    const int64_t n = s.n, E = h.n_embd, hd = h.head_dim;
    ops::rms_norm(s.x, L.attn_norm.data(), s.hb.data(), n, E, h.eps);
    m.set_input(0, s.hb.data(), n, E);
    m.matmul({{L.wq, s.q.data()}, {L.wk, s.k.data()}, {L.wv, s.v.data()}}, 0);
    // per-head norms: every head_dim slice of q and k (rows of [n * heads][head_dim])
    ops::rms_norm(s.q.data(), L.q_norm.data(), s.q.data(), n * h.n_head, hd, h.eps);
    ops::rms_norm(s.k.data(), L.k_norm.data(), s.k.data(), n * h.n_head_kv, hd, h.eps);
    attention_residual(m, L, il, s);
    swiglu_ffn_residual(m, L, s);
}

}  // namespace bb
