"""Decode speed, prefill speed and memory: edgeseq vs llama.cpp vs HF transformers, fp32, CPU.

    python benchmarks/make_models.py /tmp/edgeseq-bench            # once: models at real shapes
    python benchmarks/bench_decode.py /tmp/edgeseq-bench --rounds 3 --json /tmp/edgeseq-bench/results.json

Each measurement runs in its own subprocess (one system, one model, fresh interpreter), and the
systems are interleaved round by round (edgeseq, portable, hf, llama.cpp, edgeseq, ...; the order
rotates each round) so that machine noise hits them alike; the table quotes medians over rounds.

A worker:  load -> warm-up prefill of 512 tokens -> reset -> timed prefill of 512 tokens -> reset ->
prefill of a 16-token prompt -> 8 warm-up steps -> 128 timed greedy steps (argmax of the logits fed
back) -> VmHWM / VmRSS from /proc/self/status. Peak RSS therefore covers a 512-token prefill as well
as decoding. Everything runs with 2 threads.

Systems:
    edgeseq           edgeseq.load(bundle-fused, threads=2)                   (the defaults)
    edgeseq-lowmem    edgeseq.load(bundle-fused, threads=2, low_memory=True)  (ORT prepacking off)
    edgeseq-portable  edgeseq.load(bundle-portable, threads=2)
    hf                transformers fp32 *ForCausalLM, torch.set_num_threads(2), manual cache stepping
    llamacpp          llama-cpp-python, GGUF f32 from llama.cpp's own converter, n_threads(_batch)=2,
                      Llama.eval of one token at a time, logits read with llama_get_logits_ith

Plus, once per model, `edgeseq-long`: 4096 greedy steps after a 16-token prompt with VmRSS read
after 256, 1024, 2048 and 4096 tokens (the state is fixed-size, so RSS must not grow).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SYSTEMS = ["edgeseq", "edgeseq-lowmem", "edgeseq-portable", "hf", "llamacpp"]
MODELS = ["mamba-130m", "mamba2-130m"]
THREADS = 2
PROMPT_LONG = 512
PROMPT_SHORT = 16
DECODE = 128
WARM_STEPS = 8
LONG_MARKS = (256, 1024, 2048, 4096)


# ---------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------
def proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024  # kB -> bytes
    return out


def prompt_ids(n: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(100, 50000, n).tolist()


class EdgeseqRunner:
    def __init__(self, model_dir: str, flavour: str, low_memory: bool):
        import edgeseq

        opts = {"low_memory": True} if low_memory else {}
        self.model = edgeseq.load(os.path.join(model_dir, f"bundle-{flavour}"), threads=THREADS, **opts)
        self.s = self.model.session()
        self.weights_bytes = self.model.weights_bytes
        self.state_bytes = self.model.state_bytes

    def reset(self):
        self.s.reset()

    def prefill(self, ids) -> int:
        return int(self.s.prefill(ids).argmax())

    def step(self, tok: int) -> int:
        return int(self.s.step(tok).argmax())


class HFRunner:
    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.m = AutoModelForCausalLM.from_pretrained(os.path.join(model_dir, "hf"), dtype=torch.float32).eval()
        self.cache = None

    def reset(self):
        self.cache = None

    def prefill(self, ids) -> int:
        with self.torch.inference_mode():
            out = self.m(self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self.cache = out.cache_params
        return int(out.logits[0, -1].argmax())

    def step(self, tok: int) -> int:
        with self.torch.inference_mode():
            out = self.m(self.torch.tensor([[tok]]), cache_params=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache_params
        return int(out.logits[0, -1].argmax())


class LlamaRunner:
    def __init__(self, model_dir: str):
        import llama_cpp
        import numpy as np

        self.lc, self.np = llama_cpp, np
        self.llm = llama_cpp.Llama(os.path.join(model_dir, "model-f32.gguf"), n_ctx=2048, n_batch=PROMPT_LONG,
                                   n_ubatch=PROMPT_LONG, n_threads=THREADS, n_threads_batch=THREADS,
                                   logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        p = self.lc.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())

    def reset(self):
        self.llm.reset()

    def prefill(self, ids) -> int:
        self.llm.eval(ids)
        return self._argmax()

    def step(self, tok: int) -> int:
        self.llm.eval([tok])
        return self._argmax()


def make_runner(system: str, model_dir: str):
    if system == "edgeseq":
        return EdgeseqRunner(model_dir, "fused", False)
    if system == "edgeseq-lowmem":
        return EdgeseqRunner(model_dir, "fused", True)
    if system == "edgeseq-portable":
        return EdgeseqRunner(model_dir, "portable", False)
    if system == "hf":
        return HFRunner(model_dir)
    if system == "llamacpp":
        return LlamaRunner(model_dir)
    raise SystemExit(f"unknown system {system}")


def worker(system: str, model_dir: str) -> dict:
    import numpy as np  # noqa: F401  (imported before the baseline reading, as every runner needs it)

    res = {"system": system, "model": os.path.basename(model_dir.rstrip("/"))}
    long = system == "edgeseq-long"
    # import the heavy libraries first, so that the baseline RSS includes them
    if system.startswith("edgeseq"):
        import onnxruntime  # noqa: F401

        import edgeseq  # noqa: F401
    elif system == "hf":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    elif system == "llamacpp":
        import llama_cpp  # noqa: F401
    res["rss_after_imports"] = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    r = make_runner("edgeseq" if long else system, model_dir)
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load"] = proc_status()["VmRSS"]
    for k in ("weights_bytes", "state_bytes"):
        if hasattr(r, k):
            res[k] = getattr(r, k)

    if long:
        r.reset()
        tok = r.prefill(prompt_ids(PROMPT_SHORT, 1))
        marks = {}
        t0 = time.perf_counter()
        for i in range(1, LONG_MARKS[-1] + 1):
            tok = r.step(tok)
            if i in LONG_MARKS:
                marks[i] = {**proc_status(), "t": time.perf_counter() - t0}
        res["marks"] = marks
        res["decode_tps"] = LONG_MARKS[-1] / marks[LONG_MARKS[-1]]["t"]
        res.update(proc_status())
        return res

    long_prompt = prompt_ids(PROMPT_LONG, 0)
    r.reset()
    r.prefill(long_prompt)  # warm-up
    r.reset()
    t0 = time.perf_counter()
    r.prefill(long_prompt)
    res["prefill_s"] = time.perf_counter() - t0
    res["prefill_tps"] = PROMPT_LONG / res["prefill_s"]

    r.reset()
    tok = r.prefill(prompt_ids(PROMPT_SHORT, 1))
    for _ in range(WARM_STEPS):
        tok = r.step(tok)
    toks = []
    t0 = time.perf_counter()
    for _ in range(DECODE):
        tok = r.step(tok)
        toks.append(tok)
    res["decode_s"] = time.perf_counter() - t0
    res["decode_tps"] = DECODE / res["decode_s"]
    res["distinct_tokens"] = len(set(toks))
    res.update(proc_status())
    return res


# ---------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------
def run_worker(system: str, model_dir: str, timeout: int = 900) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, model_dir]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{system} on {model_dir} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import llama_cpp
    import onnxruntime
    import torch
    import transformers

    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": llama_cpp.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def med(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else float("nan")


MIB = 2 ** 20


def report(results: dict, info: dict) -> str:
    L = []
    L.append(f"Machine: {info['nproc']} CPUs, {info['cpu']}; {THREADS} threads; python {info['python']}, "
             f"onnxruntime {info['onnxruntime']}, torch {info['torch']}, transformers {info['transformers']}, "
             f"llama-cpp-python {info['llama_cpp_python']}; {info['date']}")
    L.append("")
    for model, by_sys in results["runs"].items():
        L.append(f"### {model} (fp32, medians of {results['rounds']} interleaved rounds; [min-max])")
        L.append("")
        L.append("| system | decode tok/s | prefill 512 tok/s | peak RSS MiB | RSS after imports MiB | load s |")
        L.append("|---|---|---|---|---|---|")
        for system, runs in by_sys.items():
            d = [r["decode_tps"] for r in runs]
            p = [r["prefill_tps"] for r in runs]
            L.append(f"| {system} | {med(runs, 'decode_tps'):.1f} [{min(d):.1f}-{max(d):.1f}] | "
                     f"{med(runs, 'prefill_tps'):.0f} [{min(p):.0f}-{max(p):.0f}] | {med(runs, 'VmHWM') / MIB:.0f} | "
                     f"{med(runs, 'rss_after_imports') / MIB:.0f} | {med(runs, 'load_s'):.2f} |")
        L.append("")
        es, lc, hf = by_sys.get("edgeseq"), by_sys.get("llamacpp"), by_sys.get("hf")
        if es and lc and hf:
            L.append("| ratio | decode | prefill 512 | peak RSS |")
            L.append("|---|---|---|---|")
            for name, other in (("edgeseq / llama.cpp", lc), ("edgeseq / HF", hf)):
                L.append(f"| {name} | {med(es, 'decode_tps') / med(other, 'decode_tps'):.2f}x | "
                         f"{med(es, 'prefill_tps') / med(other, 'prefill_tps'):.2f}x | "
                         f"{med(es, 'VmHWM') / med(other, 'VmHWM'):.2f}x |")
            L.append("")
        lr = results["long"].get(model)
        if lr:
            m = lr["marks"]
            r256, r4096 = m[str(LONG_MARKS[0])]["VmRSS"], m[str(LONG_MARKS[-1])]["VmRSS"]
            wb = lr["weights_bytes"]
            L.append(f"edgeseq memory ({LONG_MARKS[-1]} greedy steps after a {PROMPT_SHORT}-token prompt, "
                     f"{lr['decode_tps']:.1f} tok/s over the run): VmRSS after "
                     + ", ".join(f"{k}: {m[str(k)]['VmRSS'] / MIB:.1f} MiB" for k in LONG_MARKS)
                     + f"; 4096 vs 256: {100 * (r4096 - r256) / r256:+.2f} %. "
                     f"Weights {wb / MIB:.1f} MiB, state {lr['state_bytes'] / 1024:.0f} KiB; "
                     f"RSS after 4096 / weights = {r4096 / wb:.2f}x; "
                     f"(RSS after 4096 - RSS after imports) / weights = {(r4096 - lr['rss_after_imports']) / wb:.2f}x; "
                     f"peak RSS of the run / weights = {lr['VmHWM'] / wb:.2f}x. "
                     f"Peak RSS of the bench worker (incl. 512-token prefill) / weights = "
                     f"{med(by_sys['edgeseq'], 'VmHWM') / wb:.2f}x.")
            L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/edgeseq-bench", help="the folder make_models.py wrote")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--systems", nargs="*", default=SYSTEMS, choices=SYSTEMS)
    ap.add_argument("--no-long", action="store_true", help="skip the 4096-token memory run")
    ap.add_argument("--json", default=None, help="also write every raw result here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.root)), flush=True)
        return

    info = machine()
    results = {"rounds": args.rounds, "machine": info, "runs": {m: {s: [] for s in args.systems} for m in args.models},
               "long": {}}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        order = args.systems[rnd % len(args.systems):] + args.systems[:rnd % len(args.systems)]
        for model in args.models:
            for system in order:
                r = run_worker(system, os.path.join(args.root, model))
                results["runs"][model][system].append(r)
                print(f"[{time.perf_counter() - t_start:6.0f}s] round {rnd + 1} {model:12s} {system:17s} "
                      f"decode {r['decode_tps']:7.1f} tok/s  prefill {r['prefill_tps']:7.1f} tok/s  "
                      f"peak RSS {r['VmHWM'] / MIB:6.0f} MiB  distinct tokens {r['distinct_tokens']}",
                      file=sys.stderr, flush=True)
    if not args.no_long:
        for model in args.models:
            r = run_worker("edgeseq-long", os.path.join(args.root, model))
            r["marks"] = {str(k): v for k, v in r["marks"].items()}
            results["long"][model] = r
            print(f"[{time.perf_counter() - t_start:6.0f}s] long {model}: "
                  + ", ".join(f"{k}: {v['VmRSS'] / MIB:.1f} MiB" for k, v in r["marks"].items()),
                  file=sys.stderr, flush=True)
    results["total_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(report(results, info))


if __name__ == "__main__":
    main()
