"""Decode speed, prefill speed and memory: edgeseq vs llama.cpp vs HF transformers, fp32, CPU.

    python benchmarks/make_models.py /tmp/edgeseq-bench            # once: models at real shapes
    python benchmarks/bench_decode.py /tmp/edgeseq-bench --rounds 5 --json /tmp/edgeseq-bench/results.json
    python benchmarks/bench_decode.py --merge a.json b.json        # pool runs of one commit

Each measurement runs in its own subprocess (one system, one model, fresh interpreter), and the
systems are interleaved round by round (edgeseq, portable, hf, llama.cpp, edgeseq, ...; the order
rotates each round) so that machine noise hits them alike; the table quotes medians over rounds.
Decode is given two ways: 128 / total time, and 1 / median step time (robust to bursts).

The machine may be shared. Each worker records how much of the machine other processes took while
it measured ("foreign load", from /proc/stat minus its own CPU time). Before each run the parent
waits (up to 45 s) for a quiet machine; a run taken under more than 15 % foreign load is redone once
and, if still loaded, left out of the medians (every run stays in the JSON; the table says how many
counted). `--budget-min` (default 22) stops starting new rounds once spent.

A worker:  load -> warm-up prefill of 512 tokens -> reset -> timed prefill of 512 tokens -> reset ->
prefill of a 16-token prompt -> 16 warm-up steps -> 128 timed greedy steps (argmax of the logits fed
back) -> VmHWM / VmRSS from /proc/self/status and PSS from /proc/self/smaps_rollup. Peak RSS
therefore covers a 512-token prefill as well as decoding. Everything runs with 2 threads.

Systems:
    edgeseq           edgeseq.load(bundle-fused, threads=2)                   (the defaults)
    edgeseq-lowmem    edgeseq.load(bundle-fused, threads=2, low_memory=True)  (ORT prepacking off)
    edgeseq-portable  edgeseq.load(bundle-portable, threads=2)
    hf                transformers fp32 *ForCausalLM, torch.set_num_threads(2), manual cache stepping
    llamacpp          llama-cpp-python, GGUF f32 from llama.cpp's own converter, n_threads(_batch)=2,
                      Llama.eval of one token at a time, logits read with llama_get_logits_ith

By default edgeseq is pinned: HEAD is snapshotted (git archive) under /tmp/edgeseq-bench-src and the
bundles are re-exported with it, so the whole run measures one commit even if the tree changes.

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
WARM_STEPS = 16
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


def pss() -> int:
    """Proportional set size in bytes. Unlike RSS it counts a page mapped twice by this process once
    (ONNX Runtime may map the same bytes of weights.bin twice, e.g. a tied embedding and head)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_ticks() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process), to tell how much of the machine
    other processes took while we measured (the box may be shared)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    with open("/proc/self/stat") as f:
        w = f.read().rsplit(")", 1)[1].split()
    return busy, int(w[11]) + int(w[12])  # utime stime


def foreign_load(t0: tuple[int, int], t1: tuple[int, int], seconds: float) -> float:
    """Share of the machine's CPUs busy with other processes between two cpu_ticks() readings."""
    hz = os.sysconf("SC_CLK_TCK")
    other = (t1[0] - t0[0]) - (t1[1] - t0[1])
    return max(0.0, other / (hz * seconds * os.cpu_count()))


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

        import edgeseq

        res["edgeseq_file"] = edgeseq.__file__
        if os.environ.get("EDGESEQ_BENCH_COMMIT") and not edgeseq.__file__.startswith(os.environ["PYTHONPATH"]):
            raise SystemExit(f"pinned snapshot not used: edgeseq imported from {edgeseq.__file__}")
        res["edgeseq_commit"] = os.environ.get("EDGESEQ_BENCH_COMMIT", "working tree")
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
        c0 = cpu_ticks()
        t0 = time.perf_counter()
        for i in range(1, LONG_MARKS[-1] + 1):
            tok = r.step(tok)
            if i in LONG_MARKS:
                marks[i] = {**proc_status(), "Pss": pss(), "t": time.perf_counter() - t0}
        res["marks"] = marks
        res["decode_tps"] = LONG_MARKS[-1] / marks[LONG_MARKS[-1]]["t"]
        res["decode_foreign_load"] = foreign_load(c0, cpu_ticks(), marks[LONG_MARKS[-1]]["t"])
        res.update(proc_status())
        return res

    long_prompt = prompt_ids(PROMPT_LONG, 0)
    r.reset()
    r.prefill(long_prompt)  # warm-up
    r.reset()
    c0 = cpu_ticks()
    t0 = time.perf_counter()
    r.prefill(long_prompt)
    res["prefill_s"] = time.perf_counter() - t0
    res["prefill_tps"] = PROMPT_LONG / res["prefill_s"]
    res["prefill_foreign_load"] = foreign_load(c0, cpu_ticks(), res["prefill_s"])

    r.reset()
    tok = r.prefill(prompt_ids(PROMPT_SHORT, 1))
    for _ in range(WARM_STEPS):
        tok = r.step(tok)
    toks, times = [], []
    c0 = cpu_ticks()
    t0 = time.perf_counter()
    for _ in range(DECODE):
        t1 = time.perf_counter()
        tok = r.step(tok)
        times.append(time.perf_counter() - t1)
        toks.append(tok)
    res["decode_s"] = time.perf_counter() - t0
    res["decode_tps"] = DECODE / res["decode_s"]
    res["decode_tps_median_step"] = 1.0 / statistics.median(times)
    res["decode_foreign_load"] = foreign_load(c0, cpu_ticks(), res["decode_s"])
    res["distinct_tokens"] = len(set(toks))
    res.update(proc_status())
    res["Pss"] = pss()
    return res


