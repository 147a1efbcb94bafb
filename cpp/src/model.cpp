#include "model.h"
#include "bb_load.h"
#include "llamacpp_types.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace bb {

// cpp/src/models/*.cpp
void llama_load(Model &), llama_block(Model &, Layer &, int64_t, Step &);
void qwen2_load(Model &);
void qwen3_load(Model &), qwen3_block(Model &, Layer &, int64_t, Step &);
void gemma3_load(Model &), gemma3_block(Model &, Layer &, int64_t, Step &);
void phi3_load(Model &), phi3_block(Model &, Layer &, int64_t, Step &);

namespace {

[[noreturn]] void fail(const std::string &msg) { throw std::runtime_error(msg); }

// The architectures, one file each in cpp/src/models/ (bitbasis.arch is the Python side's table).
// Mistral files are "llama" files, as llama.cpp writes them.
const ArchDef ARCHS[] = {
    {"llama", llama_load, llama_block},
    {"qwen2", qwen2_load, llama_block},   // Llama's block; biases on q, k, v
    {"qwen3", qwen3_load, qwen3_block},
    {"gemma3", gemma3_load, gemma3_block},
    {"phi3", phi3_load, phi3_block},
};

static_assert((uint32_t)DT_F32 == TT_F32 && (uint32_t)DT_F16 == TT_F16 && (uint32_t)DT_Q8_0 == TT_Q8_0, "kernels.h's dense types are ggml's");

const char *const BB_SUFFIXES[] = {"bbp", "bbs", "bbo", "bbc", "bbe", "bbm", "bbv", "bbz", "bbk"};
constexpr int64_t BATCH = 512;  // tokens per forward chunk: bounds the activation buffers

}  // namespace

static void dequant_row(const Linear &w, int64_t r, float *out) {
    const int64_t n = w.cols;
    if (w.bb && !w.data) {   // a binary-basis embedding (w.data is set only for dense and llama.cpp types)
        bb_dequant_row(*w.bb, r, out);
    } else if (w.type == TT_F32) {
        std::memcpy(out, w.data + r * n * 4, n * 4);
    } else if (w.type == TT_F16) {
        const uint16_t *p = (const uint16_t *)(w.data + r * n * 2);
        for (int64_t j = 0; j < n; j++) out[j] = f16_to_f32(p[j]);
    } else if (int64_t blck, bytes; lowbit_layout(w.type, blck, bytes)) {   // a llama.cpp low-bit embedding
        lowbit_dequant_row(w.type, w.data, r, n, out);
    } else {  // Q8_0
        const uint8_t *row = w.data + r * (n / 32) * 34;
        for (int64_t b = 0; b < n / 32; b++) {
            uint16_t dh;
            std::memcpy(&dh, row + b * 34, 2);
            const float d = f16_to_f32(dh);
            const int8_t *q = (const int8_t *)(row + b * 34 + 2);
            for (int j = 0; j < 32; j++) out[b * 32 + j] = d * (float)q[j];
        }
    }
}

// --- loading ------------------------------------------------------------------------------------

Model::Model(const std::string &path, int n_threads) : pool_(std::max(1, std::min(n_threads, 256))) {
    try {
        file_.reset(new GGUFFile(path));
        load();
    } catch (const std::runtime_error &e) {
        fail(path + ": " + e.what());
    }
    scratch_.resize(pool_.size());
}

Context::Context(const Model &model, int64_t n_ctx) : model_(model) {
    n_ctx_ = n_ctx > 0 ? n_ctx : model.hp().n_ctx_train;
    if (n_ctx_ > (1 << 24)) fail("context " + std::to_string(n_ctx_) + " too large");
    if (model.kv_f16()) kcache16_.resize(model.hp().n_layer), vcache16_.resize(model.hp().n_layer);
    else kcache_.resize(model.hp().n_layer), vcache_.resize(model.hp().n_layer);
}

void Context::set_n_past(int64_t n) {
    if (n < 0 || n > n_past_)
        fail("cannot set the cache position to " + std::to_string(n) + " (it holds " + std::to_string(n_past_) +
             " tokens)");
    n_past_ = n;
}

