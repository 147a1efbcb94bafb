#!/bin/sh
# The engine on the lent machine's CPU (an AVX-512 Xeon: the one ISA path no CI host and no emulator
# here can run). Builds the library and the C++ tests with cmake, runs test_kernels (every kernel the
# CPU supports against the scalar reference), test_vectors (the golden vectors) and, for every
# supported kernel, cpp/tools/forward_logits on the tiny models in DIR against the logits the native
# x86 run here wrote beside them (DIR/NAME.native.f32; same tokens). Prints one line per check.
#   here:  make DIR (.device-carry: tiny GGUFs + NAME.native.f32 from forward_logits MODEL 2 OUT 300..309)
#   there: sh tools/device/cpu_check.sh DIR   (device tool: run with carry=[DIR])
set -eu
DIR=${1:-.device-carry}
B=/tmp/bb-cpu-check
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBITBASIS_TESTS=ON >/dev/null
ninja -C "$B" >/dev/null
c++ -std=c++17 -O2 -Icpp/include cpp/tools/forward_logits.cpp -L"$B" -lbitbasis -Wl,-rpath,"$B" -o "$B/forward_logits"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
"$B/forward_logits" --info
echo "== test_kernels: $("$B/test_kernels" | tail -1)"
echo "== test_vectors: $("$B/test_vectors" formats/vectors | tail -1)"
kernels=$("$B/forward_logits" --info | sed -n 's/^kernels: //p' | tr ';' '\n' | awk '$3 == 1 {print $1}')
for m in "$DIR"/*.gguf; do
    n=$(basename "$m" .gguf)
    for k in $kernels; do
        BITBASIS_KERNEL=$k "$B/forward_logits" "$m" 4 "$B/$n.$k.f32" 300 301 302 303 304 305 306 307 308 309 >/dev/null
        python3 -c "
import numpy as np, sys
a = np.fromfile('$B/$n.$k.f32', np.float32); b = np.fromfile('$DIR/$n.native.f32', np.float32)
e = float(np.abs(a - b).max() / np.abs(b).max())
print(('PASS' if e <= 1e-3 else 'FAIL'), '$n', '$k', 'max|a-b|/max|b| = %.2e' % e)
sys.exit(e > 1e-3)"
    done
done
