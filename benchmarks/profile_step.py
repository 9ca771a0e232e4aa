"""Where does an edgeseq decode step spend its time? ONNX Runtime's profiler, plus interleaved timings.

    python benchmarks/profile_step.py /tmp/edgeseq-bench/mamba-130m/bundle-fused [--steps 64] [--rounds 3]

Two parts:

1. Profile: the bundle's decode graphs are opened the way edgeseq's engine opens them (2 intra-op
   threads, ORT_ENABLE_ALL), with `SessionOptions.enable_profiling`, and stepped one token at a time
   feeding the state back. Kernel time is summed per operator type and per node and divided by the
   number of steps. Done for each graph (step.onnx, and prefill.onnx fed one token, which is what the
   fused runtime decodes with) with ORT's prepacking on (the default) and off (`low_memory=True`).

2. Timings: the same configurations without the profiler, each in its own subprocess, interleaved over
   rounds; the figure is 1 / median step time (robust to the machine's noise bursts), also the mean.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

THREADS = 2
CONFIGS = [("step", False), ("step", True), ("prefill", False), ("prefill", True)]  # (graph, prepacking off)


def open_session(bundle: str, graph: str, no_prepack: bool, profile_dir: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    if no_prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, f"{graph}-{'noprepack' if no_prepack else 'prepack'}")
    return ort.InferenceSession(os.path.join(bundle, f"{graph}.onnx"), so, providers=["CPUExecutionProvider"])


def stepper(bundle: str, sess):
    import numpy as np

    with open(os.path.join(bundle, "edgeseq.json")) as f:
        man = json.load(f)
    spec = man["state"]
    state = {s["name"]: np.full([1, *s["shape"][1:]], s.get("init", 0.0), np.float32) for s in spec}
    out_names = ["logits"] + [s["output"] for s in spec]
    ids = np.zeros((1, 1), np.int64)

    def step(tok: int) -> int:
        nonlocal state
        ids[0, 0] = tok
        outs = sess.run(out_names, {"input_ids": ids, **state})
        state = {s["name"]: o for s, o in zip(spec, outs[1:])}
        return int(outs[0].reshape(-1).argmax())

    return step


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def profile(bundle: str, graph: str, no_prepack: bool, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        sess = open_session(bundle, graph, no_prepack, d)
        step = stepper(bundle, sess)
        tok = 5
        for _ in range(8):
            tok = step(tok)
        # the profiler records from session creation on: count the warm-up steps too
        n = 8
        for _ in range(steps):
            tok = step(tok)
        n += steps
        path = sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
    by_op, by_node = collections.Counter(), collections.Counter()
    run_total = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] += e["dur"]
            by_node[(e["name"][: -len("_kernel_time")], op)] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            run_total += e["dur"]
    return {"graph": graph, "no_prepack": no_prepack, "steps": n,
            "kernel_us_per_step": sum(by_op.values()) / n, "run_us_per_step": run_total / n,
            "by_op": {k: v / n for k, v in by_op.most_common()},
            "top_nodes": [(name, op, v / n) for (name, op), v in by_node.most_common(15)]}


def time_worker(bundle: str, graph: str, no_prepack: bool, steps: int) -> dict:
    r0 = rss_mib()
    sess = open_session(bundle, graph, no_prepack)
    step = stepper(bundle, sess)
    tok = 5
    for _ in range(8):
        tok = step(tok)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = step(tok)
        ts.append(time.perf_counter() - t0)
    return {"graph": graph, "no_prepack": no_prepack, "median_ms": 1e3 * statistics.median(ts),
            "mean_ms": 1e3 * statistics.fmean(ts), "rss_mib": rss_mib(), "rss_before_mib": r0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        graph, np_ = args.worker
        print("RESULT " + json.dumps(time_worker(args.bundle, graph, np_ == "1", args.steps)), flush=True)
        return

    out = {"bundle": args.bundle, "profiles": [], "timings": []}
    print(f"## Profile of one decode step: {args.bundle} ({THREADS} threads, {args.steps} steps)\n")
    for graph, no_prepack in CONFIGS:
        p = profile(args.bundle, graph, no_prepack, args.steps)
        out["profiles"].append(p)
        tot = p["kernel_us_per_step"]
        print(f"### {graph}.onnx, prepacking {'off (low_memory)' if no_prepack else 'on'}: "
              f"{p['run_us_per_step'] / 1e3:.2f} ms per run, of which kernels {tot / 1e3:.2f} ms\n")
        print("| op type | us/step | share |")
        print("|---|---|---|")
        for op, us in list(p["by_op"].items())[: args.top]:
            print(f"| {op} | {us:.0f} | {100 * us / tot:.1f} % |")
        print("\ntop nodes: " + "; ".join(f"{n} ({op}) {us:.0f} us" for n, op, us in p["top_nodes"][:6]) + "\n")

    res = collections.defaultdict(list)
    for rnd in range(args.rounds):
        for graph, no_prepack in CONFIGS:
            cmd = [sys.executable, os.path.abspath(__file__), args.bundle, "--steps", str(max(args.steps, 128)),
                   "--worker", graph, "1" if no_prepack else "0"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                raise RuntimeError(p.stderr[-3000:])
            r = json.loads(line[-1][7:])
            res[(graph, no_prepack)].append(r)
            out["timings"].append(r)
    print(f"### Decode step timings without the profiler (plain run(), {args.rounds} interleaved rounds)\n")
    print("| graph | prepacking | tok/s (1 / median step) | tok/s (1 / mean step) | RSS MiB |")
    print("|---|---|---|---|---|")
    for (graph, no_prepack), rs in res.items():
        med = statistics.median(r["median_ms"] for r in rs)
        mean = statistics.median(r["mean_ms"] for r in rs)
        rss = statistics.median(r["rss_mib"] for r in rs)
        print(f"| {graph}.onnx | {'off' if no_prepack else 'on'} | {1e3 / med:.1f} | {1e3 / mean:.1f} | {rss:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