std::vector<float> Model::load_vector(const std::string &name, int64_t n, bool required) {
    const GTensor *t = file_->tensor(name);
    if (!t) {
        if (required) fail("tensor " + name + " is missing");
        return {};
    }
    if (t->n_dims != 1 || t->ne[0] != n)
        fail("tensor " + name + " has shape [" + std::to_string(t->ne[0]) + (t->n_dims > 1 ? ", ..." : "") +
             "], expected [" + std::to_string(n) + "]");
    std::vector<float> v(n);
    if (t->type == TT_F32) {
        std::memcpy(v.data(), t->data, n * 4);
    } else if (t->type == TT_F16) {
        for (int64_t i = 0; i < n; i++) v[i] = f16_to_f32(((const uint16_t *)t->data)[i]);
    } else {
        fail("tensor " + name + " has type " + ttype_name(t->type) + ", expected F32 or F16");
    }
    return v;
}

void Model::validate_bb_headers() {
    const std::string pre = "bitbasis.tensor.";
    int64_t version;
    if (file_->get_int("bitbasis.version", version) && (version < 1 || version > 1))
        fail("bitbasis format version " + std::to_string(version) + " is not supported by this reader (1)");
    for (const GTensor &t : file_->tensors()) {
        size_t dot = t.name.rfind('.');
        if (dot == std::string::npos) continue;
        std::string suf = t.name.substr(dot + 1);
        if (std::find(std::begin(BB_SUFFIXES), std::end(BB_SUFFIXES), suf) != std::end(BB_SUFFIXES) &&
            !file_->find(pre + t.name.substr(0, dot)))
            fail("component tensor " + t.name + " has no bitbasis.tensor header");
    }
    for (const auto &kv : file_->kv()) {
        if (kv.first.compare(0, pre.size(), pre) != 0) continue;
        std::string name = kv.first.substr(pre.size());
        std::vector<int64_t> hdr;
        file_->get_int_array(kv.first, hdr);
        if (file_->tensor(name)) fail("tensor " + name + " is stored both dense and as binary basis");
        build_bb(*file_, name, hdr);
    }
}

