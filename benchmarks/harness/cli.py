"""The command line: `python benchmarks/bench.py COMMAND ...` (or `PYTHONPATH=benchmarks python -P -m harness`).

    run      measure: N interleaved rounds × models × quants × threads × systems, a fresh process each
    compare  ratios of medians of two result files (or of two systems of one file)
    report   the tables of result files again
    agree    do the systems compute the same model? (logits against the first system)
    profile  ONNX Runtime's profiler over decode steps of an edgeseq bundle
    list     the systems and the model shapes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from harness import report
from harness.models import SHAPES
from harness.systems import QUANTS, SYSTEMS

WORK = os.path.join(tempfile.gettempdir(), "edgeseq-bench")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["mamba-tiny"], choices=list(SHAPES), metavar="MODEL",
                   help="model shapes (`list` shows them)")
    p.add_argument("--systems", nargs="+", default=["edgeseq"], metavar="SYSTEM",
                   help=f"systems: {', '.join(SYSTEMS)}")
    p.add_argument("--quant", nargs="+", default=["f32"], choices=list(QUANTS), metavar="QUANT",
                   help="f32 f16 int8 (ONNX int8 / GGUF Q8_0) int4 (int4 / Q4_0) q8_0 q4_0 q4_k ...")
    p.add_argument("--work", default=WORK, help="checkpoints and artifacts (kept for reruns; default %(default)s)")
    p.add_argument("--edgeseq-python", metavar="PYTHON",
                   help="also run every edgeseq system with this interpreter (e.g. another checkout's "
                        ".venv/bin/python), exporting its own artifacts; labelled SYSTEM@LABEL")
    p.add_argument("--edgeseq-label", default="base", help="LABEL of those systems (default %(default)s)")
    p.add_argument("--llamacpp-python", metavar="PYTHON", help="run llamacpp with this interpreter (a venv with "
                   "a native llama.cpp build)")
    p.add_argument("--pin", action="store_true", help="run the harness Python's edgeseq from a git archive of HEAD")
    p.add_argument("--timeout", type=float, default=900, help="seconds per child process")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="measure")
    _common(p)
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode", type=int, default=128, help="timed greedy steps (after a 16-token prompt and 16 warm-up steps)")
    p.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill (0: none)")
    p.add_argument("--marks", nargs="*", type=int, default=[], help="also decode speed and RSS at these contexts")
    p.add_argument("--max-context", type=int, help="edgeseq's max_context (attention rings); llama.cpp's n_ctx")
    p.add_argument("--contention", type=float, default=0.10, help="canary limit: a measurement whose threads "
                   "waited for a CPU more than this share of their runnable time is contended")
    p.add_argument("--min-clean", type=int, default=3, help="leave contended rounds out while this many clean remain")
    p.add_argument("--quiet-wait", type=float, default=0, help="before each measurement, wait up to this many "
                   "seconds for other processes to leave the run's cores free")
    p.add_argument("--nice", type=int, default=0, help="run the measuring children at this niceness increment "
                   "(negative needs root; the builds and exports stay at the harness's)")
    p.add_argument("--budget-min", type=float, default=0, help="start no new round after this many minutes")
    p.add_argument("--out", help="results file (default benchmarks/results/<UTC time>-<commit>.json)")

    p = sub.add_parser("compare", help="ratios of medians: after / before")
    p.add_argument("files", nargs="+", help="BEFORE.json AFTER.json, or one file holding both systems")
    p.add_argument("--before", help="system in the first file (default: X@LABEL in one file; same names in two)")
    p.add_argument("--after", help="system in the second file")
    p.add_argument("--models", nargs="+")
    p.add_argument("--min-clean", type=int, default=3)
    p.add_argument("--speed-tol", type=float, default=0.05)
    p.add_argument("--rss-tol", type=float, default=0.02)

    p = sub.add_parser("report", help="print the tables of result files")
    p.add_argument("files", nargs="+")
    p.add_argument("--min-clean", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="the memory table (artifact, state, RSS at each stage)")

    p = sub.add_parser("agree", help="logits of every system against the first")
    _common(p)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)

    p = sub.add_parser("profile", help="ONNX Runtime's profiler on an edgeseq bundle")
    _common(p)
    p.add_argument("--graph", default="prefill", choices=["prefill", "step"],
                   help="prefill.onnx fed one token is what the fused runtime decodes with")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--low-memory", action="store_true", help="prepacking off")
    p.add_argument("--top", type=int, default=15)

    sub.add_parser("list", help="systems and model shapes")
    a = ap.parse_args(argv)

    if a.cmd == "list":
        from harness import systems

        print(systems.__doc__)
        for n, s in SHAPES.items():
            cfg = {k: v for k, v in s["config"].items() if k != "layers_block_type"}
            kind = s.get("note") or ("tiny (the test suite's)" if s["tiny"] else "small (width 256)")
            print(f"{n:20s} {s['family']:16s} {s['source']:4s} {kind}"
                  f"\n{'':42s}{cfg}")
        return
    if a.cmd == "run":
        from harness.driver import run

        res = run(a)
        print(report.table(res))
        print(f"\nresults: {res['out']}")
        failed = [r for r in res["runs"] if "error" in r] + res["errors"]
        sys.exit(1 if failed else 0)
    if a.cmd == "report":
        for f in a.files:
            with open(f) as fh:
                res = json.load(fh)
            res["summary"] = report.summarize(res, a.min_clean)
            print(f"## {f}\n")
            print(report.memory_table(res) if a.memory else report.table(res))
        return
    if a.cmd == "compare":
        if len(a.files) > 2:
            ap.error("compare takes one or two files")
        loaded = []
        for f in a.files:
            with open(f) as fh:
                loaded.append(json.load(fh))
        before, after = loaded[0], loaded[-1]
        pairs = ([(a.before, a.after or a.before)] if a.before else report.default_pairs(before, after))
        if not pairs:
            ap.error("no systems to pair: give --before and --after")
        text, _ = report.compare(before, after, pairs, a.min_clean, a.speed_tol, a.rss_tol, a.models)
        print(text)
        return
    if a.cmd == "agree":
        from harness.tools import agree

        agree(a)
        return
    if a.cmd == "profile":
        from harness.tools import profile

        profile(a)


if __name__ == "__main__":
    main()
