#!/usr/bin/env bash
# Build llama.cpp for the opt-in llama.cpp checks (pytest -m llamacpp): llama-cpp-python from its
# PyPI sdist into .venv, and libmtmd (the multimodal library the vision checks need, which the
# wheel does not ship) from the llama.cpp sources inside that sdist. ~25 min each on 2 cores.
# AVX2 without AVX-512/AMX: a native build on a VM that reports AMX died with SIGILL on the f16
# path. Afterwards: LLAMA_CPP_LIB_PATH=$OUT/bin MTMD_CPP_LIB=$OUT/bin pytest -m llamacpp
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
OUT=${OUT:-$PWD/.llamacpp}
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
mkdir -p "$OUT"
.venv/bin/pip download --no-deps --no-binary :all: -d "$OUT" "llama-cpp-python==$VERSION"
CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$FLAGS -DLLAMA_BUILD_TOOLS=OFF" \
  .venv/bin/pip install --no-deps "$OUT/llama_cpp_python-$VERSION.tar.gz"
.venv/bin/pip install diskcache   # llama-cpp-python imports it; not in its wheel's deps here
tar -xzf "$OUT/llama_cpp_python-$VERSION.tar.gz" -C "$OUT"
SRC="$OUT/llama_cpp_python-$VERSION/vendor/llama.cpp"
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release $FLAGS -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON
cmake --build "$OUT/build" --target mtmd -j2
echo "LLAMA_CPP_LIB_PATH=$OUT/build/bin MTMD_CPP_LIB=$OUT/build/bin .venv/bin/python -m pytest -m llamacpp"