void Model::load_linear(Linear &w, const std::string &name, int64_t rows, int64_t cols) {
    w.name = name;
    w.rows = rows;
    w.cols = cols;
    std::vector<int64_t> hdr;
    if (file_->get_int_array("bitbasis.tensor." + name, hdr)) {
        w.bb = build_bb(*file_, name, hdr);
        if (w.bb->rows != rows || w.bb->cols != cols)
            fail("tensor " + name + " has shape [" + std::to_string(w.bb->rows) + ", " + std::to_string(w.bb->cols) +
                 "], expected [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
        bb_prepare(*w.bb, kernel_->name);
        return;
    }
    const GTensor *t = file_->tensor(name);
    if (!t) fail("tensor " + name + " is missing");
    if (t->n_dims != 2 || t->ne[0] != cols || t->ne[1] != rows)
        fail("tensor " + name + " has shape [" + std::to_string(t->n_dims == 2 ? t->ne[1] : -1) + ", " +
             std::to_string(t->ne[0]) + "], expected [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
    w.type = t->type;
    w.data = t->data;
    if (int64_t blck, bytes; lowbit_layout(t->type, blck, bytes)) {   // llama.cpp's Q1_0/Q2_0/TQ*: our kernels
        w.bb = bb_from_lowbit(*t);
        bb_prepare(*w.bb, kernel_->name);
        return;
    }
    if (t->type != TT_F32 && t->type != TT_F16 && t->type != TT_Q8_0)
        fail("tensor " + name + " has type " + ttype_name(t->type) + ", expected F32, F16 or Q8_0");
}

bool Model::get_int(const std::string &key, int64_t &out) const {
    return file_->get_int(std::string(arch_->name) + "." + key, out);
}

bool Model::get_float(const std::string &key, double &out) const {
    return file_->get_float(std::string(arch_->name) + "." + key, out);
}

// The hyper-parameters and tensors every architecture has; then the architecture's own (ARCHS).
void Model::load() {
    const GGUFFile &f = *file_;
    std::string arch;
    if (!f.get_string("general.architecture", arch)) fail("missing metadata key general.architecture");
    for (const ArchDef &a : ARCHS)
        if (arch == a.name) arch_ = &a;
    if (!arch_) {
        std::string names;
        for (const ArchDef &a : ARCHS) names += std::string(names.empty() ? "" : ", ") + a.name;
        fail("architecture '" + arch + "' is not supported (supported: " + names + ")");
    }
    auto req_int = [&](const std::string &key, int64_t lo, int64_t hi, int64_t def, bool required) {
        int64_t v = def;
        if (!get_int(key, v) && required) fail("missing metadata key " + arch + "." + key);
        if (v < lo || v > hi)
            fail(arch + "." + key + " = " + std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
                 std::to_string(hi) + "]");
        return v;
    };
    HParams &h = hp_;
    h.n_embd = req_int("embedding_length", 1, 1 << 17, 0, true);
    h.n_ff = req_int("feed_forward_length", 1, 1 << 20, 0, true);
    h.n_layer = req_int("block_count", 1, 4096, 0, true);
    h.n_head = req_int("attention.head_count", 1, 4096, 0, true);
    h.n_head_kv = req_int("attention.head_count_kv", 1, h.n_head, h.n_head, false);
    if (h.n_head % h.n_head_kv) fail("head count " + std::to_string(h.n_head) + " is not a multiple of the kv head count");
    h.head_dim = req_int("attention.key_length", 2, 4096, h.n_embd / h.n_head, false);
    req_int("attention.value_length", h.head_dim, h.head_dim, h.head_dim, false);
    if (h.head_dim % 2) fail("head dimension " + std::to_string(h.head_dim) + " must be even");
    h.n_rot = req_int("rope.dimension_count", 2, h.head_dim, h.head_dim, false);
    if (h.n_rot % 2) fail("rope dimension count must be even");
    h.n_ctx_train = req_int("context_length", 1, 1 << 24, 2048, false);
    h.n_swa = req_int("attention.sliding_window", 0, 1 << 24, 0, false);
    double eps, base = 10000.0, v;
    if (!get_float("attention.layer_norm_rms_epsilon", eps))
        fail("missing metadata key " + arch + ".attention.layer_norm_rms_epsilon");
    if (!(eps >= 0 && eps < 1)) fail(arch + ".attention.layer_norm_rms_epsilon is out of range");
    get_float("rope.freq_base", base);
    if (!(base > 0 && std::isfinite(base))) fail(arch + ".rope.freq_base must be positive");
    h.eps = (float)eps;
    h.rope_base = h.rope_base_swa = (float)base;   // an architecture may give its swa layers their own
    h.attn_scale = 1.0f / std::sqrt((float)h.head_dim);
    if (get_float("attention.scale", v)) {
        if (!(v > 0 && std::isfinite(v))) fail(arch + ".attention.scale must be positive");
        h.attn_scale = (float)v;
    }
    for (auto kv : {std::make_pair("attn_logit_softcapping", &h.attn_softcap),
                    std::make_pair("final_logit_softcapping", &h.final_softcap)})
        if (get_float(kv.first, v)) {
            if (!(v > 0 && std::isfinite(v))) fail(arch + "." + kv.first + " must be positive");
            *kv.second = (float)v;
        }

    // the online rotation before ffn_down (bitbasis.rotate): the file's W_down holds W·Hᵀ, so down's input gets H
    const std::string online = "bitbasis.online_rotation.", rot = online + "ffn_down.";
    for (const auto &kv : f.kv())
        if (kv.first.compare(0, online.size(), online) == 0 && kv.first != rot + "block" && kv.first != rot + "seed")
            fail("unknown metadata key " + kv.first + " (an online rotation is " + rot + "block and " + rot + "seed)");
    int64_t rblock = 0, rseed = 0;
    const bool has_block = f.get_int(rot + "block", rblock), has_seed = f.get_int(rot + "seed", rseed);
    if (has_block != has_seed) fail("online rotation: " + rot + (has_block ? "seed" : "block") + " is missing");
    if (has_block) {
        if (rblock < 1 || rblock > 512 || (rblock & (rblock - 1)) || h.n_ff % rblock)
            fail(rot + "block = " + std::to_string(rblock) + " is not a power of two <= 512 dividing the FFN width " +
                 std::to_string(h.n_ff));
        if (rseed < 0 || rseed > 0xffffffffLL) fail(rot + "seed = " + std::to_string(rseed) + " is out of range [0, 2^32)");
        down_rot_block_ = (int)rblock;
        down_rot_signs_ = ops::online_signs(h.n_ff, (uint64_t)rseed);
    }

    kernel_ = &select_kernel();
    if (const char *e = std::getenv("BITBASIS_PRECISE_ACTS")) {
        const std::string v = e;
        precise_acts_ = v == "1";
        for (size_t a = 0; !precise_acts_ && v != "0" && a < v.size();) {   // a list of name parts
            const size_t b = std::min(v.find(',', a), v.size());
            if (b > a) precise_names_.push_back(v.substr(a, b - a));
            a = b + 1;
        }
    }
    validate_bb_headers();

    // the token embedding: dense, a llama.cpp type, or binary basis (then also the tied head's weights)
    std::vector<int64_t> te_hdr;
    int64_t te_cols = -1;
    if (const GTensor *te = f.tensor("token_embd.weight")) {
        if (te->n_dims == 2) te_cols = te->ne[0], h.n_vocab = te->ne[1];
    } else if (f.get_int_array("bitbasis.tensor.token_embd.weight", te_hdr)) {
        te_cols = te_hdr[1], h.n_vocab = te_hdr[0];   // build_bb has checked the header
    } else {
        fail("tensor token_embd.weight is missing");
    }
    if (te_cols != h.n_embd) fail("tensor token_embd.weight must be [n_vocab, " + std::to_string(h.n_embd) + "]");
    if (h.n_vocab > (1 << 24)) fail("vocabulary of " + std::to_string(h.n_vocab) + " tokens is too large");
    load_linear(tok_embd_, "token_embd.weight", h.n_vocab, h.n_embd);
    if (f.tensor("output.weight") || f.find("bitbasis.tensor.output.weight"))
        load_linear(output_, "output.weight", h.n_vocab, h.n_embd);
    if (output_.rows && tok_embd_.bb) {   // untied: the embedding is only looked up, so no kernel copy
        tok_embd_.bb->repacked = {};
        tok_embd_.bb->repacked_for.clear();
    }
    output_norm_ = load_vector("output_norm.weight", h.n_embd, true);
    layers_.resize(h.n_layer);
    arch_->load(*this);
    for (const Layer &L : layers_)
        for (const Linear *w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.wgate, &L.wup, &L.wdown, &L.wqkv}) kv_f16_ |= w->bb != nullptr;
    kv_f16_ = kv_f16_ && kernel_->dots_f16 && !precise_acts_ && precise_names_.empty();   // precise: the float reference
    if (const char *e = std::getenv("BITBASIS_KV")) {
        const std::string v = e;
        if (v != "f16" && v != "f32") fail("BITBASIS_KV must be f16 or f32, not '" + v + "'");
        if (v == "f16" && !kernel_->dots_f16) fail(std::string("BITBASIS_KV=f16: kernel ") + kernel_->name + " has no f16 attention");
        kv_f16_ = v == "f16";
    }

    // RoPE inverse frequencies as transformers computes them: llama-3 factors, linear scaling
    std::vector<float> factors = load_vector("rope_freqs.weight", h.n_rot / 2, false);
    for (float x : factors)
        if (!(x > 0) || !std::isfinite(x)) fail("rope_freqs.weight holds a non-positive factor");
    double linear = 1.0;
    std::string stype;
    if (f.get_string(arch + ".rope.scaling.type", stype) && stype != "none") {
        if (stype != "linear") fail(arch + ".rope.scaling.type '" + stype + "' is not supported (linear)");
        if (!get_float("rope.scaling.factor", linear) || !(linear > 0 && std::isfinite(linear)))
            fail(arch + ".rope.scaling.factor must be positive");
    }
    inv_freq_ = ops::rope_inv_freq(h.rope_base, h.n_rot, factors, linear);
    inv_freq_swa_ = ops::rope_inv_freq(h.rope_base_swa, h.n_rot, {}, 1.0);
}

// --- forward ------------------------------------------------------------------------------------

ActsCache::Entry &Model::acts_for(const BBTensor &t, ActsCache &ac, bool resid) {
    const float *cs = t.colscale.empty() ? nullptr : t.colscale.data();
    ActsCache::Entry *found = nullptr;
    for (size_t i = 0; i < ac.used && !found; i++)
        if (ac.entries[i].group == t.group && ac.entries[i].colscale == cs) found = &ac.entries[i];
    if (!found) {
        if (ac.used == ac.entries.size()) ac.entries.push_back({});
        ActsCache::Entry &e = ac.entries[ac.used++];
        e.group = t.group;
        e.colscale = cs;
        e.has_resid = false;
        if ((int)e.acts.size() < ac.n_tok) e.acts.resize(ac.n_tok);
        pool_.parallel_for(ac.n_tok, 1, [&](int64_t a, int64_t b, int) {
            for (int64_t i = a; i < b; i++) {
                quantize_acts(ac.x + i * ac.cols, ac.cols, t.group, cs, e.acts[i]);
                if (kernel_->prepare_acts) kernel_->prepare_acts(e.acts[i]);
            }
        });
        found = &e;
    }
    ActsCache::Entry &e = *found;
    if (!resid || e.has_resid) return e;
    e.has_resid = true;
    if ((int)e.resid.size() < ac.n_tok) e.resid.resize(ac.n_tok);
    pool_.parallel_for(ac.n_tok, 1, [&](int64_t a, int64_t b, int) {
        thread_local std::vector<float> r;
        for (int64_t i = a; i < b; i++) {
            const float *x = ac.x + i * ac.cols;
            const QActs &q = e.acts[i];
            r.resize(ac.cols);
            for (int64_t j = 0; j < ac.cols; j++)   // in the column-scaled domain the kernels see
                r[j] = (cs ? x[j] * cs[j] : x[j]) - q.d[j / QK] * (float)q.q[j];
            quantize_acts(r.data(), ac.cols, t.group, nullptr, e.resid[i]);
            if (kernel_->prepare_acts) kernel_->prepare_acts(e.resid[i]);
            // raw x = 0: the sparse correction then only removes the residual's dense share (the
            // sparse values already met the exact x in the first pass)
            std::fill(e.resid[i].x.begin(), e.resid[i].x.end(), 0.0f);
        }
    });
    return e;
}

bool Model::is_precise(const Linear &w) const {
    if (precise_acts_ || w.precise) return true;
    for (const std::string &s : precise_names_)
        if (w.name.find(s) != std::string::npos) return true;
    return false;
}

void Model::matmul(const Linear &w, ActsCache &ac, float *y) {
    const int n = ac.n_tok;
    const int64_t rows = w.rows, cols = w.cols;
    const bool precise = is_precise(w);
    if (w.bb) {
        const BBTensor &t = *w.bb;
        const ActsCache::Entry &e = acts_for(t, ac, precise);
        const Kernel &k = *kernel_;
        auto run = [&](const std::vector<QActs> &a, float *out) {   // whole 32-row lookup tiles per piece
            if (n == 1)
                pool_.parallel_for(rows, LUT_ROWS, [&](int64_t r0, int64_t r1, int) { k.gemv(t, a[0], out + r0, r0, r1); });
            else
                pool_.parallel_for(rows, LUT_ROWS, [&](int64_t r0, int64_t r1, int) {
                    k.gemm(t, a.data(), n, out + r0, rows, r0, r1);
                });
        };
        run(e.acts, y);
        if (precise) {
            resid_y_.resize((size_t)rows * n);
            run(e.resid, resid_y_.data());
            for (int64_t i = 0; i < rows * n; i++) y[i] += resid_y_[i];
        }
        return;
    }
    const float *x = ac.x;
    if (w.type == TT_Q8_0 && precise) {   // float activations (dot_q8): the accuracy precise asks for
        pool_.parallel_for(rows, 8, [&](int64_t r0, int64_t r1, int) {
            for (int64_t r = r0; r < r1; r++)
                for (int t = 0; t < n; t++)
                    y[(int64_t)t * rows + r] = kernel_->dot_q8(w.data + r * (cols / 32) * 34, x + (int64_t)t * cols, cols);
        });
        return;
    }
    if (w.type == TT_Q8_0) {
        // Q8_0 weights (the token embedding / tied head, Q8_0 files) multiply int8 activations with one scale
        // per 32 columns, as llama.cpp's Q8_0 × Q8_0 dot: exact int32 block sums instead of a float multiply
        // per weight. Quantized once per token here, before the rows are split.
        q8_acts_.resize(n);
        pool_.parallel_for(n, 1, [&](int64_t a, int64_t b, int) {
            for (int64_t t = a; t < b; t++) quantize_acts(x + t * cols, cols, 64, nullptr, q8_acts_[t]);
        });
    }
    // F32 / F16 / Q8_0: the kernel's tiled dense GEMM over each thread's rows (kernels.h GemmDenseFn)
    const DenseRows dw{w.type, w.data, cols};
    pool_.parallel_for(rows, 4, [&](int64_t r0, int64_t r1, int) {
        run_gemm_dense(*kernel_, dw, x, q8_acts_.data(), n, y + r0, rows, r0, r1);
    });
}

void Model::embed(const int32_t *tokens, int64_t n, float *x) {
    for (int64_t i = 0; i < n; i++) dequant_row(tok_embd_, tokens[i], x + i * hp_.n_embd);
}

void Model::set_input(int slot, const float *x, int64_t n, int64_t cols) { ac_[slot].reset(x, (int)n, cols); }

void Model::rotate_ffn_down_input(float *x, int64_t n) {
    if (!down_rot_block_) return;
    const int64_t F = hp_.n_ff;
    pool_.parallel_for(n, 1, [&](int64_t a, int64_t b, int) {
        ops::hadamard(x + a * F, down_rot_signs_.data(), b - a, F, down_rot_block_, *kernel_);
    });
}

void Model::matmul(const Linear &w, int slot, float *y) {
    ActsCache &ac = ac_[slot];
    if (ac.cols != w.cols)
        fail("matmul: " + w.name + " reads " + std::to_string(w.cols) + " columns, its input has " + std::to_string(ac.cols));
    matmul(w, ac, y);
    if (!w.bias.empty())
        for (int64_t t = 0; t < ac.n_tok; t++) ops::add(y + t * w.rows, w.bias.data(), w.rows);
}

void Model::matmul(std::initializer_list<MatOut> outs, int slot) {
    ActsCache &ac = ac_[slot];
    bool fuse = outs.size() <= 8;   // (precise linears run each twice: the plain path)
    for (const MatOut &o : outs) {
        if (ac.cols != o.w.cols)
            fail("matmul: " + o.w.name + " reads " + std::to_string(o.w.cols) + " columns, its input has " +
                 std::to_string(ac.cols));
        fuse &= o.w.bb != nullptr && !is_precise(o.w);
    }
    if (!fuse) {
        for (const MatOut &o : outs) matmul(o.w, slot, o.y);
        return;
    }
    for (const MatOut &o : outs) acts_for(*o.w.bb, ac, false);   // quantized once per (group, colscale), here
    struct Part {
        const BBTensor *t;
        const QActs *a;
        float *y;
        int64_t start;
    } parts[8];
    int np = 0;
    int64_t total = 0;
    for (const MatOut &o : outs) {   // (acts_for finds them now: no entry is added, none moves)
        parts[np++] = {o.w.bb.get(), acts_for(*o.w.bb, ac, false).acts.data(), o.y, total};
        total += o.w.rows;
    }
    const int n = ac.n_tok;
    const Kernel &k = *kernel_;
    // ranges in whole 32-row tiles (LUT_ROWS) when every linear's rows are a multiple of 32
    pool_.parallel_for(total, LUT_ROWS, [&](int64_t a, int64_t b, int) {
        for (int i = 0; i < np; i++) {
            const Part &p = parts[i];
            const int64_t r0 = std::max(a, p.start) - p.start, r1 = std::min(b, p.start + p.t->rows) - p.start;
            if (r0 >= r1) continue;
            if (n == 1)
                k.gemv(*p.t, p.a[0], p.y + r0, r0, r1);
            else
                k.gemm(*p.t, p.a, n, p.y + r0, p.t->rows, r0, r1);
        }
    });
    for (const MatOut &o : outs)
        if (!o.w.bias.empty())
            for (int64_t t = 0; t < n; t++) ops::add(o.y + t * o.w.rows, o.w.bias.data(), o.w.rows);
}

void Model::attention(Step &s, const Layer &L, int64_t il) {
    const HParams &h = hp_;
    const int64_t hd = h.head_dim, qd = h.n_head * hd, kvd = h.n_head_kv * hd, group = h.n_head / h.n_head_kv;
    const std::vector<float> &inv_freq = L.swa ? inv_freq_swa_ : inv_freq_;
    for (int64_t t = 0; t < s.n; t++) {   // each token at its own position, into its own cache
        ops::rope(s.q.data() + t * qd, h.n_head, hd, h.n_rot, s.pos[t], inv_freq, h.rope_kind);
        ops::rope(s.k.data() + t * kvd, h.n_head_kv, hd, h.n_rot, s.pos[t], inv_freq, h.rope_kind);
        if (kv_f16_) {
            kernel_->to_f16(s.k.data() + t * kvd, s.ctx[t]->kcache16_[il].data() + s.pos[t] * kvd, kvd);
            kernel_->to_f16(s.v.data() + t * kvd, s.ctx[t]->vcache16_[il].data() + s.pos[t] * kvd, kvd);
        } else {
            std::memcpy(s.ctx[t]->kcache_[il].data() + s.pos[t] * kvd, s.k.data() + t * kvd, kvd * 4);
            std::memcpy(s.ctx[t]->vcache_[il].data() + s.pos[t] * kvd, s.v.data() + t * kvd, kvd * 4);
        }
    }
    ops::AttnParams ap;
    ap.head_dim = hd;
    ap.kv_stride = kvd;
    ap.scale = h.attn_scale;
    ap.softcap = h.attn_softcap;
    ap.window = L.swa ? h.n_swa : 0;
    // Causal attention: a token at position p sees positions [0, p] (its window) of its own context.
    pool_.parallel_for(s.n * h.n_head, 1, [&](int64_t a, int64_t b, int tid) {
        for (int64_t idx = a; idx < b; idx++) {
            const int64_t t = idx / h.n_head, hh = idx % h.n_head, kvh = hh / group;
            const Context &c = *s.ctx[t];
            if (kv_f16_)
                ops::attend_head(s.q.data() + t * qd + hh * hd, c.kcache16_[il].data() + kvh * hd,
                                 c.vcache16_[il].data() + kvh * hd, s.pos[t], ap, *kernel_, scratch_[tid].data(),
                                 s.att.data() + t * qd + hh * hd);
            else
                ops::attend_head(s.q.data() + t * qd + hh * hd, c.kcache_[il].data() + kvh * hd,
                                 c.vcache_[il].data() + kvh * hd, s.pos[t], ap, *kernel_, scratch_[tid].data(),
                                 s.att.data() + t * qd + hh * hd);
        }
    });
}

void Model::forward(const int32_t *tokens, Context *const *ctx, const int64_t *pos, int64_t n,
                    const int64_t *out_idx, int64_t n_out, float *logits) {
    const HParams &h = hp_;
    const int64_t E = h.n_embd, qd = h.n_head * h.head_dim, kvd = h.n_head_kv * h.head_dim, F = h.n_ff;
    // the buffers live as long as the model: a fresh allocation per call page-faults (the kernel zeroes
    // every new page; ~8% of a 128-token prompt, perf) and resize keeps what is already there
    std::vector<float> &x = x_;
    x.resize(n * E);
    Step &s = step_;
    s.n = n, s.pos = pos, s.ctx = ctx, s.x = x.data();
    s.hb.resize(n * E), s.o.resize(n * E), s.q.resize(n * qd), s.k.resize(n * kvd), s.v.resize(n * kvd);
    s.att.resize(n * qd), s.g.resize(n * F), s.u.resize(n * F);
    if (layers_[0].wqkv.rows || layers_[0].wup.rows > F) s.fused.resize(n * std::max(qd + 2 * kvd, 2 * F));
    embed(tokens, n, x.data());
    if (h.embd_scale != 1.f)
        for (float &e : x) e *= h.embd_scale;
    int64_t max_len = 0;
    for (int64_t t = 0; t < n; t++) max_len = std::max(max_len, pos[t] + 1);
    for (auto &sc : scratch_) sc.resize(max_len);

    for (int64_t l = 0; l < h.n_layer; l++) arch_->block(*this, layers_[l], l, s);

    if (!logits || n_out == 0) return;
    const Linear &head = output_.rows ? output_ : tok_embd_;
    for (int64_t i = 0; i < n_out; i++)   // the rows that want logits, packed
        ops::rms_norm(x.data() + out_idx[i] * E, output_norm_.data(), s.hb.data() + i * E, 1, E, h.eps);
    set_input(0, s.hb.data(), n_out, E);
    matmul(head, 0, logits);
    if (h.final_softcap > 0) ops::softcap(logits, n_out * h.n_vocab, h.final_softcap);
}

void Model::decode(const Batch &b, float *logits, bool all_logits) {
    if (b.n_seq <= 0) fail("decode: no sequences");
    if (!b.ctxs || !b.n_tokens || !b.tokens) fail("decode: missing batch arrays");
    int64_t total = 0;
    for (int i = 0; i < b.n_seq; i++) {
        Context *c = b.ctxs[i];
        if (!c) fail("decode: sequence " + std::to_string(i) + " has no context");
        if (&c->model() != this) fail("decode: sequence " + std::to_string(i) + "'s context belongs to another model");
        for (int j = 0; j < i; j++)
            if (b.ctxs[j] == c) fail("decode: sequences " + std::to_string(j) + " and " + std::to_string(i) + " share a context");
        const int64_t m = b.n_tokens[i];
        if (m <= 0) fail("decode: sequence " + std::to_string(i) + " has no tokens");
        if (m > c->n_ctx_ - c->n_past_)
            throw ContextFull("context full: " + std::to_string(c->n_past_) + " + " + std::to_string(m) +
                              " tokens exceed n_ctx " + std::to_string(c->n_ctx_) +
                              (b.n_seq > 1 ? " (sequence " + std::to_string(i) + ")" : ""));
        total += m;
    }
    for (int64_t i = 0; i < total; i++)
        if (b.tokens[i] < 0 || b.tokens[i] >= hp_.n_vocab)
            fail("token id " + std::to_string(b.tokens[i]) + " is outside the vocabulary [0, " +
                 std::to_string(hp_.n_vocab) + ")");

    std::lock_guard<std::mutex> lock(mu_);
    // where each token goes; the caches grow to hold them before anything runs
    std::vector<Context *> ctx(total);
    std::vector<int64_t> pos(total), last(b.n_seq);
    const int64_t kvd = hp_.n_head_kv * hp_.head_dim;
    for (int i = 0, t = 0; i < b.n_seq; i++) {
        Context *c = b.ctxs[i];
        for (int64_t j = 0; j < b.n_tokens[i]; j++, t++) ctx[t] = c, pos[t] = c->n_past_ + j;
        last[i] = t - 1;
        const size_t need = (size_t)(c->n_past_ + b.n_tokens[i]) * kvd;
        auto grow = [&](auto &kc, auto &vc) {
            for (int64_t l = 0; l < hp_.n_layer; l++)
                if (kc[l].size() < need) {   // grow by half at least, up to the whole context
                    const size_t cap = (size_t)c->n_ctx_ * kvd;
                    kc[l].resize(std::max(need, std::min(cap, kc[l].size() * 3 / 2)));
                    vc[l].resize(kc[l].size());
                }
        };
        if (kv_f16_) grow(c->kcache16_, c->vcache16_);
        else grow(c->kcache_, c->vcache_);
    }
    // chunks of at most BATCH tokens bound the activation buffers
    for (int64_t t0 = 0, s = 0; t0 < total; t0 += BATCH) {
        const int64_t m = std::min(BATCH, total - t0);
        std::vector<int64_t> out_idx;
        float *lg = nullptr;
        if (logits && all_logits) {
            for (int64_t t = 0; t < m; t++) out_idx.push_back(t);
            lg = logits + t0 * hp_.n_vocab;
        } else if (logits) {
            const int64_t s0 = s;
            for (; s < b.n_seq && last[s] < t0 + m; s++) out_idx.push_back(last[s] - t0);
            lg = logits + s0 * hp_.n_vocab;
        }
        forward(b.tokens + t0, ctx.data() + t0, pos.data() + t0, m, out_idx.data(), (int64_t)out_idx.size(), lg);
    }
    for (int i = 0; i < b.n_seq; i++) b.ctxs[i]->n_past_ += b.n_tokens[i];
}

void Model::eval(Context &c, const int32_t *tokens, int64_t n, float *logits, bool all_logits) {
    if (n <= 0) fail("eval: no tokens");
    Context *cp = &c;
    Batch b;
    b.n_seq = 1;
    b.ctxs = &cp;
    b.n_tokens = &n;
    b.tokens = tokens;
    decode(b, logits, all_logits);
}

}  // namespace bb
