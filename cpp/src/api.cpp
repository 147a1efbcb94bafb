// The C API (cpp/include/bitbasis.h): every C++ exception stops here and becomes an error string.
#include "bitbasis.h"

#include <exception>
#include <map>
#include <memory>
#include <new>
#include <string>

#include "model.h"

struct bb_model {
    std::unique_ptr<bb::Model> model;
    std::map<std::string, std::string> strings;  // returned metadata strings live here
};

static thread_local std::string g_error;

template <class F> static auto guarded(F &&f, decltype(f()) on_error) -> decltype(f()) {
    try {
        g_error.clear();
        return f();
    } catch (const std::bad_alloc &) {
        g_error = "out of memory";
    } catch (const std::exception &e) {
        g_error = e.what();
    } catch (...) {
        g_error = "unknown error";
    }
    return on_error;
}

extern "C" const char *bb_version(void) { return "0.1.0"; }
extern "C" int bb_format_version(void) { return 1; }
extern "C" const char *bb_last_error(void) { return g_error.c_str(); }

extern "C" bb_model *bb_model_open(const char *path, int n_threads, int n_ctx) {
    return guarded(
        [&]() -> bb_model * {
            if (!path) throw std::runtime_error("no path");
            auto m = std::make_unique<bb_model>();
            m->model = std::make_unique<bb::Model>(path, n_threads, n_ctx);
            return m.release();
        },
        nullptr);
}

extern "C" void bb_model_close(bb_model *m) { delete m; }

extern "C" int bb_n_vocab(const bb_model *m) { return (int)m->model->hp().n_vocab; }
extern "C" int bb_n_ctx(const bb_model *m) { return (int)m->model->n_ctx(); }
extern "C" int bb_n_embd(const bb_model *m) { return (int)m->model->hp().n_embd; }
extern "C" int bb_n_layer(const bb_model *m) { return (int)m->model->hp().n_layer; }
extern "C" int bb_n_threads(const bb_model *m) { return m->model->n_threads(); }
extern "C" const char *bb_kernel_name(const bb_model *m) { return m->model->kernel_name(); }
extern "C" int bb_precise_acts(const bb_model *m) { return m->model->precise_acts() ? 1 : 0; }
extern "C" int bb_n_past(const bb_model *m) { return (int)m->model->n_past(); }

extern "C" int bb_eval(bb_model *m, const int *tokens, int n, float *logits, int all_logits) {
    static_assert(sizeof(int) == sizeof(int32_t), "token ids are 32-bit");
    return guarded(
        [&]() {
            if (!tokens && n > 0) throw std::runtime_error("eval: no token array");
            m->model->eval((const int32_t *)tokens, n, logits, all_logits != 0);
            return 0;
        },
        -1);
}

extern "C" int bb_set_n_past(bb_model *m, int n) {
    return guarded(
        [&]() {
            m->model->set_n_past(n);
            return 0;
        },
        -1);
}

extern "C" void bb_reset(bb_model *m) { m->model->set_n_past(0); }

extern "C" const char *bb_meta_string(bb_model *m, const char *key) {
    return guarded(
        [&]() -> const char * {
            std::string v;
            if (!key || !m->model->file().get_string(key, v)) return nullptr;
            auto &slot = m->strings[key];
            slot = v;
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
