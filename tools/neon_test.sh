#!/bin/sh
# Cross-compile the kernels and cpp/tests/test_kernels.cpp for aarch64 and run them under qemu:
# once on a CPU with the dot-product extension (neon-dotprod and neon-bytemask are both tested),
# once on a Cortex-A53 without it (dispatch must skip neon-dotprod; neon-bytemask is tested).
# With --bench: cross-compile cpp/bench/bench_kernels.cpp instead and run `bitbasis bench kernels`
# through it under qemu (default arguments --smoke; BENCH_ARGS overrides them). Its output is
# labelled "emulated (qemu) — timings not comparable": this checks that the benchmark runs on
# aarch64, never its speed.
# Needs: apt-get install g++-aarch64-linux-gnu qemu-user (and, for --bench, bitbasis importable by $PYTHON)
# Usage: tools/neon_test.sh [--quick | --bench] [build-dir]
set -eu
MODE=""
case "${1:-}" in
    --quick|--bench) MODE="$1"; shift ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$(mktemp -d)}
CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
QEMU=${QEMU_AARCH64:-qemu-aarch64}
SYSROOT=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
for tool in "$CXX" "$QEMU"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "neon_test: $tool not found (apt-get install g++-aarch64-linux-gnu qemu-user)" >&2; exit 2; }
done
mkdir -p "$OUT"
SRC="$ROOT/cpp/src"
# The engine's kernels (and ops.cpp: the online rotation's signs) only: the x86 files compile to nothing on aarch64 (guarded), so every
# kernel file can be passed; the baseline is armv8-a, dotprod is enabled per function.
set -- "$SRC"/ops.cpp "$SRC"/kernels_scalar.cpp "$SRC"/kernels_dispatch.cpp "$SRC"/kernels_lut.cpp "$SRC"/kernels_neon.cpp "$SRC"/kernels_avx2.cpp \
    "$SRC"/kernels_avx512.cpp
if [ "$MODE" = "--bench" ]; then
    # the benchmark entry points (kernels_capi.cpp, its thread pool) behind a line-protocol driver
    "$CXX" -std=c++17 -O2 -ffp-contract=off -Wall -Wextra -march=armv8-a -static -I"$SRC" -I"$ROOT/cpp/include" \
        "$ROOT/cpp/bench/bench_kernels.cpp" "$@" "$SRC/kernels_capi.cpp" "$SRC/threadpool.cpp" \
        -o "$OUT/bench_kernels_aarch64"
    echo "== bitbasis bench kernels under qemu -cpu max (emulated)"
    # shellcheck disable=SC2086
    PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m bitbasis.cli bench kernels \
        ${BENCH_ARGS:---smoke} --runner "'$QEMU' -L '$SYSROOT' -cpu max '$OUT/bench_kernels_aarch64'" \
        --json "$OUT/bench_kernels_aarch64.json"
    exit 0
fi
"$CXX" -std=c++17 -O2 -ffp-contract=off -Wall -Wextra -march=armv8-a -static -I"$SRC" \
    "$ROOT/cpp/tests/test_kernels.cpp" "$@" "$SRC/threadpool.cpp" \
    -o "$OUT/test_kernels_aarch64"
echo "== qemu -cpu max (neon + dotprod)"
"$QEMU" -L "$SYSROOT" -cpu max "$OUT/test_kernels_aarch64" $MODE
echo "== qemu -cpu cortex-a53 (neon, no dotprod)"
"$QEMU" -L "$SYSROOT" -cpu cortex-a53 "$OUT/test_kernels_aarch64" $MODE
