#!/usr/bin/env bash
# The C++ code under sanitizers:
#  1. ASan + UBSan (cmake -DBITBASIS_SANITIZE=ON): every cpp/tests/*.cpp program (with --quick), and
#     fuzz/tsan_threads.cpp (the model forward on 1/3/4 threads, two models at once) on tiny models.
#  2. ThreadSanitizer: the library and fuzz/tsan_threads.cpp once per kernel ISA this CPU has.
# Any sanitizer report fails the script (halt_on_error). Exit 0 = clean; 77 = the compiler lacks a
# sanitizer runtime (the caller may skip).
#
#   tools/sanitize.sh            build dirs: $BITBASIS_SANITIZE_DIR, else $BITBASIS_CACHE/sanitize,
#                                else /tmp/bitbasis-sanitize-$UID (never under build/, where the
#                                Python package looks for libbitbasis.so)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -n "${BITBASIS_SANITIZE_DIR:-}" ]; then B=$BITBASIS_SANITIZE_DIR
else B=$ROOT/.sanitize-build; fi  # per checkout: a cmake cache is tied to its source directory
mkdir -p "$B"
CXX=${CXX:-c++}
JOBS=${JOBS:-2}
NICE="nice -n 10"

for san in address,undefined thread; do
  if ! echo 'int main(){return 0;}' | $CXX -x c++ -fsanitize=$san - -o "$B/probe" 2>/dev/null; then
    echo "sanitize.sh: $CXX has no -fsanitize=$san runtime" >&2
    exit 77
  fi
done

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1

build() {  # build DIR CMAKE_ARGS...
  local d=$1; shift
  $NICE cmake -S "$ROOT" -B "$d" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" "$@" >"$d.log" 2>&1 ||
    { cat "$d.log"; exit 1; }
  $NICE cmake --build "$d" -j "$JOBS" >>"$d.log" 2>&1 || { tail -50 "$d.log"; exit 1; }
}

# Tiny converted models (the fuzz seed corpus: dense, residual, every binary-basis flag).
M=$B/models
if [ ! -e "$M/seed-flag-all" ]; then
  echo "== writing tiny models to $M"
  $NICE python fuzz/make_corpus.py "$M" >/dev/null
fi
MODELS=("$M/seed-res2" "$M/seed-flag-all" "$M/seed-flag-all-pow2" "$M/seed-f16")

echo "== ASan + UBSan build ($B/asan)"
build "$B/asan" -DBITBASIS_SANITIZE=ON -DBITBASIS_TESTS=ON
for t in "$B"/asan/test_*; do
  [ -x "$t" ] || continue
  echo "== $(basename "$t") --quick (ASan + UBSan)"
  $NICE "$t" --quick | tail -3
done
$NICE $CXX -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -std=c++17 \
  -Icpp/include fuzz/tsan_threads.cpp -L"$B/asan" -lbitbasis -Wl,-rpath,"$B/asan" -lpthread -o "$B/asan/threads"
for m in "${MODELS[@]}"; do
  echo "== threads $(basename "$m") (ASan + UBSan)"
  $NICE "$B/asan/threads" "$m" 2
done

echo "== ThreadSanitizer build ($B/tsan)"
build "$B/tsan" -DBITBASIS_TESTS=OFF -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
  -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread
$NICE $CXX -g -O1 -fsanitize=thread -std=c++17 -Icpp/include fuzz/tsan_threads.cpp -L"$B/tsan" -lbitbasis \
  -Wl,-rpath,"$B/tsan" -lpthread -o "$B/tsan/threads"
case $(uname -m) in
  x86_64) isas="scalar avx2 avx512" ;;
  aarch64) isas="scalar neon" ;;
  *) isas="scalar" ;;
esac
for isa in $isas; do
  for m in "${MODELS[@]:0:2}"; do
    echo "== threads $(basename "$m") BITBASIS_ISA=$isa (TSan)"
    if ! out=$(BITBASIS_ISA=$isa $NICE "$B/tsan/threads" "$m" 2 2>&1); then
      if grep -q "this CPU lacks" <<<"$out" && ! grep -q "ThreadSanitizer" <<<"$out"; then
        echo "   skipped: this CPU lacks $isa"; continue
      fi
      echo "$out"; exit 1
    fi
    echo "$out"
  done
done
echo "sanitize.sh: all clean"
