#!/usr/bin/env bash
# Issue 21, first device call: the small wheels to /tmp/site, edgeseq laid out as a package in /tmp/es-pkg,
# llama.cpp's sources to /tmp, then two background jobs (own process sessions, so they outlive this call
# while the machine stays warm): the llama.cpp CUDA build (/tmp/lcb.log) and the checkpoints, GGUFs and
# bundles (/tmp/prep.log, under /tmp/w). Usage: bash benchmarks/cuda/setup.sh
set -eu
R=$PWD
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whlcu/*.whl
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from harness.checkout import package_tree; package_tree('$R', '/tmp/es-pkg')"
[ "${SKIP_LLAMA:-0}" = 1 ] || tar xJf .lcpcu/lcp-0.3.36-cuda.tar.xz -C /tmp
# SKIP_LLAMA=1: no llama.cpp build; SKIP_PREP=1: no prep.py (cuda_bench.py builds what it needs); PREP_ARGS:
# prep.py's options
[ "${SKIP_LLAMA:-0}" = 1 ] || setsid nohup bash benchmarks/cuda/build_llama.sh > /tmp/lcb.log 2>&1 < /dev/null &
[ "${SKIP_PREP:-0}" = 1 ] || setsid nohup env PYTHONPATH=/tmp/es-pkg:/tmp/site:$R/benchmarks PYTHONUNBUFFERED=1 \
  python3 benchmarks/cuda/prep.py /tmp/w ${PREP_ARGS:-} > /tmp/prep.log 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, transformers, onnx; print('torch', torch.__version__, 'transformers', transformers.__version__, 'onnx', onnx.__version__)"
uname -r; nproc
