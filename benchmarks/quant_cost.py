"""The cost of every quantization: size, perplexity, logit drift (quality) and decode speed (speed).

    python benchmarks/quant_cost.py table [--out DIR] [--models KEY,...] [--fixture-bytes 111539]
    python benchmarks/quant_cost.py quality [--out DIR] [--eval-bytes N] [--drift-tokens 4096]
    python benchmarks/quant_cost.py speed CHECKPOINT [--out DIR] [--rounds 3] [--tokens 64] [--threads 2]

table: the goals table of docs/quantization.md. Every trained model the table covers (TABLE_MODELS: the
two demo models over the whole of tests/data/kjv_heldout.txt; rwkv.cpp's fixtures v4, v5.1, v5.2, v6
and v7 over the last --fixture-bytes bytes of ../shared/corpora/tinyshakespeare.txt, cut to start on a
line) exported fresh as f32, int8 and int4 ONNX bundles (fused flavour, block 32, accuracy level 4) and
as Q8_0 and Q4_0 GGUF files by edgeseq's writer, the five streamed through the text together
(edgeseq.quant.evaluate.compare_text, 256 tokens a chunk as `edgeseq eval`): perplexity, its change
against f32, and the mean KL divergence from f32 per token. The goals: int4's perplexity change at most
Q4_0's + 0.5 percentage points, int8's at most Q8_0's + 0.2. JSON lines on stderr, Markdown on stdout.

quality: the rwkv.cpp v5.2 and v7 fixtures (../shared/fixtures/rwkv-cpp-tiny, byte-level) exported as
f32, f16, int8 and int4 ONNX bundles (fused flavour, block 32; int4 also with block 128 and in the
portable QDQ form), each scored with `edgeseq eval`'s streaming evaluator on the held-out tail of
../shared/corpora/tinyshakespeare.txt (its last --eval-bytes bytes: the last 10 % is the corpus's
usual validation split), plus the drift of each quant's logits from f32 over --drift-tokens tokens.
The GGUF quants are added, through edgeseq's engine and, for the architectures llama.cpp knows,
llama.cpp's. Markdown on stdout.

speed: one checkpoint (e.g. /tmp/edgeseq-bench/mamba-130m/hf from benchmarks/make_models.py)
exported as f32, f16, int8 and int4 with accuracy_level 4 and 0; decode tok/s (prefill graph,
one token a call, as sessions decode) and peak RSS, one subprocess per measurement, the systems
interleaved over rounds, medians.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
FIXTURES = SHARED / "fixtures" / "rwkv-cpp-tiny"
CORPUS = SHARED / "corpora" / "tinyshakespeare.txt"
MODELS = {"rwkv-5.2 730K": FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin",
          "rwkv-7 834K": FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin"}
ONNX_RECIPES = [("f32", {}), ("f16", {}), ("int8", {}), ("int4", {}), ("int4", {"block_size": 128}),
                ("int4", {"portable": True})]


def _label(quant, kw):
    extra = [f"block {kw['block_size']}" if "block_size" in kw else "", "portable QDQ" if kw.get("portable") else ""]
    return " ".join([quant] + [e for e in extra if e])


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def _logits(model, ids, chunk=512):
    from edgeseq.quant.evaluate import _all_logits

    s = model.session()
    return np.concatenate([_all_logits(s, ids[a:a + chunk]) for a in range(0, len(ids), chunk)])


def _drift(lg, ref):
    d = np.abs(lg.astype(np.float64) - ref)
    return {"max": float(d.max()), "mean": float(d.mean()), "argmax": float((lg.argmax(-1) == ref.argmax(-1)).mean())}


def quality(args):
    import edgeseq
    from edgeseq.exporters.export import export
    from edgeseq.quant.evaluate import evaluate_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = shakespeare_tail(args.eval_bytes)
    text = out / "heldout.txt"
    text.write_bytes(held)
    drift_ids = list(held[:args.drift_tokens])
    try:
        from edgeseq.exporters.gguf_writer import export_gguf  # the GGUF issue's writer, once it lands
    except ImportError:
        export_gguf = None
    rows = []
    for name, ckpt in MODELS.items():
        ref = None
        base_ppl = None
        for quant, kw in ONNX_RECIPES:
            b = out / f"{ckpt.stem}-{quant}-{kw.get('block_size', 32)}{'-p' if kw.get('portable') else ''}"
            if not b.exists():
                export(str(ckpt), str(b), quant=quant, **kw)
            m = edgeseq.load(str(b))
            t0 = time.perf_counter()
            r = evaluate_text(m, str(text), chunk=512)
            secs = time.perf_counter() - t0
            lg = _logits(m, drift_ids)
            if ref is None:
                ref, base_ppl = lg.astype(np.float64), r["ppl"]
            rows.append({"model": name, "format": "onnx", "quant": _label(quant, kw), "engine": "edgeseq (ORT)",
                         "bytes": _size(b / "weights.bin"), "ppl": r["ppl"], "bpb": r["bpb"],
                         "dppl": r["ppl"] / base_ppl - 1, "drift": _drift(lg, ref), "tokens": r["tokens"],
                         "tok_s": r["tokens"] / secs})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if export_gguf is not None:
            rows += _gguf_rows(name, ckpt, out, text, drift_ids, ref, base_ppl, export_gguf)
    _print_quality(rows, args, len(held))
    (out / "quality.json").write_text(json.dumps(rows, indent=1))


def _gguf_rows(name, ckpt, out, text, drift_ids, ref, base_ppl, export_gguf):
    """GGUF quants through edgeseq's engine (edgeseq.load of the .gguf), and through llama.cpp where it
    knows the architecture. Skipped with a note when the GGUF runtime is not there yet."""
    import edgeseq
    from edgeseq.quant.evaluate import evaluate_text

    rows = []
    for q in ("f32", "f16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0"):
        g = out / f"{ckpt.stem}-{q}.gguf"
        try:
            if not g.exists():
                export_gguf(str(ckpt), str(g), quant=q)
            engines = [("edgeseq (ORT)", {})]
            if "7v0" in ckpt.name:
                engines.append(("llama.cpp", {"engine": "llama.cpp"}))
            for label, kw in engines:
                m = edgeseq.load(str(g), **kw)
                r = evaluate_text(m, str(text), chunk=512)
                lg = _logits(m, drift_ids)
                rows.append({"model": name, "format": "gguf", "quant": q, "engine": label, "bytes": _size(g),
                             "ppl": r["ppl"], "bpb": r["bpb"], "dppl": r["ppl"] / base_ppl - 1,
                             "drift": _drift(lg, ref), "tokens": r["tokens"]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        except Exception as e:  # the GGUF runtime is another issue's work in progress: report, go on
            print(f"gguf {q} ({name}): skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return rows


def _print_quality(rows, args, nbytes):
    print(f"Held-out text: the last {nbytes} bytes of tinyshakespeare.txt; drift over its first "
          f"{args.drift_tokens} tokens, against the f32 bundle.\n")
    print("| model | format | quant | engine | weights | ppl | Δppl vs f32 | bits/byte | max \\|Δlogit\\| | "
          "mean \\|Δlogit\\| | same argmax |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = r["drift"]
        print(f"| {r['model']} | {r['format']} | {r['quant']} | {r['engine']} | {r['bytes'] / 1e6:.2f} MB | "
              f"{r['ppl']:.4f} | {100 * r['dppl']:+.2f} % | {r['bpb']:.4f} | {d['max']:.4f} | {d['mean']:.5f} | "
              f"{100 * d['argmax']:.2f} % |")


KJV_HELDOUT = ROOT / "tests" / "data" / "kjv_heldout.txt"
TABLE_MODELS = {  # key: (label, checkpoint, held-out text: "kjv" the whole file, "shakespeare" the tail)
    "rwkv7-demo": ("RWKV-7 demo", ROOT / "edgeseq" / "demo" / "rwkv7", "kjv"),
    "mamba2-demo": ("Mamba-2 demo", ROOT / "edgeseq" / "demo" / "mamba2", "kjv"),
    "v4": ("rwkv-4 660K", FIXTURES / "tiny-rwkv-4v0-660K-FP32.bin", "shakespeare"),
    "v5.1": ("rwkv-5.1 730K", FIXTURES / "tiny-rwkv-5v1-730K-FP32.bin", "shakespeare"),
    "v5.2": ("rwkv-5.2 730K", FIXTURES / "tiny-rwkv-5v2-730K-FP32.bin", "shakespeare"),
    "v6": ("rwkv-6 1m", FIXTURES / "tiny-rwkv-6v0-1m-FP32.bin", "shakespeare"),
    "v7": ("rwkv-7 834K", FIXTURES / "tiny-rwkv-7v0-834K-FP32.bin", "shakespeare"),
}
TABLE_QUANTS = (("onnx", "f32"), ("onnx", "int8"), ("gguf", "q8_0"), ("onnx", "int4"), ("gguf", "q4_0"))
GOALS = (("int4", "q4_0", 0.005), ("int8", "q8_0", 0.002))  # (ONNX recipe, GGUF type, allowed excess)


def shakespeare_tail(nbytes: int) -> bytes:
    """The last `nbytes` bytes of tinyshakespeare.txt, from the first line that starts after their first
    byte (the default 111,539 gives its last 111,538 bytes, the corpus's usual validation tenth)."""
    held = CORPUS.read_bytes()[-nbytes:]
    return held[held.index(b"\n") + 1:]


def table(args):
    import edgeseq
    from edgeseq.exporters.export import export
    from edgeseq.exporters.gguf_writer import export_gguf
    from edgeseq.quant.evaluate import compare_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = shakespeare_tail(args.fixture_bytes)
    tail = out / f"tinyshakespeare-last-{len(held)}.txt"
    tail.write_bytes(held)
    texts = {"kjv": KJV_HELDOUT, "shakespeare": tail}
    names = args.models.split(",") if args.models else list(TABLE_MODELS)
    unknown = [n for n in names if n not in TABLE_MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {', '.join(TABLE_MODELS)}")
    rows = []
    for name in names:
        label, ckpt, text = TABLE_MODELS[name]
        models, sizes = {}, {}
        for fmt, q in TABLE_QUANTS:  # exported fresh every run: a stale bundle would hide a recipe change
            p = out / f"{ckpt.stem}-{q}{'.gguf' if fmt == 'gguf' else ''}"
            if fmt == "onnx":
                export(str(ckpt), str(p), quant=q, force=True)
                sizes[q] = _size(p / "weights.bin")
            else:
                if p.exists():
                    p.unlink()
                export_gguf(str(ckpt), str(p), quant=q)
                sizes[q] = _size(p)
            models[q] = edgeseq.load(str(p))
        t0 = time.perf_counter()
        r = compare_text(models, str(texts[text]), chunk=256)
        base = r["f32"]["ppl"]
        row = {"model": label, "text": texts[text].name, "tokens": r["f32"]["tokens"], "seconds": time.perf_counter() - t0,
               **{q: {"ppl": x["ppl"], "dppl": x["ppl"] / base - 1, "kl": x["kl"], "bytes": sizes[q]} for q, x in r.items()}}
        row["goals"] = {f"{a}<={g}+{100 * tol:g}pp": row[a]["dppl"] <= row[g]["dppl"] + tol for a, g, tol in GOALS}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    _print_table(rows, args)
    (out / "table.json").write_text(json.dumps(rows, indent=1))


def _print_table(rows, args):
    n = len(shakespeare_tail(args.fixture_bytes))
    print(f"Held-out texts: the demo models, all of tests/data/kjv_heldout.txt; the rwkv.cpp fixtures, the last "
          f"{n:,} bytes of tinyshakespeare.txt. Perplexity per byte; "
          "Δ against f32; KL: mean KL(f32 ‖ quantized) per byte, in 1e-3 nats; weights: weights.bin or the .gguf.\n")
    print("| model | f32 ppl | int8 | GGUF Q8_0 | int4 | GGUF Q4_0 | goals |")
    print("|---|---|---|---|---|---|---|")

    def cell(x):
        return f"{x['ppl']:.4f} ({100 * x['dppl']:+.2f} %, KL {1000 * x['kl']:.3g}, {x['bytes'] / 1e6:.2f} MB)"

    for r in rows:
        ok = "met" if all(r["goals"].values()) else "**missed**: " + ", ".join(k for k, v in r["goals"].items() if not v)
        print(f"| {r['model']} | {r['f32']['ppl']:.4f} ({r['f32']['bytes'] / 1e6:.2f} MB) | {cell(r['int8'])} | "
              f"{cell(r['q8_0'])} | {cell(r['int4'])} | {cell(r['q4_0'])} | {ok} |")


# -- speed --------------------------------------------------------------------------------------
_WORKER = r"""
import json, sys, time
import edgeseq
path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = edgeseq.load(path, threads=threads)
s = m.session()
s.prefill(list(range(1, 17)))
t = 7
for _ in range(8):
    t = int(s.step(t).argmax())
t0 = time.perf_counter()
for _ in range(tokens):
    t = int(s.step(t).argmax())
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: after fork+exec ru_maxrss keeps the parent's peak (the parent exports the models)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"tok_s": tokens / dt, "rss_mb": hwm / 1024}))
"""


def speed(args):
    from edgeseq.exporters.export import export

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    systems = {}
    for quant, kw in [("f32", {}), ("f16", {}), ("int8", {}), ("int4", {}), ("int4", {"accuracy_level": 0}),
                      ("int8", {"accuracy_level": 0}), ("int4", {"block_size": 128})]:
        label = quant + "".join(f" {k.replace('_level', '')}={v}" for k, v in kw.items())
        b = out / label.replace(" ", "_").replace("=", "")
        if not b.exists():
            t0 = time.perf_counter()
            export(args.checkpoint, str(b), quant=quant, **kw)
            print(f"exported {label} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        systems[label] = b
    runs = {k: [] for k in systems}
    for rnd in range(args.rounds):
        for label, b in systems.items():
            r = subprocess.run(["nice", "-n", "10", sys.executable, "-c", _WORKER, str(b), str(args.tokens),
                                str(args.threads)], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                continue
            runs[label].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rnd, label, runs[label][-1], file=sys.stderr, flush=True)
    base = statistics.median(x["tok_s"] for x in runs["f32"])
    print(f"{args.checkpoint}: decode, {args.tokens} tokens a run, {args.threads} threads, median of "
          f"{args.rounds} interleaved rounds (shared, loaded machine)\n")
    print("| recipe | weights | decode tok/s | vs f32 | peak RSS |")
    print("|---|---|---|---|---|")
    for label, b in systems.items():
        tps = statistics.median(x["tok_s"] for x in runs[label])
        rss = statistics.median(x["rss_mb"] for x in runs[label])
        print(f"| {label} | {_size(b / 'weights.bin') / 1e6:.1f} MB | {tps:.1f} | {tps / base:.2f}x | {rss:.0f} MB |")
    (out / "speed.json").write_text(json.dumps(runs, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--out", default="/tmp/edgeseq-quant")
    q.add_argument("--eval-bytes", type=int, default=111_539)  # the last 10 % of tinyshakespeare
    q.add_argument("--drift-tokens", type=int, default=4096)
    t = sub.add_parser("table")
    t.add_argument("--out", default="/tmp/edgeseq-quant-table")
    t.add_argument("--models", default="", help=f"comma-separated, of: {', '.join(TABLE_MODELS)} (default all)")
    t.add_argument("--fixture-bytes", type=int, default=111_539, help="tail of tinyshakespeare for the fixtures")
    s = sub.add_parser("speed")
    s.add_argument("checkpoint")
    s.add_argument("--out", default="/tmp/edgeseq-quant-speed")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--tokens", type=int, default=64)
    s.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    {"table": table, "quality": quality, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
