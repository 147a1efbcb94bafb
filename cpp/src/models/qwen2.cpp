// Qwen 2 / 2.5: Llama's block (llama_block) with biases on q, k and v, and NEOX RoPE (rows as trained,
// rotate_half pairs (i, i + d/2)).
#include "../model.h"

namespace bb {

void qwen2_load(Model &m) {
    HParams &h = m.hparams();
    h.rope_kind = ops::ROPE_NEOX;
    const int64_t qd = h.n_head * h.head_dim, kvd = h.n_head_kv * h.head_dim;
    for (int64_t il = 0; il < h.n_layer; il++) {
        Layer &L = m.layers()[il];
        load_llama_tensors(m, L, il);
        L.wq.bias = m.load_vector(blk_name(il, "attn_q.bias"), qd, true);
        L.wk.bias = m.load_vector(blk_name(il, "attn_k.bias"), kvd, true);
        L.wv.bias = m.load_vector(blk_name(il, "attn_v.bias"), kvd, true);
    }
}

}  // namespace bb
