"""Where a decode step's time goes as threads grow (issue 15's thread scaling): ONNX Runtime's profiler
(harness.tasks.profile) over the prefill graph fed one token (the graph edgeseq decodes with), each thread
count in its own process pinned to the first N cores. Prints per thread count the run time per step, the
summed kernel time, the kernels per step and the heaviest operator types.

    python benchmarks/cuda/cpu_profile.py BUNDLE [--threads 1 2 8 16] [--steps 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    if sys.argv[1] == "--child":
        sys.path.insert(0, os.path.dirname(HERE))
        from harness.tasks import profile

        print(json.dumps(profile({"bundle": sys.argv[2], "graph": "prefill", "steps": int(sys.argv[4]),
                                  "threads": int(sys.argv[3])})))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2, 8, 16])
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    for t in a.threads:
        out = subprocess.run(["taskset", "-c", f"0-{t - 1}", sys.executable, "-P", __file__, "--child", a.bundle,
                              str(t), str(a.steps)], capture_output=True, text=True, timeout=600)
        if out.returncode:
            print(f"{t} threads failed: {out.stderr[-400:]}")
            continue
        p = json.loads(out.stdout.splitlines()[-1])
        ops = ", ".join(f"{k} {v:.0f}" for k, v in list(p["by_op"].items())[:8])
        print(f"{t} threads: run {p['run_us'] / 1e3:.2f} ms/step, kernels {p['kernel_us'] / 1e3:.2f} ms "
              f"({p['kernels_per_step']:.0f} a step); µs/step by op: {ops}", flush=True)


if __name__ == "__main__":
    main()
