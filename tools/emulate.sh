#!/bin/sh
# The engine on CPUs this machine is not, under qemu-user (a CPU without a feature must never run an
# instruction of it: a leaked AVX-512 instruction is a SIGILL on every AVX2-only CPU).
#  x86:     one native cmake build (BITBASIS_TESTS=ON), run as it is under qemu-x86_64 -cpu Haswell
#           (AVX2, FMA, F16C, no AVX-512) and -cpu Nehalem (SSE4.2, no AVX): every cpp/tests program
#           (--quick, from the repository root), then tools/emulate.py: real SmolLM2 files through
#           bitbasis.Model with every kernel the dispatcher offers, and cpp/tools/forward_logits.cpp
#           on tiny models, logits against the native run's.
#  aarch64: every cpp/src file, cpp/tools/forward_logits.cpp and the cpp/tests programs built
#           statically with aarch64-linux-gnu-g++, run under qemu-aarch64 -cpu max (NEON + dotprod)
#           and -cpu cortex-a53 (no dotprod): the test programs, and the tiny models' logits against
#           the x86 native ones.
# One line per (CPU, program/kernel): PASS or FAIL (with the max relative error for logits).
# Exit status 0 when all pass, 1 when any fails, 2 when a tool is missing.
# Needs: apt-get install qemu-user g++-aarch64-linux-gnu (tools/setup.sh test), cmake, bitbasis
# importable by $PYTHON with torch (to convert the models; the emulated process imports no torch).
# Usage: tools/emulate.sh [native-build-dir [work-dir]]
#   native-build-dir  default .kernel-test-build (the build tests/test_kernels.py uses; incremental)
#   work-dir          aarch64 build, models, logits; default a new temporary directory
#   EMULATE_SMOL="a.gguf b.gguf"  converted SmolLM2 files to use (default: convert residual N=1, N=2)
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=${1:-$ROOT/.kernel-test-build}
W=${2:-$(mktemp -d)}
CXX_AARCH64=${CXX_AARCH64:-aarch64-linux-gnu-g++}
QEMU_X86_64=${QEMU_X86_64:-qemu-x86_64}
QEMU_AARCH64=${QEMU_AARCH64:-qemu-aarch64}
SYSROOT=${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
export QEMU_X86_64 QEMU_AARCH64 AARCH64_SYSROOT="$SYSROOT"
# Logits compare kernels across CPUs: every run keeps the f32 KV cache. Rounding keys and values to f16
# turns the kernels' last-bit differences into whole f16 steps (2.1e-3 of the max logit on the tiny
# GPTQ / PB-LLM models, over the 1e-3 bound); the f16 rows themselves are checked by test_kernels above.
export BITBASIS_KV=f32
for tool in "$CXX_AARCH64" "$QEMU_X86_64" "$QEMU_AARCH64" cmake; do
    command -v "$tool" >/dev/null 2>&1 || { echo "emulate: $tool not found (apt-get install qemu-user g++-aarch64-linux-gnu)" >&2; exit 2; }
done
rm -rf "$W/aarch64"   # no stale objects of a removed source
mkdir -p "$B" "$W/aarch64/obj"
START=$(date +%s)

echo "== native build ($B)"
{ cmake -S "$ROOT" -B "$B" -DCMAKE_BUILD_TYPE=Release -DBITBASIS_TESTS=ON && cmake --build "$B" -j "$JOBS"; } \
    >"$W/native-build.log" 2>&1 || { tail -30 "$W/native-build.log"; exit 1; }
c++ -std=c++17 -O2 -Wall -Wextra -I"$ROOT/cpp/include" "$ROOT/cpp/tools/forward_logits.cpp" \
    -L"$B" -lbitbasis -Wl,-rpath,"$B" -o "$W/forward_logits"

echo "== aarch64 build ($W/aarch64), static, the flags of the cmake Release build"
# Objects, not an archive: the dispatcher reaches the per-ISA files through weak references, which
# do not pull members out of a static archive. cpp/src/models/*.cpp: one file per architecture.
ls "$ROOT"/cpp/src/*.cpp "$ROOT"/cpp/src/models/*.cpp | xargs -P "$JOBS" -I{} sh -c \
    '"$0" -std=gnu++17 -O3 -ffp-contract=off -DNDEBUG -Wall -Wextra -I"$1/cpp/include" -c "{}" -o "$2/$(basename "{}" .cpp).o"' \
    "$CXX_AARCH64" "$ROOT" "$W/aarch64/obj"
for src in "$ROOT/cpp/tools/forward_logits.cpp" "$ROOT"/cpp/tests/*.cpp; do
    "$CXX_AARCH64" -std=gnu++17 -O3 -ffp-contract=off -DNDEBUG -static -I"$ROOT/cpp/include" -I"$ROOT/cpp/src" "$src" \
        "$W"/aarch64/obj/*.o -lpthread -o "$W/aarch64/$(basename "$src" .cpp)"
done
echo "== builds: $(($(date +%s) - START)) s"

# run LABEL PROGRAM CMD...: one PASS/FAIL line with the program's last line of output
run() {
    label=$1 prog=$2
    shift 2
    t0=$(date +%s)
    if out=$({ cd "$ROOT" && BITBASIS_VECTORS="$ROOT/formats/vectors" "$@"; } 2>&1); then rc=0; else rc=$?; fi
    last=$(printf '%s\n' "$out" | grep -v "^qemu-x86_64: warning" | tail -1 | cut -c1-100)
    [ $rc -gt 128 ] && last="killed by signal $((rc - 128)) ($(kill -l $((rc - 128)))): $last"
    printf '%s  %-18s %-44s %s (%s s)\n' "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$label" "$prog --quick" \
        "$last" "$(($(date +%s) - t0))"
}
# The test programs (single-threaded): x86 and aarch64 side by side.
for cpu in Haswell Nehalem; do
    for t in "$B"/test_*; do
        [ -x "$t" ] && run "x86 $cpu" "$(basename "$t")" "$QEMU_X86_64" -cpu "$cpu" "$t" --quick
    done
done >"$W/tests-x86.txt" &
for cpu in max cortex-a53; do
    for t in "$W"/aarch64/test_*; do
        run "aarch64 $cpu" "$(basename "$t")" "$QEMU_AARCH64" -L "$SYSROOT" -cpu "$cpu" "$t" --quick
    done
done >"$W/tests-aarch64.txt"
wait
cat "$W/tests-x86.txt" "$W/tests-aarch64.txt"
FAILED=$(cat "$W/tests-x86.txt" "$W/tests-aarch64.txt" | grep -c "^FAIL" || true)
echo "== test programs: $(($(date +%s) - START)) s"

# shellcheck disable=SC2086
if ! "$PYTHON" "$ROOT/tools/emulate.py" --build "$B" --work "$W" ${EMULATE_SMOL:+--smol $EMULATE_SMOL}; then
    FAILED=$((FAILED + 1))
fi
echo "== emulate.sh: $(($(date +%s) - START)) s, $([ $FAILED -eq 0 ] && echo "all PASS" || echo "FAILED")"
[ $FAILED -eq 0 ]
