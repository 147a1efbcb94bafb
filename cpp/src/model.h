// The forward pass over a GGUF file of a supported architecture (llama.cpp conventions): token
// embedding, the blocks of the file's architecture (ARCHS in model.cpp; one file each in
// cpp/src/models/, built from the shared ops in ops.h), final RMSNorm, tied or untied output head.
// Attention is grouped-query with an f32 or f16 KV cache (Model::kv_f16). Dense weights are
// F32/F16/Q8_0; the block linear weights may be binary-basis tensors, run through the kernel
// interface (kernels.h).
//
// As llama.cpp splits llama_model from llama_context: a Model holds the mmap'd weights, loaded once;
// any number of Contexts each hold one sequence's KV cache and position. Model::decode runs one
// forward pass over tokens of several contexts at once, so the weights are read once for all of
// them (continuous batching: one matmul for every sequence's next token).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "gguf.h"
#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

namespace bb {

// A linear weight W [rows, cols] (y = W x): dense ggml type, or binary basis.
struct Linear {
    std::string name;
    int64_t rows = 0, cols = 0;
    uint32_t type = 0;                 // TT_F32 / TT_F16 / TT_Q8_0, ignored when bb is set
    const uint8_t *data = nullptr;
    std::unique_ptr<BBTensor> bb;
    std::vector<float> bias;           // [rows] or empty (Qwen2's q/k/v)
    // Binary basis: run on the int8 activations *and* on the int8 code of their rounding residual
    // (Model::precise_acts_, for this linear alone): for inputs whose outliers leave the other columns
    // of their 32-block too few int8 levels. An architecture's load function may set it; none does today:
    // on a calibrated Gemma 3 file no one kind of linear carries the int8 error (results.md §32), so this
    // is reached through BITBASIS_PRECISE_ACTS=name,... for measuring.
    bool precise = false;
};

// The weights of one block; an architecture loads the ones it uses.
struct Layer {
    std::vector<float> attn_norm, ffn_norm;
    std::vector<float> post_attn_norm, post_ffn_norm;   // Gemma: norms of each branch's output
    std::vector<float> q_norm, k_norm;                  // Qwen3, Gemma 3: per-head RMSNorm of q and k
    Linear wq, wk, wv, wo, wgate, wup, wdown;
    Linear wqkv;                                        // Phi-3: [q; k; v] rows in one tensor
    bool swa = false;                                   // attends over a sliding window (hp.n_swa)
};

struct HParams {
    int64_t n_vocab = 0, n_embd = 0, n_ff = 0, n_layer = 0, n_head = 0, n_head_kv = 0;
    int64_t head_dim = 0, n_rot = 0, n_ctx_train = 0;
    float eps = 1e-5f, rope_base = 10000.f, rope_base_swa = 10000.f;
    ops::RopeKind rope_kind = ops::ROPE_NORMAL;
    int64_t n_swa = 0;                  // sliding window of the swa layers (0: none)
    float attn_scale = 0.f;             // q·k multiplier (set to 1/sqrt(head_dim) unless the file says)
    float attn_softcap = 0.f, final_softcap = 0.f;   // logit soft-capping (0: off)
    float embd_scale = 1.f;             // Gemma: embeddings times sqrt(n_embd)
};

// Quantized activations of a batch, one entry per (group size, column scale) a weight asks for.
struct ActsCache {
    const float *x = nullptr;
    int n_tok = 0;
    int64_t cols = 0;
    struct Entry {
        int group;
        const float *colscale;
        std::vector<QActs> acts;
        std::vector<QActs> resid;   // precise acts: the int8 code of each token's rounding residual
        bool has_resid = false;     // resid holds this batch's (made on the first precise linear's call)
    };
    std::vector<Entry> entries;
    size_t used = 0;
    void reset(const float *x_, int n, int64_t c) { x = x_, n_tok = n, cols = c, used = 0; }
};

class Model;
class Context;

// The activations of one forward pass over n tokens, handed to an architecture's block function.
// Token t is at position pos[t] of context ctx[t]; x is the residual stream [n][n_embd]; the other
// buffers are sized for the model ([n] rows of n_embd, q, k/v, attention output, n_ff; fused: the
// widest fused linear's output).
struct Step {
    int64_t n = 0;
    const int64_t *pos = nullptr;
    Context *const *ctx = nullptr;
    float *x = nullptr;
    std::vector<float> hb, o, q, k, v, att, g, u, fused;
};

// One architecture (ARCHS in model.cpp): `load` reads what its blocks need beyond the common
// hyper-parameters and tensors (model.cpp's Model::load), `block` runs one block on a Step.
struct ArchDef {
    const char *name;
    void (*load)(Model &m);
    void (*block)(Model &m, Layer &L, int64_t il, Step &s);
};

// "blk.<il>.<name>", a block tensor's GGUF name
inline std::string blk_name(int64_t il, const char *name) { return "blk." + std::to_string(il) + "." + name; }
// The two norms and seven linears of a Llama-style block (models/llama.cpp; Qwen and Gemma share them).
void load_llama_tensors(Model &m, Layer &L, int64_t il);
// The halves of Llama's block that other architectures reuse (models/llama.cpp), as llama.cpp's
// build_attn/build_ffn: attention over s.q/s.k/s.v, then x += Wo · att; and x += SwiGLU MLP(rmsnorm(x)).
void attention_residual(Model &m, Layer &L, int64_t il, Step &s);
void swiglu_ffn_residual(Model &m, Layer &L, Step &s);

// One sequence: its KV cache and position. Bound to the Model it was made for (which must outlive it).
class Context {
public:
    Context(const Model &model, int64_t n_ctx);  // n_ctx <= 0: the model's training context
    const Model &model() const { return model_; }
    int64_t n_ctx() const { return n_ctx_; }
    int64_t n_past() const { return n_past_; }
    void set_n_past(int64_t n);  // keep the first n tokens (n <= n_past)

private:
    friend class Model;
    const Model &model_;
    int64_t n_ctx_ = 0, n_past_ = 0;
    std::vector<std::vector<float>> kcache_, vcache_;   // per layer [pos][n_head_kv*head_dim], grown on use
    std::vector<std::vector<uint16_t>> kcache16_, vcache16_;   // the same in f16 (Model::kv_f16), else empty
};

// A batch for Model::decode: sequence i appends n_tokens[i] tokens (taken in order from `tokens`)
// to ctxs[i]; the contexts are distinct.
struct Batch {
    int n_seq = 0;
    Context *const *ctxs = nullptr;
    const int64_t *n_tokens = nullptr;
    const int32_t *tokens = nullptr;
};

// Thrown when a sequence would run past its context: the caller can tell "full" from other errors.
struct ContextFull : std::runtime_error {
    using std::runtime_error::runtime_error;
};

class Model {
public:
    Model(const std::string &path, int n_threads);  // throws std::runtime_error

