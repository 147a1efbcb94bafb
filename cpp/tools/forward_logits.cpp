// The model forward pass from the C API (bitbasis.h), for checking the engine on another CPU:
// tools/emulate.sh builds it natively and, with every cpp/src file, statically for aarch64, runs it
// under qemu and compares the logits it writes with the native ones (tools/emulate.py).
//
//   forward_logits --info                          this CPU's features, the kernels compiled in
//                                                  ("name isa supported;..."), the default kernel
//   forward_logits MODEL THREADS OUT TOKEN...      logits of every token, float32 [n][n_vocab] to OUT
//
// The tokens go in as one batch of the first ceil(n/2) (GEMM) and then one at a time (GEMV, a
// growing KV cache), so both kernel entry points run. The kernel is the engine's choice:
// BITBASIS_ISA / BITBASIS_KERNEL in the environment as usual. Prints "kernel NAME threads T" on
// success; on error the engine's message on stderr and exit status 1.
// Not built by CMake (cpp/tests/*.cpp are test programs that run without arguments).
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bitbasis.h"
#include "bitbasis_kernels.h"

static int fail(const std::string &what) {
    std::fprintf(stderr, "forward_logits: %s\n", what.c_str());
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 2 && std::string(argv[1]) == "--info") {
        const char *k = bbk_default_kernel();
        std::printf("features: %s\nkernels: %s\ndefault: %s\n", bbk_cpu_features(), bbk_kernels(),
                    k ? k : bbk_error());
        return k ? 0 : 1;
    }
    if (argc < 5) return fail("usage: forward_logits --info | MODEL THREADS OUT TOKEN...");
    std::vector<int> tokens;
    for (int i = 4; i < argc; i++) tokens.push_back(std::atoi(argv[i]));
    bb_model *m = bb_model_open(argv[1], std::atoi(argv[2]), 0);
    if (!m) return fail(bb_last_error());   // the engine's message names the file
    const int n = (int)tokens.size(), vocab = bb_n_vocab(m), batch = (n + 1) / 2;
    std::vector<float> logits((size_t)n * vocab);
    int rc = bb_eval(m, tokens.data(), batch, logits.data(), 1);
    for (int i = batch; rc == 0 && i < n; i++) rc = bb_eval(m, &tokens[i], 1, &logits[(size_t)i * vocab], 1);
    if (rc != 0) {
        const std::string err = bb_last_error();
        bb_model_close(m);
        return fail("eval: " + err);
    }
    std::printf("kernel %s threads %d\n", bb_kernel_name(m), bb_n_threads(m));
    bb_model_close(m);
    FILE *f = std::fopen(argv[3], "wb");
    if (!f || std::fwrite(logits.data(), sizeof(float), logits.size(), f) != logits.size() || std::fclose(f) != 0)
        return fail(std::string(argv[3]) + ": cannot write");
    return 0;
}
