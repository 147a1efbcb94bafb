// Decode speed of the engine alone, from the C API (no Python, no tokenizer): for machines where the
// Python benchmark (bitbasis bench e2e) cannot run, e.g. the lent machine, pinned to a few cores.
//   decode_speed MODEL THREADS [PROMPT_TOKENS=128] [DECODE_TOKENS=64] [REPS=3] [LOGITS=0]
// Prints prompt and decode tok/s per repetition (a fresh context each time) and the kernel. LOGITS=1
// computes the last token's logits on every call, as generation does (the output head's share of the
// time); 0 skips the head.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bitbasis.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: decode_speed MODEL THREADS [PROMPT_TOKENS] [DECODE_TOKENS] [REPS]\n");
        return 2;
    }
    const int threads = std::atoi(argv[2]), np = argc > 3 ? std::atoi(argv[3]) : 128,
              nd = argc > 4 ? std::atoi(argv[4]) : 64, reps = argc > 5 ? std::atoi(argv[5]) : 3,
              want_logits = argc > 6 ? std::atoi(argv[6]) : 0;
    bb_model *m = bb_model_open(argv[1], threads, np + nd + 1);
    if (!m) {
        std::fprintf(stderr, "decode_speed: %s\n", bb_last_error());
        return 1;
    }
    std::vector<float> logits(want_logits ? bb_n_vocab(m) : 0);
    float *lg = want_logits ? logits.data() : nullptr;
    std::vector<int> prompt(np);
    for (int i = 0; i < np; i++) prompt[i] = 1000 + (i * 37) % 20000;
    using clk = std::chrono::steady_clock;
    for (int r = 0; r < reps; r++) {
        bb_reset(m);
        const auto t0 = clk::now();
        if (bb_eval(m, prompt.data(), np, lg, 0) != 0) return std::fprintf(stderr, "%s\n", bb_last_error()), 1;
        const auto t1 = clk::now();
        for (int i = 0; i < nd; i++) {
            const int tok = 2000 + (i * 53) % 20000;
            if (bb_eval(m, &tok, 1, lg, 0) != 0) return std::fprintf(stderr, "%s\n", bb_last_error()), 1;
        }
        const auto t2 = clk::now();
        const double tp = std::chrono::duration<double>(t1 - t0).count(), td = std::chrono::duration<double>(t2 - t1).count();
        std::printf("threads %d  prompt %.1f tok/s  decode %.1f tok/s  kernel %s\n", threads, np / tp, nd / td, bb_kernel_name(m));
    }
    bb_model_close(m);
    return 0;
}