    // Run a batch; logits (may be null): [Σ n_tokens][n_vocab] when all_logits, else [n_seq][n_vocab],
    // the last token of each sequence. Everything is checked first: on error no context changes.
    // Calls serialise on an internal lock (the workspace and thread pool are shared).
    void decode(const Batch &b, float *logits, bool all_logits);
    // One context, `n` tokens (the single-sequence case of decode).
    void eval(Context &c, const int32_t *tokens, int64_t n, float *logits, bool all_logits);

    const HParams &hp() const { return hp_; }
    const char *kernel_name() const { return kernel_->name; }
    const GGUFFile &file() const { return *file_; }
    int n_threads() const { return pool_.size(); }
    bool precise_acts() const { return precise_acts_; }
    const char *arch_name() const { return arch_->name; }
    // The KV cache holds f16 (half the bytes attention reads per token) for files with binary-basis or
    // llama.cpp low-bit linears when the kernel set widens f16 in hardware (Kernel::dots_f16), unless
    // precise acts are asked for (BITBASIS_PRECISE_ACTS, any form); f32 for dense files (the float
    // reference) and otherwise.
    // BITBASIS_KV=f16|f32 overrides it.
    bool kv_f16() const { return kv_f16_; }

    // --- for the architecture files (cpp/src/models/) ---
    HParams &hparams() { return hp_; }
    const Kernel &kernel() const { return *kernel_; }
    std::vector<Layer> &layers() { return layers_; }
    // "<arch>.<key>" from the file's metadata; false (out untouched) when absent
    bool get_int(const std::string &key, int64_t &out) const;
    bool get_float(const std::string &key, double &out) const;
    std::vector<float> load_vector(const std::string &name, int64_t n, bool required);
    // The one place a linear weight is read: dense (F32/F16/Q8_0) or binary basis.
    void load_linear(Linear &w, const std::string &name, int64_t rows, int64_t cols);
    // The input x [n][cols] of the next matmuls on `slot` (0..2): linears that read the same input
    // (q, k, v; gate, up) share one slot, so its activations are quantized once for all of them.
    void set_input(int slot, const float *x, int64_t n, int64_t cols);
    // ffn_down's input x [n][n_ff] ← H·x when the file has an online rotation there (bitbasis.online_rotation.
    // ffn_down.*: W_down holds W·Hᵀ), else nothing: every architecture calls it before its down matmul.
    void rotate_ffn_down_input(float *x, int64_t n);
    // y[t][rows] = W x[t] (+ bias) for the slot's n tokens.
    void matmul(const Linear &w, int slot, float *y);
    // The same for several linears of one input (q, k, v; gate, up) in one hand-off to the threads:
    // their rows are split as one range, so the threads meet once instead of once per linear.
    struct MatOut {
        const Linear &w;
        float *y;
    };
    void matmul(std::initializer_list<MatOut> outs, int slot);
    // RoPE on s.q and s.k (inv freq of the layer's kind), store k, v in each token's cache, and run
    // causal attention (the layer's window) of s.q over the cache into s.att.
    void attention(Step &s, const Layer &L, int64_t il);

private:
    void load();
    void validate_bb_headers();
    void matmul(const Linear &w, ActsCache &ac, float *y);
    bool is_precise(const Linear &w) const;   // run on int8 activations + their residual's code
    ActsCache::Entry &acts_for(const BBTensor &t, ActsCache &ac, bool resid);
    void embed(const int32_t *tokens, int64_t n, float *x);
    // n tokens, token i of context ctx[i] at position pos[i]; logits of the n_out tokens out_idx.
    void forward(const int32_t *tokens, Context *const *ctx, const int64_t *pos, int64_t n, const int64_t *out_idx,
                 int64_t n_out, float *logits);

