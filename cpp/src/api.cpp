// The C API (cpp/include/bitbasis.h): every C++ exception stops here and becomes an error string.
#include "bitbasis.h"

#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "model.h"

struct bb_model {
    std::unique_ptr<bb::Model> model;
    std::unique_ptr<bb::Context> ctx;            // the default context of the single-sequence calls
    std::mutex strings_mu;
    std::map<std::string, std::string> strings;  // returned metadata strings live here
};

struct bb_context {
    std::unique_ptr<bb::Context> ctx;
};

static thread_local std::string g_error;

// -1 for an error, -2 for a context that is full (bb_last_error says which in both cases)
template <class F> static auto guarded(F &&f, decltype(f()) on_error, decltype(f()) on_full) -> decltype(f()) {
    try {
        g_error.clear();
        return f();
    } catch (const std::bad_alloc &) {
        g_error = "out of memory";
    } catch (const bb::ContextFull &e) {
        g_error = e.what();
        return on_full;
    } catch (const std::exception &e) {
        g_error = e.what();
    } catch (...) {
        g_error = "unknown error";
    }
    return on_error;
}
template <class F> static auto guarded(F &&f, decltype(f()) on_error) -> decltype(f()) {
    return guarded(f, on_error, on_error);
}

extern "C" const char *bb_version(void) { return "0.1.0"; }
extern "C" int bb_format_version(void) { return 1; }
extern "C" const char *bb_last_error(void) { return g_error.c_str(); }

extern "C" bb_model *bb_model_open(const char *path, int n_threads, int n_ctx) {
    return guarded(
        [&]() -> bb_model * {
            if (!path) throw std::runtime_error("no path");
            auto m = std::make_unique<bb_model>();
            m->model = std::make_unique<bb::Model>(path, n_threads);
            try {
                m->ctx = std::make_unique<bb::Context>(*m->model, n_ctx);
            } catch (const std::runtime_error &e) {
                throw std::runtime_error(std::string(path) + ": " + e.what());
            }
            return m.release();
        },
        nullptr);
}

extern "C" void bb_model_close(bb_model *m) { delete m; }

extern "C" int bb_n_vocab(const bb_model *m) { return (int)m->model->hp().n_vocab; }
extern "C" int bb_n_ctx(const bb_model *m) { return (int)m->ctx->n_ctx(); }
extern "C" int bb_n_ctx_train(const bb_model *m) { return (int)m->model->hp().n_ctx_train; }
extern "C" int bb_n_embd(const bb_model *m) { return (int)m->model->hp().n_embd; }
extern "C" int bb_n_layer(const bb_model *m) { return (int)m->model->hp().n_layer; }
extern "C" int bb_n_threads(const bb_model *m) { return m->model->n_threads(); }
extern "C" const char *bb_kernel_name(const bb_model *m) { return m->model->kernel_name(); }
extern "C" int bb_precise_acts(const bb_model *m) { return m->model->precise_acts() ? 1 : 0; }
extern "C" int bb_kv_f16(const bb_model *m) { return m->model->kv_f16() ? 1 : 0; }
extern "C" int bb_n_past(const bb_model *m) { return (int)m->ctx->n_past(); }

static_assert(sizeof(int) == sizeof(int32_t), "token ids are 32-bit");

extern "C" int bb_eval(bb_model *m, const int *tokens, int n, float *logits, int all_logits) {
    return guarded(
        [&]() {
            if (!tokens && n > 0) throw std::runtime_error("eval: no token array");
            m->model->eval(*m->ctx, (const int32_t *)tokens, n, logits, all_logits != 0);
            return 0;
        },
        -1, -2);
}

extern "C" int bb_set_n_past(bb_model *m, int n) {
    return guarded(
        [&]() {
            m->ctx->set_n_past(n);
            return 0;
        },
        -1);
}

extern "C" void bb_reset(bb_model *m) { m->ctx->set_n_past(0); }

// --- contexts -----------------------------------------------------------------------------------

extern "C" bb_context *bb_context_new(bb_model *m, int n_ctx) {
    return guarded(
        [&]() -> bb_context * {
            if (!m) throw std::runtime_error("no model");
            auto c = std::make_unique<bb_context>();
            c->ctx = std::make_unique<bb::Context>(*m->model, n_ctx);
            return c.release();
        },
        nullptr);
}

extern "C" void bb_context_free(bb_context *c) { delete c; }
extern "C" int bb_context_n_ctx(const bb_context *c) { return (int)c->ctx->n_ctx(); }
extern "C" int bb_context_n_past(const bb_context *c) { return (int)c->ctx->n_past(); }

extern "C" int bb_context_set_n_past(bb_context *c, int n) {
    return guarded(
        [&]() {
            c->ctx->set_n_past(n);
            return 0;
        },
        -1);
}

extern "C" int bb_context_eval(bb_model *m, bb_context *c, const int *tokens, int n, float *logits, int all_logits) {
    return guarded(
        [&]() {
            if (!m || !c) throw std::runtime_error("eval: no model or context");
            if (!tokens && n > 0) throw std::runtime_error("eval: no token array");
            if (&c->ctx->model() != m->model.get()) throw std::runtime_error("eval: the context belongs to another model");
            m->model->eval(*c->ctx, (const int32_t *)tokens, n, logits, all_logits != 0);
            return 0;
        },
        -1, -2);
}

extern "C" int bb_decode(bb_model *m, int n_seq, bb_context *const *ctxs, const int *n_tokens, const int *tokens,
                         float *logits) {
    return guarded(
        [&]() {
            if (!m || n_seq <= 0 || !ctxs || !n_tokens || !tokens) throw std::runtime_error("decode: empty batch");
            std::vector<bb::Context *> cs(n_seq);
            std::vector<int64_t> nt(n_seq);
            for (int i = 0; i < n_seq; i++) {
                if (!ctxs[i]) throw std::runtime_error("decode: sequence " + std::to_string(i) + " has no context");
                cs[i] = ctxs[i]->ctx.get();
                nt[i] = n_tokens[i];
            }
            bb::Batch b;
            b.n_seq = n_seq;
            b.ctxs = cs.data();
            b.n_tokens = nt.data();
            b.tokens = (const int32_t *)tokens;
            m->model->decode(b, logits, false);
            return 0;
        },
        -1, -2);
}

// --- metadata -----------------------------------------------------------------------------------

extern "C" const char *bb_meta_string(bb_model *m, const char *key) {
    return guarded(
        [&]() -> const char * {
            std::string v;
            if (!key || !m->model->file().get_string(key, v)) return nullptr;
            std::lock_guard<std::mutex> lock(m->strings_mu);
            auto &slot = m->strings[key];
            if (slot != v) slot = v;   // a pointer handed out before stays valid
            return slot.c_str();
        },
        nullptr);
}

extern "C" int bb_meta_int(const bb_model *m, const char *key, long long *out) {
    return guarded(
        [&]() {
            int64_t v;
            if (!key || !m->model->file().get_int(key, v)) return -1;
            *out = v;
            return 0;
        },
        -1);
}
