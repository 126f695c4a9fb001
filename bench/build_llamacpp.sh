#!/usr/bin/env bash
# Build llama.cpp's llama-bench (and llama-server, llama-quantize) once, from the
# vendored tree of the llama-cpp-python source distribution on PyPI (the only
# registry these machines reach), outside the repository's tracked files.
#
#   bench/build_llamacpp.sh            # builds into ${SYBIL_LLAMACPP:-~/.cache/sybil/llama.cpp}
#
# About 10 minutes on 2 cores. bench.throughput's `llamacpp` row then finds the
# binaries there (or on PATH) and converts the benchmark's weights to GGUF with the
# tree's own convert_hf_to_gguf.py (needs the `gguf` package from the same tree).
set -euo pipefail
root="${SYBIL_LLAMACPP:-$HOME/.cache/sybil/llama.cpp}"
mkdir -p "$root"
cd "$root"
if [ ! -d src ]; then
  python3 -m pip download --no-binary :all: --no-deps --dest sdist "llama-cpp-python>=0.3" >&2
  tar -xzf sdist/llama_cpp_python-*.tar.gz
  mv llama_cpp_python-*/vendor/llama.cpp src
  rm -rf llama_cpp_python-*/
fi
python3 -m pip install --quiet "$root/src/gguf-py" >&2
cmake -S src -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build build -j "$(nproc)" --target llama-bench llama-quantize llama-server >&2
echo "$root/build/bin"
