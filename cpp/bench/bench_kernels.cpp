// A stand-alone driver of the kernel benchmark entry points (bbk_*, cpp/src/kernels_capi.cpp) for
// `bitbasis bench kernels --runner CMD`: Python cannot load a library of another architecture, so
// for a cross-compiled build (aarch64 under qemu, tools/neon_test.sh --bench) it talks to this
// program instead. The benchmark grid, the table and the JSON stay in bitbasis/bench.py.
//
// Protocol: one request per line on stdin, one reply line on stdout, "ok\t<value>" or "err\t<message>".
//   kernels | default | features | compiler | machine
//   bandwidth BYTES THREADS MIN_SECONDS                          -> GB/s
//   bench KERNEL ROWS COLS N GROUP FLAGS TOKENS THREADS MIN_SECONDS FOOTPRINT_BYTES
//                                                    -> best median weight_bytes copies
// Not built by CMake (cpp/tests/*.cpp are); tools/neon_test.sh compiles it with the kernel sources.
#include <sys/utsname.h>

#include <cstdint>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "bitbasis_kernels.h"

static void reply(bool ok, const std::string &s) {
    std::cout << (ok ? "ok\t" : "err\t") << s << "\n" << std::flush;
}

int main() {
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string cmd;
        in >> cmd;
        if (cmd.empty()) continue;
        if (cmd == "kernels") {
            reply(true, bbk_kernels());
        } else if (cmd == "default") {
            const char *k = bbk_default_kernel();
            k ? reply(true, k) : reply(false, bbk_error());
        } else if (cmd == "features") {
            reply(true, bbk_cpu_features());
        } else if (cmd == "compiler") {
            reply(true, bbk_compiler());
        } else if (cmd == "machine") {   // what the program runs as (qemu-user reports the guest)
            struct utsname u;
            const bool ok = uname(&u) == 0;
            reply(ok, ok ? u.machine : "uname failed");
        } else if (cmd == "bandwidth") {
            int64_t bytes;
            int threads;
            double min_s;
            if (!(in >> bytes >> threads >> min_s)) {
                reply(false, "bandwidth: expected BYTES THREADS MIN_SECONDS");
                continue;
            }
            const double gbs = bbk_read_bandwidth(bytes, threads, min_s);
            char buf[64];
            std::snprintf(buf, sizeof buf, "%.17g", gbs);
            gbs < 0 ? reply(false, bbk_error()) : reply(true, buf);
        } else if (cmd == "bench") {
            std::string kernel;
            int64_t rows, cols;
            int n, group, tokens, threads;
            uint32_t flags;
            double min_s, best, median, wbytes;
            int64_t footprint;
            int copies;
            if (!(in >> kernel >> rows >> cols >> n >> group >> flags >> tokens >> threads >> min_s >> footprint)) {
                reply(false, "bench: expected KERNEL ROWS COLS N GROUP FLAGS TOKENS THREADS MIN_SECONDS FOOTPRINT_BYTES");
                continue;
            }
            if (bbk_bench(kernel.c_str(), rows, cols, n, group, flags, tokens, threads, min_s, footprint, &best, &median, &wbytes,
                          &copies) != 0) {
                reply(false, bbk_error());
                continue;
            }
            char buf[128];
            std::snprintf(buf, sizeof buf, "%.17g %.17g %.17g %d", best, median, wbytes, copies);
            reply(true, buf);
        } else {
            reply(false, "unknown request " + cmd);
        }
    }
    return 0;
}
