// libFuzzer target: the C++ GGUF reader, the binary-basis tensor validator and the model loader,
// through the public C API (bb_model_open). The reader takes a path, so each input is written to
// a memfd and opened as /proc/self/fd/N: no change to the engine, no file system traffic.
// A file that loads is also run for two tokens, so hyperparameters the validator let through are
// exercised by the forward pass (the seeds are tiny models: this stays cheap).
// Any error must come back as NULL / -1 with a message; ASan/UBSan/libFuzzer catch the rest.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bitbasis.h"

static int g_fd = -1;
static char g_path[64];

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (g_fd < 0) {
        g_fd = memfd_create("fuzz.gguf", 0);
        if (g_fd < 0) abort();
        snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_fd);
    }
    if (ftruncate(g_fd, 0) != 0 || pwrite(g_fd, data, size, 0) != (ssize_t)size) abort();
    bb_model *m = bb_model_open(g_path, 1, 8);
    if (!m) {
        if (!bb_last_error()[0]) abort();  // a refusal must say why
        return 0;
    }
    bb_meta_string(m, "general.architecture");
    long long v;
    bb_meta_int(m, "tokenizer.ggml.eos_token_id", &v);
    const int n_vocab = bb_n_vocab(m);
    // Bound the work a hostile-but-valid file can ask for (logits buffer, embedding width).
    if (n_vocab > 0 && n_vocab <= (1 << 16) && bb_n_embd(m) <= 4096) {
        std::vector<float> logits(2 * (size_t)n_vocab);
        int toks[2] = {0, n_vocab - 1};
        if (bb_eval(m, toks, 2, logits.data(), 1) != 0 && !bb_last_error()[0]) abort();
        if (bb_set_n_past(m, 1) != 0) abort();
        if (bb_eval(m, toks, 1, logits.data(), 0) != 0 && !bb_last_error()[0]) abort();
    }
    bb_model_close(m);
    return 0;
}