# ---------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------
def wait_quiet(limit: float = 0.10, window: float = 1.0, max_wait: float = 45.0) -> float:
    """Wait (up to max_wait seconds) until other processes use less than `limit` of the machine over
    `window` seconds; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        a = cpu_ticks()
        time.sleep(window)
        if foreign_load(a, cpu_ticks(), window) < limit:
            break
    return time.perf_counter() - t0


PINNED: dict = {}  # set by pin(): the PYTHONPATH of a snapshot of edgeseq that every subprocess uses


def snapshot_head() -> tuple[str, str]:
    """The repository's HEAD (git archive) laid out as the installed package under
    /tmp/edgeseq-bench-src/<commit>/pkg, made once per commit: (pkg path, commit)."""
    import shutil
    import tomllib

    here = os.path.dirname(os.path.abspath(__file__))
    repo = subprocess.run(["git", "-C", here, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    dest = os.path.join("/tmp", "edgeseq-bench-src", commit[:12])
    pkg = os.path.join(dest, "pkg")
    if not os.path.isdir(pkg):
        src = os.path.join(dest, "src")
        os.makedirs(src, exist_ok=True)
        arch = subprocess.run(["git", "-C", repo, "archive", "--format=tar", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", src], input=arch.stdout, check=True)
        with open(os.path.join(src, "pyproject.toml"), "rb") as f:
            dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
        tmp = pkg + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, d in sorted(dirs.items()):  # "edgeseq" first, then its subpackages
            shutil.copytree(os.path.join(src, d), os.path.join(tmp, *name.split(".")), dirs_exist_ok=True)
        os.replace(tmp, pkg)
    return pkg, commit


def pin(root: str, models: list[str]) -> dict:
    """Snapshot the repository's HEAD (snapshot_head) and re-export the benchmark bundles with it, so that
    every run measures one commit even while the working tree changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    pkg, commit = snapshot_head()
    env = dict(os.environ, PYTHONPATH=pkg)
    cmd = [sys.executable, os.path.join(here, "make_models.py"), root, "--models", *models]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd="/tmp")
    PINNED.update(PYTHONPATH=pkg, EDGESEQ_BENCH_COMMIT=commit[:12])
    return {"commit": commit[:12], "pythonpath": pkg}


