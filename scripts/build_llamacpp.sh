#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-completion, llama-simple, llama-bench, llama-tokenize,
# llama-quantize) for the GGUF round trip and the decode-speed comparison, and bench/llamacpp_greedy.cpp against its
# library. The source is the copy of llama.cpp that the `llama-cpp-python` source distribution on PyPI carries
# (vendor/llama.cpp, with its convert_hf_to_gguf.py), so only PyPI is needed.
# Usage: scripts/build_llamacpp.sh          prints the bin directory on stdout (builds once, then reuses it)
# Env: LLAMACPP_PYPI_VERSION (0.3.36)  DSOPEN_CACHE (~/.cache/dsopen)  JOBS (nproc)
#      LLAMACPP_ISA (native; avx2: AVX2 + FMA + F16C only, in build-avx2/, to compare what a CPU without AVX-512 gets)
set -euo pipefail
VERSION="${LLAMACPP_PYPI_VERSION:-0.3.36}"
CACHE="${DSOPEN_CACHE:-$HOME/.cache/dsopen}"
JOBS="${JOBS:-$(nproc)}"
DIR="$CACHE/llama.cpp-py$VERSION"
LLAMACPP_ISA="${LLAMACPP_ISA:-native}"
case "$LLAMACPP_ISA" in
  native) BUILD="$DIR/build" ;;
  avx2) BUILD="$DIR/build-avx2" ;;
  *) echo "error: LLAMACPP_ISA: '$LLAMACPP_ISA' is not native or avx2" >&2; exit 2 ;;
esac
BIN="$BUILD/bin"
TOOLS=(llama-completion llama-simple llama-bench llama-tokenize llama-quantize)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
have_all() {
  for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
  [ -x "$BIN/llamacpp_greedy" ] && [ "$BIN/llamacpp_greedy" -nt "$ROOT/bench/llamacpp_greedy.cpp" ]
}
build_greedy() {
  g++ -O2 -std=c++17 -I "$DIR/src/include" -I "$DIR/src/ggml/include" "$ROOT/bench/llamacpp_greedy.cpp" \
    -o "$BIN/llamacpp_greedy" "$BUILD/src/libllama.a" "$BUILD/ggml/src/libggml.a" \
    "$BUILD/ggml/src/libggml-cpu.a" "$BUILD/ggml/src/libggml-base.a" -fopenmp -lpthread -ldl >&2
}
if have_all; then echo "$BIN"; exit 0; fi
mkdir -p "$DIR"
if [ ! -f "$DIR/src/CMakeLists.txt" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching llama-cpp-python==$VERSION (source distribution) from PyPI" >&2
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
  tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
  rm -rf "$DIR/src"
  mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DIR/src"
fi
echo "building llama.cpp tools in $BUILD ($JOBS jobs; a few minutes once)" >&2
# GGML_NATIVE on an AMX CPU compiles ggml's AMX kernels, whose quantized paths died with SIGILL on such a VM: there,
# the instruction sets are named instead (AVX-512 with VNNI and BF16, no AMX).
ISA=(-DGGML_NATIVE=ON)
if [ "$LLAMACPP_ISA" = avx2 ]; then
  ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF
       -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
       -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
elif grep -qw amx_tile /proc/cpuinfo; then
  ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
       -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S "$DIR/src" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${ISA[@]}" -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$BUILD" -j "$JOBS" --target "${TOOLS[@]}" >&2
build_greedy
have_all || { echo "error: llama.cpp build finished without ${TOOLS[*]} in $BIN" >&2; exit 1; }
echo "$BIN"
