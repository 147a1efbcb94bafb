// Threads under ThreadSanitizer (tools/sanitize.sh builds this with -fsanitize=thread, and once with
// ASan/UBSan): the pool splitting every matmul and the attention over 4 workers, prompt (gemm) and
// token-by-token (gemv) evaluation, cache rewinds, and two models running in two threads at once.
// Every run must give bit-identical logits to a 1-thread run (rows are split, never reduced across
// threads), so a race that changes a number fails here even when TSan misses it.
//   tsan_threads MODEL.gguf [rounds]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bitbasis.h"

static std::vector<float> run(bb_model *m, int rounds) {
    const int nv = bb_n_vocab(m);
    std::vector<int> prompt = {1, 5, 9, 2, 7, 3, 11, 4};
    for (int &t : prompt) t %= nv;
    std::vector<float> out, lg((size_t)nv * prompt.size());
    for (int r = 0; r < rounds; r++) {
        bb_reset(m);
        if (bb_eval(m, prompt.data(), (int)prompt.size(), lg.data(), 1) != 0) {
            fprintf(stderr, "eval: %s\n", bb_last_error());
            exit(1);
        }
        out.insert(out.end(), lg.begin(), lg.end());
        int tok = prompt.back();
        for (int i = 0; i < 6; i++) {  // greedy decoding, one token at a time
            if (bb_eval(m, &tok, 1, lg.data(), 0) != 0) {
                fprintf(stderr, "eval: %s\n", bb_last_error());
                exit(1);
            }
            out.insert(out.end(), lg.begin(), lg.begin() + nv);
            int best = 0;
            for (int j = 1; j < nv; j++) best = lg[j] > lg[best] ? j : best;
            tok = best;
        }
        bb_set_n_past(m, 3);  // rewind and re-run a suffix
        if (bb_eval(m, prompt.data() + 3, 5, lg.data(), 0) != 0) exit(1);
        out.insert(out.end(), lg.begin(), lg.begin() + nv);
    }
    return out;
}

static bb_model *open_or_die(const char *path, int threads) {
    bb_model *m = bb_model_open(path, threads, 64);
    if (!m) {
        fprintf(stderr, "%s: %s\n", path, bb_last_error());
        exit(1);
    }
    return m;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [rounds]\n", argv[0]);
        return 2;
    }
    const int rounds = argc > 2 ? atoi(argv[2]) : 3;
    bb_model *one = open_or_die(argv[1], 1);
    const std::vector<float> want = run(one, rounds);
    bb_model_close(one);

    bb_model *a = open_or_die(argv[1], 4), *b = open_or_die(argv[1], 3);
    std::vector<float> got_a, got_b;
    std::thread ta([&] { got_a = run(a, rounds); }), tb([&] { got_b = run(b, rounds); });
    ta.join();
    tb.join();
    const std::vector<float> got_c = run(a, 1);  // the pool again, after the threads are gone
    const std::string kernel = bb_kernel_name(a);
    bb_model_close(a);
    bb_model_close(b);
    // bitwise: NaN logits compare unequal with ==, and the splits must not change a single bit
    auto same = [&](const std::vector<float> &v) {
        return v.size() <= want.size() && std::memcmp(v.data(), want.data(), v.size() * sizeof(float)) == 0;
    };
    if (got_a.size() != want.size() || !same(got_a) || got_b.size() != want.size() || !same(got_b) || !same(got_c)) {
        fprintf(stderr, "FAIL: %s: multi-threaded logits differ from the 1-thread run\n", argv[1]);
        return 1;
    }
    printf("ok: %s (kernel %s): %zu logits bit-identical over 1, 3 and 4 threads, 2 models at once\n", argv[1],
           kernel.c_str(), want.size());
    return 0;
}
