#!/usr/bin/env bash
# Issue 21, edgeseq's side on the device: the GPU onnxruntime unpacked (once) from /tmp/ort.tar.xz to
# /tmp/ortsite, then cuda_bench.py in the background (own process session: it may outlive one call) in two
# passes (f32 + int4 first, then int8 + f16), JSON under /tmp/eres. Waits up to WAIT seconds; copies
# what is there to $OUT. Usage: WAIT=SECONDS bash run_edgeseq.sh [start|wait]
# QA, QB: the two passes' --quants (QB empty: one pass); MEM: gpu_memory.py's options (empty: not run)
set -u
QA=${QA:-"f32 int4"}; QB=${QB-"int8 f16"}; MEM=${MEM:-}
R=$PWD
SP=$(python3 -c "import site;print(site.getsitepackages()[0])")
export PYTHONPATH=/tmp/ortsite:/tmp/es-pkg:/tmp/site:$R/benchmarks PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=$(ls -d $SP/nvidia/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
mkdir -p /tmp/eres
if [ "${1:-start}" = start ]; then
  if [ ! -d /tmp/ortsite/onnxruntime ]; then
    echo "$(cat .ortgpu2/p5/sha 2>/dev/null | cut -c1-64)  /tmp/ort.tar.xz" | sha256sum -c - || exit 1
    mkdir -p /tmp/ortsite && xz -dc /tmp/ort.tar.xz | tar xf - -C /tmp/ortsite || exit 1
  fi
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from harness.checkout import package_tree; package_tree('$R', '/tmp/es-pkg')"
  python3 -c "import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())"
  ARGS=${ARGS:-"--profile"}
  B="true"; [ -n "$QB" ] && B="python3 benchmarks/cuda_bench.py /tmp/w --quants $QB $ARGS --json /tmp/eres/cuda-b.json > /tmp/eres/b.log 2>&1"
  M="true"; [ -n "$MEM" ] && M="python3 benchmarks/cuda/gpu_memory.py /tmp/w $MEM --json /tmp/eres/mem.json > /tmp/eres/mem.log 2>&1"
  setsid nohup bash -c "python3 benchmarks/cuda_bench.py /tmp/w --quants $QA $ARGS --json /tmp/eres/cuda-a.json > /tmp/eres/a.log 2>&1; \
    $B; $M; touch /tmp/eres/done" > /dev/null 2>&1 < /dev/null &
fi
end=$(( $(date +%s) + ${WAIT:-540} ))
while [ ! -f /tmp/eres/done ] && [ $(date +%s) -lt $end ]; do sleep 5; done
[ -f /tmp/eres/done ] && echo ALL DONE || echo STILL RUNNING
grep -v "^ " /tmp/eres/a.log | tail -60; [ -f /tmp/eres/b.log ] && grep -v "^ " /tmp/eres/b.log | tail -40
[ -f /tmp/eres/mem.log ] && tail -20 /tmp/eres/mem.log
cp /tmp/eres/*.json /tmp/eres/*.log $OUT/ 2>/dev/null
ls $OUT
