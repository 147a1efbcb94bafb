#!/bin/sh
# Cross-compile the kernels and cpp/tests/test_kernels.cpp for aarch64 and run them under qemu:
# once on a CPU with the dot-product extension (neon-dotprod and neon-bytemask are both tested),
# once on a Cortex-A53 without it (dispatch must skip neon-dotprod; neon-bytemask is tested).
# Needs: apt-get install g++-aarch64-linux-gnu qemu-user
# Usage: tools/neon_test.sh [--quick] [build-dir]
set -eu
QUICK=""
if [ "${1:-}" = "--quick" ]; then QUICK="--quick"; shift; fi
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
# The engine's kernels only: the x86 files compile to nothing on aarch64 (guarded), so every
# kernel file can be passed; the baseline is armv8-a, dotprod is enabled per function.
"$CXX" -std=c++17 -O2 -Wall -Wextra -march=armv8-a -static -I"$SRC" \
    "$ROOT/cpp/tests/test_kernels.cpp" "$SRC"/kernels_scalar.cpp "$SRC"/kernels_dispatch.cpp \
    "$SRC"/kernels_neon.cpp "$SRC"/kernels_avx2.cpp "$SRC"/kernels_avx512.cpp \
    -o "$OUT/test_kernels_aarch64"
echo "== qemu -cpu max (neon + dotprod)"
"$QEMU" -L "$SYSROOT" -cpu max "$OUT/test_kernels_aarch64" $QUICK
echo "== qemu -cpu cortex-a53 (neon, no dotprod)"
"$QEMU" -L "$SYSROOT" -cpu cortex-a53 "$OUT/test_kernels_aarch64" $QUICK
