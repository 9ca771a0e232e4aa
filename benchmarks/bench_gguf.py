"""The same GGUF file in edgeseq's engine (ONNX Runtime) and in llama.cpp, per quant, at real shapes.

    python benchmarks/bench_gguf.py [ROOT] [--rounds 3] [--quants f32 q8_0 q4_0] [--threads 2]

Models (random weights; speed and memory depend on the shapes, not the values):
    mamba-130m   HF MambaForCausalLM at mamba-130m's shape (benchmarks/make_models.py), vocab 50280
    rwkv7-0.1b   a BlinkDL RWKV-7 .pth at RWKV-x070-World-0.1B's shape (benchmarks/bench_rwkv.py), vocab 65536

For each model and quant, `edgeseq export --format gguf` writes ROOT/<model>/<quant>.gguf once. Every
measurement is a fresh child process (so peak RSS is its own), interleaved over rounds in the order
round > model > quant > engine; the tables give medians and [min-max].

    edgeseq    edgeseq.load(x.gguf): the GGUF becomes a bundle in a temporary directory (Q4_0/Q8_0
               matrices repacked for MatMulNBits, other block types re-quantized to 8 bits, accuracy_level
               4), then ONNX Runtime; `load s` includes that conversion, and so does the peak RSS (VmHWM);
               "RSS at end" (VmRSS after the decode) is what the running model holds
    llama.cpp  edgeseq.load(x.gguf, engine="llama.cpp"): llama-cpp-python on the file as it is

Each child: load, warm-up (8-token prefill and one step, then reset), prefill of PROMPT random tokens
(one call), then DECODE greedy steps. Threads: --threads for both engines (default 1: on a shared,
overloaded machine llama.cpp's spinning worker threads collapse, ~0.5 tok/s at 2 threads under a load of
12 on 2 cores, which measures the neighbours, not the engine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("mamba-130m", "rwkv7-0.1b")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def checkpoint(root: str, name: str) -> str:
    sys.path.insert(0, HERE)
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    if name == "mamba-130m":
        import make_models

        hf = os.path.join(d, "hf")
        if not os.path.isfile(os.path.join(hf, "model.safetensors")):
            make_models.make_checkpoint(name, hf, make_models.get_tokenizer("/tmp/edgeseq-bench-tok"))
        return hf
    import bench_rwkv

    pth = os.path.join(d, "pth", "model.pth")
    if not os.path.isfile(pth):
        bench_rwkv.make_pth(name, os.path.dirname(pth))  # writes model.pth (and spec.json) into the folder
    return pth


def child(engine: str, path: str, threads: int, prompt: int, decode: int) -> dict:
    import numpy as np

    import edgeseq

    t0 = time.perf_counter()
    kw = {"engine": "llama.cpp"} if engine == "llama.cpp" else {}
    m = edgeseq.load(path, threads=threads, **kw)
    s = m.session()
    t_load = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, 50000, prompt).tolist()
    from edgeseq.runtime.session import time_session

    t_pre, t_dec = time_session(s, ids, decode)
    return {"load_s": t_load, "prefill_tps": prompt / t_pre, "decode_tps": decode / t_dec,
            "peak_rss_mb": status_mb("VmHWM"), "end_rss_mb": status_mb("VmRSS")}


def status_mb(key: str) -> float:
    """VmHWM (peak resident set) or VmRSS (now) of this process. Not getrusage's ru_maxrss: Linux carries
    the parent's peak into a child across exec, so every child would report at least the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(engine, path, threads, prompt, decode) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", engine, path, str(threads), str(prompt),
                        str(decode)], capture_output=True, text=True, env=env, timeout=1800)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    log(f"child failed ({engine} {path}): {p.stderr[-1500:]}")
    return None


def table(results: dict, quants, models) -> str:
    out = []
    for name in models:
        out.append(f"\n### {name}\n")
        out.append("| quant | GGUF MB | engine | decode tok/s | prefill tok/s | peak RSS MB | RSS at end MB | load s |")
        out.append("|---|---|---|---|---|---|---|---|")
        for q in quants:
            for eng in ("edgeseq", "llama.cpp"):
                rs = [r for r in results.get(f"{name}|{q}|{eng}", []) if r]
                if not rs:
                    out.append(f"| {q} | | {eng} | failed | | | | |")
                    continue
                cell = []
                for k, fmt in (("decode_tps", "{:.1f}"), ("prefill_tps", "{:.0f}"), ("peak_rss_mb", "{:.0f}"),
                               ("end_rss_mb", "{:.0f}"), ("load_s", "{:.1f}")):
                    v = [r.get(k, float("nan")) for r in rs]
                    cell.append(f"{fmt.format(statistics.median(v))} [{fmt.format(min(v))}–{fmt.format(max(v))}]")
                out.append(f"| {q} | {results['size'][f'{name}|{q}']:.0f} | {eng} | " + " | ".join(cell) + " |")
        out.append("")
        out.append("| quant | decode edgeseq/llama.cpp | prefill edgeseq/llama.cpp | RSS edgeseq/llama.cpp |")
        out.append("|---|---|---|---|")
        for q in quants:
            a = [r for r in results.get(f"{name}|{q}|edgeseq", []) if r]
            b = [r for r in results.get(f"{name}|{q}|llama.cpp", []) if r]
            if a and b:
                ratio = [statistics.median([r[k] for r in a]) / statistics.median([r[k] for r in b])
                         for k in ("decode_tps", "prefill_tps", "peak_rss_mb")]
                out.append(f"| {q} | " + " | ".join(f"{x:.2f}" for x in ratio) + " |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, path, threads, prompt, decode = sys.argv[2:7]
        print("RESULT " + json.dumps(child(engine, path, int(threads), int(prompt), int(decode))), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/edgeseq-bench-gguf")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--quants", nargs="*", default=["f32", "q8_0", "q4_0"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from edgeseq.exporters.gguf_writer import export_gguf

    results: dict = {"size": {}}
    paths = {}
    for name in args.models:
        ck = checkpoint(args.root, name)
        for q in args.quants:
            g = os.path.join(args.root, name, f"{q}.gguf")
            if not os.path.isfile(g):
                t0 = time.perf_counter()
                info = export_gguf(ck, g, quant=q)
                log(f"{name} {q}: {info['types']} in {time.perf_counter() - t0:.1f} s")
            paths[name, q] = g
            results["size"][f"{name}|{q}"] = os.path.getsize(g) / 2 ** 20
    for r in range(args.rounds):
        for name in args.models:
            for q in args.quants:
                for eng in ("edgeseq", "llama.cpp"):
                    res = run_child(eng, paths[name, q], args.threads, args.prompt, args.decode)
                    results.setdefault(f"{name}|{q}|{eng}", []).append(res)
                    log(f"round {r} {name} {q} {eng}: {res}")
        md = table(results, args.quants, args.models)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