def run_worker(system: str, model_dir: str, timeout: int = 900) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", **PINNED)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, model_dir]
    waited = wait_quiet()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd="/tmp")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "waited_for_quiet_s": waited}
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

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        head += " (uncommitted changes)" if dirty else ""
    except OSError:
        head = "?"
    return {"nproc": os.cpu_count(), "cpu": model, "edgeseq_commit": head, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": llama_cpp.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


QUIET = 0.15  # a run whose foreign load exceeds this share of the machine is left out of the medians


def clean(runs, phase):
    """The runs measured while the machine was quiet for this phase (decode/prefill); all if none was."""
    ok = [r for r in runs if r.get(f"{phase}_foreign_load", 0.0) <= QUIET]
    return ok or runs


def med(runs, key):
    phase = "prefill" if key.startswith("prefill") else "decode"
    vals = [r[key] for r in clean(runs, phase) if key in r]
    return statistics.median(vals) if vals else float("nan")


MIB = 2 ** 20


def report(results: dict, info: dict) -> str:
    L = []
    L.append(f"edgeseq {info['edgeseq_commit']}. "
             f"Machine: {info['nproc']} CPUs, {info['cpu']}; {THREADS} threads; python {info['python']}, "
             f"onnxruntime {info['onnxruntime']}, torch {info['torch']}, transformers {info['transformers']}, "
             f"llama-cpp-python {info['llama_cpp_python']}; {info['date']}")
    L.append("")
    for model, by_sys in results["runs"].items():
        L.append(f"### {model} (fp32, medians of {results['rounds']} interleaved rounds; [min-max])")
        L.append("")
        L.append("| system | decode tok/s | decode tok/s, 1/median step | prefill 512 tok/s | peak RSS MiB | "
                 "PSS at end MiB | RSS after imports MiB | load s | quiet runs decode, prefill |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for system, runs in by_sys.items():
            cd, cp = clean(runs, "decode"), clean(runs, "prefill")
            d = [r["decode_tps"] for r in cd]
            dm = [r["decode_tps_median_step"] for r in cd]
            p = [r["prefill_tps"] for r in cp]
            L.append(f"| {system} | {med(runs, 'decode_tps'):.1f} [{min(d):.1f}-{max(d):.1f}] | "
                     f"{med(runs, 'decode_tps_median_step'):.1f} [{min(dm):.1f}-{max(dm):.1f}] | "
                     f"{med(runs, 'prefill_tps'):.0f} [{min(p):.0f}-{max(p):.0f}] | {med(runs, 'VmHWM') / MIB:.0f} | "
                     f"{med(runs, 'Pss') / MIB:.0f} | "
                     f"{med(runs, 'rss_after_imports') / MIB:.0f} | {med(runs, 'load_s'):.2f} | "
                     f"{len(cd)}/{len(runs)}, {len(cp)}/{len(runs)} |")
        L.append("")
        es, lc, hf = by_sys.get("edgeseq"), by_sys.get("llamacpp"), by_sys.get("hf")
        if es and lc and hf:
            L.append("| ratio | decode | decode (1/median step) | prefill 512 | peak RSS | PSS at end |")
            L.append("|---|---|---|---|---|---|")
            for name, other in (("edgeseq / llama.cpp", lc), ("edgeseq / HF", hf)):
                L.append(f"| {name} | {med(es, 'decode_tps') / med(other, 'decode_tps'):.2f}x | "
                         f"{med(es, 'decode_tps_median_step') / med(other, 'decode_tps_median_step'):.2f}x | "
                         f"{med(es, 'prefill_tps') / med(other, 'prefill_tps'):.2f}x | "
                         f"{med(es, 'VmHWM') / med(other, 'VmHWM'):.2f}x | {med(es, 'Pss') / med(other, 'Pss'):.2f}x |")
            L.append("")
        lr = results["long"].get(model)
        if lr:
            m = lr["marks"]
            r256, r4096 = m[str(LONG_MARKS[0])]["VmRSS"], m[str(LONG_MARKS[-1])]["VmRSS"]
            wb = lr["weights_bytes"]
            L.append(f"edgeseq memory ({LONG_MARKS[-1]} greedy steps after a {PROMPT_SHORT}-token prompt, "
                     f"{lr['decode_tps']:.1f} tok/s over the run, foreign load {100 * lr['decode_foreign_load']:.0f} %): VmRSS after "
                     + ", ".join(f"{k}: {m[str(k)]['VmRSS'] / MIB:.1f} MiB" for k in LONG_MARKS)
                     + f"; 4096 vs 256: {100 * (r4096 - r256) / r256:+.2f} % (anonymous memory "
                     f"{(m[str(LONG_MARKS[-1])]['RssAnon'] - m[str(LONG_MARKS[0])]['RssAnon']) / MIB:+.1f} MiB, "
                     f"file-backed {(m[str(LONG_MARKS[-1])]['RssFile'] - m[str(LONG_MARKS[0])]['RssFile']) / MIB:+.1f} MiB). "
                     f"Weights {wb / MIB:.1f} MiB, state {lr['state_bytes'] / 1024:.0f} KiB; "
                     f"RSS after 4096 / weights = {r4096 / wb:.2f}x; "
                     f"(RSS after 4096 - RSS after imports) / weights = {(r4096 - lr['rss_after_imports']) / wb:.2f}x; "
                     f"peak RSS of the run / weights = {lr['VmHWM'] / wb:.2f}x; "
                     f"PSS after 4096 = {m[str(LONG_MARKS[-1])]['Pss'] / MIB:.1f} MiB = {m[str(LONG_MARKS[-1])]['Pss'] / wb:.2f}x "
                     f"weights (PSS after 256: {m[str(LONG_MARKS[0])]['Pss'] / MIB:.1f} MiB). "
                     f"Peak RSS of the bench worker (incl. 512-token prefill) / weights = "
                     f"{med(by_sys['edgeseq'], 'VmHWM') / wb:.2f}x.")
            L.append("")
    return "\n".join(L)


def merge(paths: list[str]) -> dict:
    """Pool the rounds of several result files taken at the same edgeseq commit."""
    files = []
    for p in paths:
        with open(p) as f:
            files.append(json.load(f))
    commits = {f["machine"]["edgeseq_commit"] for f in files}
    if len(commits) != 1:
        raise SystemExit(f"refusing to pool results of different edgeseq commits: {sorted(commits)}")
    out = {"rounds": sum(f["rounds"] for f in files), "machine": dict(files[-1]["machine"]), "runs": {}, "long": {},
           "merged_from": paths}
    out["machine"]["date"] = ", ".join(f["machine"]["date"] for f in files)
    for f in files:
        for model, by_sys in f["runs"].items():
            for system, runs in by_sys.items():
                out["runs"].setdefault(model, {}).setdefault(system, []).extend(runs)
        out["long"].update(f["long"])  # the last file's long run per model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default="/tmp/edgeseq-bench", help="the folder make_models.py wrote")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--systems", nargs="*", default=SYSTEMS, choices=SYSTEMS)
    ap.add_argument("--no-long", action="store_true", help="skip the 4096-token memory run")
    ap.add_argument("--retries", type=int, default=1, help="redo a run taken under foreign load this often")
    ap.add_argument("--budget-min", type=float, default=22.0,
                    help="start no new round after this many minutes (the report covers the rounds done)")
    ap.add_argument("--json", default=None, help="also write every raw result here")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="measure the working tree as it is at each run instead of a snapshot of HEAD "
                         "(with pinning, the bundles are re-exported by the snapshot first)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no measuring: pool the runs of earlier --json files (same edgeseq commit) into one report")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.root)), flush=True)
        return
    if args.merge:
        merged = merge(args.merge)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(merged, f, indent=1)
        print(report(merged, merged["machine"]))
        return

    info = machine()
    if args.pin:
        info["pinned"] = pin(args.root, args.models)
        info["edgeseq_commit"] = info["pinned"]["commit"] + " (pinned snapshot of HEAD)"
        print(f"edgeseq pinned at {info['edgeseq_commit']}: {info['pinned']['pythonpath']}", file=sys.stderr)
    results = {"rounds": args.rounds, "machine": info, "runs": {m: {s: [] for s in args.systems} for m in args.models},
               "long": {}}
    t_start = time.perf_counter()
    deadline = t_start + 60 * args.budget_min

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    def measure(system, model):
        """One run; redone (up to --retries times) while other processes loaded the machine."""
        r = None
        for attempt in range(1 + args.retries):
            r = run_worker(system, os.path.join(args.root, model))
            r["attempt"] = attempt
            if attempt:
                results.setdefault("discarded", []).append(prev)
            loaded = r.get("decode_foreign_load", 0) > QUIET or r.get("prefill_foreign_load", 0) > QUIET
            if not loaded or time.perf_counter() > deadline:
                break
            prev = r
        return r

    if not args.no_long:  # first: the long run must finish inside the budget
        for model in args.models:
            r = measure("edgeseq-long", model)
            r["marks"] = {str(k): v for k, v in r["marks"].items()}
            results["long"][model] = r
            print(f"[{time.perf_counter() - t_start:6.0f}s] long {model}: "
                  + ", ".join(f"{k}: {v['VmRSS'] / MIB:.1f} MiB" for k, v in r["marks"].items())
                  + f"  foreign {100 * r['decode_foreign_load']:.0f}%", file=sys.stderr, flush=True)
            save()
    done_rounds = 0
    for rnd in range(args.rounds):
        if rnd and time.perf_counter() > deadline:
            print(f"time budget ({args.budget_min} min) spent: stopping after {rnd} rounds", file=sys.stderr)
            break
        order = args.systems[rnd % len(args.systems):] + args.systems[:rnd % len(args.systems)]
        for model in args.models:
            for system in order:
                r = measure(system, model)
                results["runs"][model][system].append(r)
                print(f"[{time.perf_counter() - t_start:6.0f}s] round {rnd + 1} {model:12s} {system:17s} "
                      f"decode {r['decode_tps']:7.1f} ({r['decode_tps_median_step']:7.1f}) tok/s  prefill "
                      f"{r['prefill_tps']:7.1f} tok/s  peak RSS {r['VmHWM'] / MIB:6.0f} MiB  foreign "
                      f"{100 * r['decode_foreign_load']:3.0f}%/{100 * r['prefill_foreign_load']:3.0f}%  "
                      f"distinct tokens {r['distinct_tokens']}", file=sys.stderr, flush=True)
                save()
        done_rounds = rnd + 1
    results["rounds"] = done_rounds
    results["total_s"] = time.perf_counter() - t_start
    save()
    print(report(results, info))


if __name__ == "__main__":
    main()