    std::unique_ptr<GGUFFile> file_;
    ThreadPool pool_;
    const Kernel *kernel_ = nullptr;
    HParams hp_;
    const ArchDef *arch_ = nullptr;
    std::vector<float> inv_freq_;      // [n_rot/2], rope_freqs factors applied
    std::vector<float> inv_freq_swa_;  // the sliding-window layers' (their own base)
    std::vector<float> output_norm_;
    Linear tok_embd_, output_;
    std::vector<Layer> layers_;
    // the workspace of a forward pass, shared by every context: decode holds mu_ while it runs
    std::mutex mu_;
    std::vector<std::vector<float>> scratch_;           // per thread
    std::vector<float> x_;                              // the residual stream
    Step step_;                                         // the other activations
    ActsCache ac_[3];
    // BITBASIS_PRECISE_ACTS=1: every binary-basis product runs twice, on the int8 activations and on
    // the int8 code of their rounding residual (x − d·q), and adds the two. The kernels are linear in
    // the activations, so this is exact up to the residual's own rounding (~1/127 of the first):
    // float-reference accuracy at twice the matmul cost, for perplexity measurements.
    // BITBASIS_PRECISE_ACTS=name[,name...]: the same for the linears whose GGUF name contains one of
    // the names (e.g. "ffn_down"), on top of those the architecture marks (Linear::precise): to
    // measure which linears' int8 activations move the logits.
    bool precise_acts_ = false;
    bool kv_f16_ = false;
    std::vector<std::string> precise_names_;
    std::vector<float> resid_y_;
    std::vector<QActs> q8_acts_;   // int8 activations of the Q8_0 (head) matmul, per token
    int down_rot_block_ = 0;              // the online rotation before ffn_down: its Hadamard block (0: none)
    std::vector<float> down_rot_signs_;   // and its signs [n_ff]
};

}  // namespace bb
