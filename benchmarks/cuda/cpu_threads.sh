#!/usr/bin/env bash
# Issue 15's thread scaling on the GPU host's CPU, one device call after setup.sh (SKIP_LLAMA=1,
# PREP_ARGS="--models mamba-130m --quants int8 int4"): llama.cpp's CPU build (GGML_NATIVE=ON, no CUDA) from
# the carried sources, Q8_0/Q4_0 from edgeseq's f32 GGUF by llama-quantize, then per thread count llama-bench
# (-ngl 0, pp256 / tg64, -r 3, pinned to the first N cores) and edgeseq (cpu_threads.py), interleaved by round.
# Results in $OUT. Usage: [BUILD_ONLY=1] [ROUNDS=2] MODELS="mamba-130m" bash benchmarks/cuda/cpu_threads.sh
set -u
R=$PWD; W=/tmp/w; B=/tmp/lcpu
MODELS=${MODELS:-mamba-130m}
if [ ! -x $B/bin/llama-bench ]; then  # built once while the machine stays warm
  tar xJf .lcpcu/lcp-0.3.36-cuda.tar.xz -C /tmp
  src=/tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
  t0=$(date +%s)
  cmake -S $src -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF > /tmp/lcpu.log 2>&1 && ninja -C $B -j16 llama-bench llama-quantize >> /tmp/lcpu.log 2>&1 \
    || { tail -20 /tmp/lcpu.log; exit 1; }
  echo "llama.cpp CPU build: $(( $(date +%s) - t0 )) s"; lscpu | grep -E "Model name|^CPU\(s\)" | cut -c1-200
  [ "${BUILD_ONLY:-0}" = 1 ] && exit 0
fi
end=$(( $(date +%s) + 300 ))
for m in $MODELS; do while [ ! -f $W/$m/prep.json ] && [ $(date +%s) -lt $end ]; do sleep 3; done; done
tail -3 /tmp/prep.log
export PYTHONPATH=/tmp/es-pkg:/tmp/site:$R/benchmarks
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__)"
for m in $MODELS; do for q in Q8_0 Q4_0; do
  $B/bin/llama-quantize $W/$m/model-f32.gguf $W/$m/model-$q.gguf $q 16 > /dev/null 2>&1 || echo "quantize $m $q failed"
done; done
for round in $(seq 1 ${ROUNDS:-2}); do
  for t in 1 2 4 8 16; do
    for m in $MODELS; do
      taskset -c 0-$((t-1)) $B/bin/llama-bench -m $W/$m/model-Q8_0.gguf -m $W/$m/model-Q4_0.gguf -ngl 0 -t $t \
        -p 256 -n 64 -r 3 -o jsonl >> $OUT/llama-r$round.jsonl 2>/dev/null || echo "llama-bench $m $t failed"
    done
    python3 -P benchmarks/cuda/cpu_threads.py $W --models $MODELS --threads $t --rounds 1 \
      --json $OUT/edgeseq-r$round-t$t.json | cut -c1-200
  done
done
grep -h '"n_prompt"' $OUT/llama-r*.jsonl | python3 -c "
import sys, json
for l in sys.stdin:
    d = json.loads(l); print(d['model_type'], d['n_threads'], 'pp' if d['n_prompt'] else 'tg', round(d['avg_ts'], 1))"
