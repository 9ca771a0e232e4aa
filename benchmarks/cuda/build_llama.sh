#!/usr/bin/env bash
# llama.cpp's CUDA build for sm_90 (the anchor of issue 21) from llama-cpp-python 0.3.36's sources,
# unpacked at /tmp/llama_cpp_python-0.3.36; binaries in /tmp/lcb/bin. Log: stdout; /tmp/lcb.done when built.
set -eu
src=/tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
t0=$(date +%s)
cmake -S $src -B /tmp/lcb -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_CUDA_FA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DGGML_NATIVE=ON
ninja -C /tmp/lcb -j16 llama-bench llama-batched-bench llama-quantize
echo "built in $(( $(date +%s) - t0 )) s"
touch /tmp/lcb.done
