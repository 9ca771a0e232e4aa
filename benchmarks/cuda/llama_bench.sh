#!/usr/bin/env bash
# Issue 21's anchor on the device: waits for build_llama.sh and prep.py (setup.sh started both), makes
# F16/Q8_0/Q4_0 from edgeseq's f32 GGUF with llama-quantize, then llama-bench (-ngl 99 -r 20 -p 512 -n 128)
# and llama-batched-bench (1, 8, 64, 256 sequences, 128-token prompts, 128 new tokens each) per file.
# Everything lands in /tmp/lres and, packed, in $OUT/llama.tar.gz. Usage: WAIT=SECONDS bash llama_bench.sh
set -u
W=/tmp/w; BIN=/tmp/lcb/bin; R=/tmp/lres
MODELS=${MODELS:-"mamba-130m mamba2-130m rwkv7-0.1b"}
mkdir -p $R
end=$(( $(date +%s) + ${WAIT:-420} ))
while [ ! -f /tmp/lcb.done ] && [ $(date +%s) -lt $end ]; do sleep 3; done
cp /tmp/lcb.log /tmp/prep.log $R/ 2>/dev/null
[ -f /tmp/lcb.done ] || { echo "llama.cpp build not done"; tail -30 /tmp/lcb.log; exit 1; }
tail -2 /tmp/lcb.log
for m in $MODELS; do
  while [ ! -f $W/$m/prep.json ] && [ $(date +%s) -lt $end ]; do sleep 3; done
done
cp /tmp/prep.log $R/
for m in $MODELS; do
  for q in F16 Q8_0 Q4_0; do
    $BIN/llama-quantize $W/$m/model-f32.gguf $W/$m/model-$q.gguf $q 16 > $R/quant-$m-$q.log 2>&1 \
      || { echo "quantize $m $q failed"; tail -5 $R/quant-$m-$q.log; }
  done
done
for m in $MODELS; do
  args=""
  for q in F16 Q8_0 Q4_0; do [ -f $W/$m/model-$q.gguf ] && args="$args -m $W/$m/model-$q.gguf"; done
  echo "== llama-bench $m"
  $BIN/llama-bench $args -ngl 99 -r 20 -p 512 -n 128 -o json -oe md > $R/lb-$m.json 2> $R/lb-$m.err \
    || { echo "llama-bench $m failed"; tail -5 $R/lb-$m.err; }
  grep "^|" $R/lb-$m.err
done
for m in $MODELS; do
  for q in F16 Q8_0 Q4_0; do
    [ -f $W/$m/model-$q.gguf ] || continue
    echo "== llama-batched-bench $m $q"
    timeout 120 $BIN/llama-batched-bench -m $W/$m/model-$q.gguf -ngl 99 -c 65536 -b 2048 -ub 512 -npp 128 -ntg 128 \
      -npl 1,8,64,256 > $R/bb-$m-$q.out 2> $R/bb-$m-$q.err || { echo "batched-bench $m $q failed"; tail -5 $R/bb-$m-$q.err; }
    grep "^|" $R/bb-$m-$q.out $R/bb-$m-$q.err | cut -d: -f2- ; grep -h "graph nodes\|graph splits" $R/bb-$m-$q.err | head -2
  done
done
nvidia-smi > $R/nvidia-smi.txt 2>&1
ls -la $W/*/ > $R/files.txt
tar czf $OUT/llama.tar.gz -C /tmp lres
