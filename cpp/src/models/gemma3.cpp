// Gemma 3 (text): embeddings times sqrt(n_embd); each branch normed on the way in and on the way out
// (RMSNorm weights are stored as 1 + w, as llama.cpp's converter writes them); per-head q/k norms;
// GeGLU (tanh gelu) MLP; NEOX RoPE. Layers alternate local sliding-window attention (RoPE base
// rope.freq_base_swa, 10000 by default) with global attention (rope.freq_base): the pattern from
// attention.sliding_window_pattern, else llama.cpp's default of every sixth layer global.
#include "../model.h"

#include <cmath>
#include <stdexcept>

namespace bb {

void gemma3_load(Model &m) {
    HParams &h = m.hparams();
    h.rope_kind = ops::ROPE_NEOX;
    h.embd_scale = std::sqrt((float)h.n_embd);
    h.attn_softcap = 0.f;   // Gemma 2's; Gemma 3 has none (transformers and llama.cpp ignore the key)
    double base_swa = 10000.0;
    m.get_float("rope.freq_base_swa", base_swa);
    if (!(base_swa > 0 && std::isfinite(base_swa))) throw std::runtime_error("gemma3.rope.freq_base_swa must be positive");
    h.rope_base_swa = (float)base_swa;
    std::vector<int64_t> pattern;
    m.file().get_int_array("gemma3.attention.sliding_window_pattern", pattern);
    if (!pattern.empty() && (int64_t)pattern.size() != h.n_layer)
        throw std::runtime_error("gemma3.attention.sliding_window_pattern has " + std::to_string(pattern.size()) +
                                 " entries for " + std::to_string(h.n_layer) + " layers");
    if (h.n_swa == 0) h.n_swa = 512;   // llama.cpp's gemma3 default
    for (int64_t il = 0; il < h.n_layer; il++) {
        Layer &L = m.layers()[il];
        load_llama_tensors(m, L, il);
        L.post_attn_norm = m.load_vector(blk_name(il, "post_attention_norm.weight"), h.n_embd, true);
        L.post_ffn_norm = m.load_vector(blk_name(il, "post_ffw_norm.weight"), h.n_embd, true);
        L.q_norm = m.load_vector(blk_name(il, "attn_q_norm.weight"), h.head_dim, true);
        L.k_norm = m.load_vector(blk_name(il, "attn_k_norm.weight"), h.head_dim, true);
        L.swa = pattern.empty() ? (il + 1) % 6 != 0 : pattern[il] != 0;
    }
}

void gemma3_block(Model &m, Layer &L, int64_t il, Step &s) {
    const HParams &h = m.hparams();
    const int64_t n = s.n, E = h.n_embd, F = h.n_ff, hd = h.head_dim, qd = h.n_head * hd;
    // attention: x += postnorm(Wo · attn(...)), q and k normed per head before RoPE
    ops::rms_norm(s.x, L.attn_norm.data(), s.hb.data(), n, E, h.eps);
    m.set_input(0, s.hb.data(), n, E);
    m.matmul({{L.wq, s.q.data()}, {L.wk, s.k.data()}, {L.wv, s.v.data()}}, 0);
    ops::rms_norm(s.q.data(), L.q_norm.data(), s.q.data(), n * h.n_head, hd, h.eps);
    ops::rms_norm(s.k.data(), L.k_norm.data(), s.k.data(), n * h.n_head_kv, hd, h.eps);
    m.attention(s, L, il);
    m.set_input(1, s.att.data(), n, qd);
    m.matmul(L.wo, 1, s.o.data());
    ops::rms_norm(s.o.data(), L.post_attn_norm.data(), s.o.data(), n, E, h.eps);
    ops::add(s.x, s.o.data(), n * E);
    // MLP: x += postnorm(Wdown · (gelu_tanh(Wgate h) ⊙ Wup h))
    ops::rms_norm(s.x, L.ffn_norm.data(), s.hb.data(), n, E, h.eps);
    m.set_input(0, s.hb.data(), n, E);
    m.matmul({{L.wgate, s.g.data()}, {L.wup, s.u.data()}}, 0);
    ops::geglu_tanh(s.g.data(), s.u.data(), n * F);
    m.rotate_ffn_down_input(s.g.data(), n);
    m.set_input(2, s.g.data(), n, F);
    m.matmul(L.wdown, 2, s.o.data());
    ops::rms_norm(s.o.data(), L.post_ffn_norm.data(), s.o.data(), n, E, h.eps);
    ops::add(s.x, s.o.data(), n * E);
}

}  // namespace bb
