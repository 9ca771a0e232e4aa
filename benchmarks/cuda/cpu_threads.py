"""Thread scaling on the GPU host's CPU (issue 15): edgeseq's int8/int4 bundles at 1, 2, 4, 8 and 16 threads,
each measurement a fresh process pinned to the first N cores (taskset), the same protocol as llama-bench's
pp/tg rows beside it (cpu_threads.sh): a 256-token prefill from an empty state (after one warm-up prefill),
then 64 greedy decode steps after a 16-token prompt and 8 warm-up steps; tok/s = tokens / median time.

    python benchmarks/cuda/cpu_threads.py WORK --models mamba-130m --quants int8 int4 --threads 1 2 4 8 16 --json OUT
    python benchmarks/cuda/cpu_threads.py --child BUNDLE THREADS   (one measurement; prints one JSON line)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(bundle: str, threads: int) -> dict:
    import numpy as np

    import edgeseq

    m = edgeseq.load(bundle, threads=threads)
    s = m.session()
    ids = np.random.default_rng(0).integers(0, m.vocab_size, 512).tolist()
    s.prefill(ids[:256])
    pf = []
    for _ in range(2):
        s.reset()
        t = time.perf_counter()
        s.prefill(ids[:256])
        pf.append(time.perf_counter() - t)
    s.reset()
    tok = int(np.argmax(s.prefill(ids[:16])))
    for _ in range(8):
        tok = int(np.argmax(s.step(tok)))
    steps = []
    for _ in range(64):
        t = time.perf_counter()
        tok = int(np.argmax(s.step(tok)))
        steps.append(time.perf_counter() - t)
    return {"prefill_tps": 256 / min(pf), "decode_tps": 1 / float(np.median(steps))}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))), flush=True)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--models", nargs="+", default=["mamba-130m"])
    ap.add_argument("--quants", nargs="+", default=["int8", "int4"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    rows = []
    for r in range(a.rounds):
        for m in a.models:
            for q in a.quants:
                for t in a.threads:
                    bundle = os.path.join(a.work, m, f"bundle-{q}")
                    cmd = ["taskset", "-c", f"0-{t - 1}", sys.executable, "-P", os.path.abspath(__file__), "--child",
                           bundle, str(t)]
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                    if out.returncode:
                        print(f"{m} {q} {t}t failed: {out.stderr[-500:]}", flush=True)
                        continue
                    res = {"round": r, "model": m, "quant": q, "threads": t, **json.loads(out.stdout.splitlines()[-1])}
                    rows.append(res)
                    print(json.dumps(res), flush=True)
                    with open(a.json, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
