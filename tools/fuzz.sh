#!/usr/bin/env bash
# Fuzz the C++ GGUF reader + binary-basis validator + loader (fuzz/fuzz_gguf.cpp) with libFuzzer,
# ASan and UBSan, for SECONDS of wall time (default 60), at the lowest CPU priority.
#
#   tools/fuzz.sh [SECONDS] [extra libFuzzer flags...]      e.g. tools/fuzz.sh 120 -jobs=1
#
# Needs clang with the libFuzzer runtime (Debian: apt-get install clang libclang-rt-14-dev).
# Build: build/fuzz/ (objects compiled directly, no libbitbasis.so, so nothing here can be picked
# up by the Python package's library search). Seeds: build/fuzz/seeds (fuzz/make_corpus.py, made
# once) + tests/regressions; new coverage goes to build/fuzz/corpus; crashes to build/fuzz/crashes/.
# Every crash must become a file in tests/regressions/ (tests/test_fuzz.py replays them).
# Exit status: 0 when the run found nothing, 77 without clang/libFuzzer, else a crash, leak or timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true

CXX=${FUZZ_CXX:-}
if [ -z "$CXX" ]; then
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if command -v "$c" >/dev/null; then CXX=$c; break; fi
  done
fi
# Exit 77: no toolchain (the caller may skip).
[ -n "$CXX" ] || { echo "fuzz.sh: clang++ not found (apt-get install clang libclang-rt-14-dev)" >&2; exit 77; }
mkdir -p build/fuzz
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char *, unsigned long) { return 0; }' |
     "$CXX" -x c++ -fsanitize=fuzzer,address,undefined - -o build/fuzz/probe 2>/dev/null; then
  echo "fuzz.sh: $CXX lacks the libFuzzer/ASan runtime (Debian: apt-get install libclang-rt-14-dev)" >&2
  exit 77
fi

B=build/fuzz
mkdir -p "$B/obj" "$B/corpus" "$B/seeds" "$B/crashes"
FLAGS=(-g -O1 -std=c++17 -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all
       -fno-omit-frame-pointer -fsanitize-coverage-ignorelist=fuzz/coverage_ignore.txt -Icpp/include -Icpp/src)
# Rebuild everything when a header changed, else only the sources newer than their object.
newest_hdr=$(ls -t cpp/src/*.h cpp/include/*.h fuzz/coverage_ignore.txt | head -1)
objs=()
for src in cpp/src/*.cpp cpp/src/models/*.cpp fuzz/fuzz_gguf.cpp; do   # models/: one forward per architecture
  obj=$B/obj/$(echo "${src%.cpp}" | sed 's#^cpp/src/##; s#/#_#g').o
  objs+=("$obj")
  if [ ! -e "$obj" ] || [ "$src" -nt "$obj" ] || [ "$newest_hdr" -nt "$obj" ]; then
    # No ISA flags, as in CMakeLists.txt: wide code carries its own target (BB_ISA_BEGIN, kernels.h);
    # a -mavx512f file would lend its AVX-512 copies of shared templates to the whole binary (SIGILL here).
    isa=()
    case $src in *kernels_*) isa=(-O2) ;; esac   # hot loops, not coverage-traced (coverage_ignore.txt)
    echo "fuzz.sh: compiling $src"
    nice -n 19 "$CXX" "${FLAGS[@]}" "${isa[@]}" -c "$src" -o "$obj"
  fi
done
if [ ! -e "$B/fuzz_gguf" ] || [ -n "$(find "$B/obj" -newer "$B/fuzz_gguf" -name '*.o')" ]; then
  nice -n 19 "$CXX" -fsanitize=fuzzer,address,undefined "${objs[@]}" -lpthread -o "$B/fuzz_gguf"
fi

if [ -z "$(ls -A "$B/seeds")" ]; then
  echo "fuzz.sh: writing the seed corpus"
  nice -n 19 python fuzz/make_corpus.py "$B/seeds"
fi

# -max_len covers the largest seed (the F32 one, ~140 kB); the dictionary holds the GGUF keys and
# tensor names the loader looks for. Leak detection stays on: a leak on an error path is a bug too.
# Not `exec`: libFuzzer's -rss_limit_mb reads the *peak* RSS (getrusage ru_maxrss), which survives
# execve, and a shell started by a large process (pytest holding a model: ~3 GB) inherits that peak,
# so an exec'd fuzzer reported "out-of-memory" at its first check with a 28 MB heap. A child forked
# from this small shell starts its peak afresh.
nice -n 19 "$B/fuzz_gguf" -max_total_time="$secs" -max_len=196608 -timeout=20 -rss_limit_mb=2048 \
  -dict=fuzz/gguf.dict -artifact_prefix="$B/crashes/" -print_final_stats=1 \
  "$@" "$B/corpus" "$B/seeds" tests/regressions
