#!/usr/bin/env bash
# Here (no GPU needed; about 35 minutes on 2 cores): llama-cpp-python 0.3.36 — the llama.cpp the
# GGUF tests use — built for CUDA (sm_90) with the shared toolkit, packed for the GPU machine as
# .carry/lcpp-cuda.tar.xz (the package, its libraries, diskcache and typing_extensions).
#   GGML_CUDA_FORCE_CUBLAS: batches go through cuBLAS with the weights dequantized to f16, where
#   llama.cpp's CPU and MMQ kernels quantize the activations to 8 bits — the comparison of
#   scripts/bench/gguf_base_gsm8k.py --llama-gpu measures the adapter, not that rounding.
#   GGML_CUDA_FA=OFF: attention as plain products (fewer kernels to build; no effect on the loss).
# On the GPU machine: mkdir /tmp/lcpp && tar -xJf .carry/lcpp-cuda.tar.xz -C /tmp/lcpp, then
#   PYTHONPATH=/tmp/lcpp LD_LIBRARY_PATH=/usr/local/cuda/lib64:/tmp/lcpp/llama_cpp/lib \
#   python3 scripts/bench/gguf_base_gsm8k.py --phase all --device cuda --llama-gpu ...
set -euo pipefail
cd "$(dirname "$0")/../.."
source <(../shared/cuda/setup.sh --env)
# CMake's FindCUDAToolkit looks for the libraries in lib64; the pip toolkit has them in lib.
[ -e "$CUDA_ROOT/lib64" ] || ln -s lib "$CUDA_ROOT/lib64"
W=${W:-/tmp/lcpp-build}; rm -rf "$W"; mkdir -p "$W/dl" "$W/site"
python3 -m pip download -q --no-deps --no-binary :all: -d "$W/dl" llama-cpp-python==0.3.36
python3 -m pip download -q --no-deps -d "$W/dl" diskcache==5.6.3 typing_extensions
# The CPU part for any x86-64 with AVX2 (not -march=native: the GPU machine's CPU is another).
CPU="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_F16C=ON -DGGML_FMA=ON"
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_CUDA_FORCE_CUBLAS=ON -DGGML_CUDA_FA=OFF -DCMAKE_CUDA_ARCHITECTURES=90 $CPU" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python3 -m pip wheel -v --no-deps -w "$W/wheel" "$W"/dl/llama_cpp_python-0.3.36.tar.gz > "$W/build.log" 2>&1
python3 -m pip install -q --no-deps --no-compile --target "$W/site" "$W"/wheel/*.whl "$W"/dl/*.whl
# The wheel also carries CMake's install tree (a second copy of the libraries and headers) and
# stores each library three times (wheels hold no symlinks): keep llama_cpp/lib's .so.0 files,
# with the unversioned names linked to them.
rm -rf "$W/site/lib" "$W/site/include" "$W/site/bin"
for so0 in "$W"/site/llama_cpp/lib/*.so.0; do
  rm -f "$so0".* "${so0%.0}"
  ln -s "$(basename "$so0")" "${so0%.0}"
done
mkdir -p .carry && tar -cJf .carry/lcpp-cuda.tar.xz -C "$W/site" .
ls -la .carry/lcpp-cuda.tar.xz
