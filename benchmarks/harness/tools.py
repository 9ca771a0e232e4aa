"""`agree` and `profile`: the harness's systems and models put to other questions than speed."""
from __future__ import annotations

import os
import sys

import numpy as np

from harness.driver import Ctx, make_systems, snapshot_head
from harness.protocol import BENCHMARKS, ChildError, spawn
from harness.proc import log


def _setup(a):
    pythonpath = snapshot_head(os.path.dirname(BENCHMARKS))[0] if a.pin else None
    ctx = Ctx(a.work, a.timeout, pythonpath)
    return ctx, make_systems(a.systems, a.edgeseq_python, a.edgeseq_label, a.llamacpp_python, pythonpath)


def agree(a) -> None:
    """Do the systems compute the same model? Each feeds `steps` random tokens one at a time from a fresh
    state, then prefills the same tokens; the first system is the reference. (What check_agreement.py and
    bench_rwkv.py's check did: edgeseq, llama.cpp and HF, or edgeseq and the rwkv package.)"""
    ctx, systems = _setup(a)
    for m in a.models:
        built = spawn(sys.executable, "build", {"model": m, "root": a.work}, timeout=a.timeout)
        for q in a.quant:
            got = {}
            for s in systems:
                reason = s.skip(built, q)
                if reason:
                    log(f"skipped {s.label}: {reason}")
                    continue
                out = os.path.join(ctx.work, m, f"logits-{s.label}-{q}.npz")
                try:
                    art = s.prepare(ctx, built, q)
                    spawn(s.python, "logits", {"system": s.spec(), "built": built, "artifact": art,
                                               "threads": a.threads, "steps": a.steps, "out": out},
                          pythonpath=s.pythonpath, env=s.env(built), threads=a.threads, timeout=a.timeout)
                except ChildError as e:
                    log(f"FAILED {s.label} on {m} {q}: {str(e).strip().splitlines()[-1]}")
                    continue
                got[s.label] = np.load(out)
            if not got:
                continue
            ref_name, ref = next(iter(got.items()))
            v = ref["steps"].shape[1]
            print(f"\n### {m} {q}: {a.steps} stepped tokens, logits up to {np.abs(ref['steps']).max():.2f} "
                  f"(std {ref['steps'].std():.2f}); reference {ref_name}\n")
            print("| system | max abs diff, steps | max abs diff, prefill (last token) | same argmax |")
            print("|---|---|---|---|")
            for name, x in got.items():
                d = np.abs(x["steps"][:, :v] - ref["steps"]).max()
                dp = np.abs(x["prefill"][:v] - ref["prefill"]).max()
                same = int((x["steps"][:, :v].argmax(1) == ref["steps"].argmax(1)).sum())
                print(f"| {name} | {d:.2e} | {dp:.2e} | {same}/{a.steps} |")


def profile(a) -> None:
    """Where an edgeseq decode step spends its time, by operator type (ONNX Runtime's profiler slows a step
    by a quarter or so: read the shares, not the absolute times)."""
    ctx, systems = _setup(a)
    for m in a.models:
        built = spawn(sys.executable, "build", {"model": m, "root": a.work}, timeout=a.timeout)
        for q in a.quant:
            for s in systems:
                if not s.name.startswith("edgeseq") or s.name in ("edgeseq-gguf", "edgeseq-mobile"):
                    continue
                art = s.prepare(ctx, built, q)
                p = spawn(s.python, "profile", {"bundle": art["path"], "graph": a.graph, "steps": a.steps,
                                                "threads": a.threads, "low_memory": a.low_memory or s.low_memory},
                          pythonpath=s.pythonpath, threads=a.threads, timeout=a.timeout)
                tot = p["kernel_us"]
                print(f"\n### {m} {q} {s.label}: {a.graph}.onnx fed one token, {a.threads} threads, prepacking "
                      f"{'off' if a.low_memory or s.low_memory else 'on'}: {p['run_us'] / 1e3:.2f} ms per run, "
                      f"kernels {tot / 1e3:.2f} ms, {p['kernels_per_step']:.0f} kernels per step\n")
                print("| op type | µs/step | share |")
                print("|---|---|---|")
                for op, us in list(p["by_op"].items())[:a.top]:
                    print(f"| {op} | {us:.0f} | {100 * us / tot:.1f} % |")
                print("\ntop nodes: " + "; ".join(f"{n} {us:.0f} µs" for n, us in list(p["top_nodes"].items())[:6]))
