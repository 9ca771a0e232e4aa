"""Score the same GGUF files with llama.cpp (llama-cpp-python) and with edgeseq's GGUF runtime over a text:
nats per byte and perplexity from each engine, side by side (docs/quantization.md).

    python benchmarks/gguf_engines_eval.py --text tests/data/kjv_heldout.txt demo-rwkv7-q4_0.gguf ...

Both run one thread. llama.cpp scores token by token (its session has no all-logits prefill); edgeseq
streams prefill chunks with every position's logits.
"""
from __future__ import annotations

import argparse
import time

import edgeseq
from edgeseq.quant.evaluate import evaluate_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--text", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print("| file | engine | nats/byte | perplexity | seconds |")
    print("|---|---|---|---|---|")
    for path in args.files:
        for engine in ("llama.cpp", None):
            t = time.time()
            m = edgeseq.load(path, threads=args.threads, **({"engine": engine} if engine else {}))
            r = evaluate_text(m, args.text)
            print(f"| {path} | {engine or 'edgeseq'} | {r['nll'] / r['bytes']:.5f} | {r['ppl']:.4f} | "
                  f"{time.time() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
