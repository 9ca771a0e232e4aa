"""Desktop CUDA (issue 21): edgeseq on ONNX Runtime's CUDA provider, per bundle flavour (f32, f16, int8,
int4; f16c and bf16c: bundles that compute in half, `--compute`), on one GPU: greedy tokens and logits against the CPU provider's f32, single-stream decode (the
prefill graph decoding; the step graph under CUDA graphs), a 512-token prefill, batched decode of the step
graph at several rows, GPU memory, and (--profile) the CUDA kernels each token launches.

    python benchmarks/cuda_bench.py WORK [--models mamba-130m mamba2-130m rwkv7-0.1b] [--quants f32 int8 int4 f16c]
        [--rounds 5] [--tokens 256] [--prefill 512] [--batch 1 8 64 256] [--profile] [--hf] [--json FILE]
    python benchmarks/cuda_bench.py WORK --dry-run   # a CPU machine: the tiny shapes, CPU sessions standing
                                                     # in for CUDA (checks the script)

Why this is not a `bench.py` system: the GPU host has no package index and no installed edgeseq (when
`import edgeseq` fails the script runs itself again with the checkout laid out as the package on
PYTHONPATH: harness.checkout), and a fresh process per measurement would time CUDA's start-up, so the
systems share one process and interleave round by round, the order rotating. The models are the harness's
registry (harness.models: random weights at the real shapes), built under WORK; bundles are
WORK/<model>/bundle-<quant> (benchmarks/cuda/prep.py makes them; exported here when missing).

    ort-cuda        edgeseq.load(bundle, device="cuda"): the prefill graph decodes, the state bound on the GPU
    ort-cuda-graph  edgeseq.load(bundle, device="cuda", cuda_graph=True): the step graph under CUDA graphs
    hf-eager        (--hf, f32 only) the HF checkpoint on the GPU, fp32, generate() with its cache

The check: a 16-token prompt and 32 greedy tokens on the CPU provider and on each system, the same
bundle: max logit difference over the tokens before the first parting; and the first logits against the
CPU's f32 bundle (the flavour's own error). Free-running greedy decoding of a random
model can part at a near-tie, so a parting is reported, not fatal. Timing per round: --tokens greedy
steps after 8 warm-up steps (CUDA graphs capture both parities then), and a --prefill-token prompt from a
fresh state.

Batched (--batch): the step graph on B rows, state, token ids and logits bound once to GPU buffers
(ping-pong, as edgeseq.serve's BatchRows does on the host), with and without CUDA graphs (one graph per
B and parity); aggregate tok/s = B x steps / time; the logits stay on the GPU (sampling not timed; the
next token ids are copied in each step). Memory: NVML's used bytes on the device after the model's
sessions are made and after the rows are allocated, beside the bundle's weight bytes and the state bytes
per row. --profile: torch.profiler (CUPTI) over decode steps of the step graph without CUDA graphs (and
with): kernels per token, GPU time per token, by kernel name; and ONNX Runtime's own profile of the same
steps: nodes per token, time by operator type and provider.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT, CHECK_TOKENS = 16, 32
HALF_COMPUTE = {"f16c": "f16", "bf16c": "bf16"}  # --quants names of the bundles that compute in half
if HERE not in sys.path:  # harness (python -P, or run from elsewhere)
    sys.path.insert(0, HERE)


def ensure_edgeseq() -> None:
    try:
        import edgeseq  # noqa: F401
    except ModuleNotFoundError:
        from harness.checkout import package_tree
        from harness.proc import log

        tree = package_tree(os.path.dirname(HERE), tempfile.mkdtemp(prefix="edgeseq-pkg-"), link=True)
        log(f"edgeseq is not installed: running again with the checkout laid out in {tree}")
        path = os.pathsep.join(p for p in (tree, HERE, os.environ.get("PYTHONPATH")) if p)
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, PYTHONPATH=path))


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class Edgeseq:
    def __init__(self, bundle: str, device: str, cuda_graph: bool, dry: bool, threads: int | None = None):
        import edgeseq

        if device == "cpu":
            self.model = edgeseq.load(bundle, threads=threads)
        elif dry:  # the CPU stands in; cuda_graph -> the same fixed-IO step path
            self.model = edgeseq.load(bundle)
            if cuda_graph:
                self.model.engine.fixed_io, self.model.engine.decode_graph = True, "step"
        else:
            self.model = edgeseq.load(bundle, device=device, cuda_graph=cuda_graph)
        self.session = self.model.session()

    def greedy(self, prompt: list[int], n: int):
        import numpy as np

        s = self.session
        s.reset()
        logits = s.prefill(prompt)
        toks, all_logits = [], []
        for _ in range(n):
            all_logits.append(logits)
            toks.append(int(np.argmax(logits)))
            logits = s.step(toks[-1])
        return toks, np.stack(all_logits)

    def speed(self, prompt: list[int], long: list[int], n: int) -> tuple[float, float]:
        import numpy as np

        s = self.session
        s.reset()
        tok = int(np.argmax(s.prefill(prompt)))
        for _ in range(8):
            tok = int(np.argmax(s.step(tok)))
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(s.step(tok)))
        dec = n / (time.perf_counter() - t0)
        s.reset()
        t0 = time.perf_counter()
        np.asarray(s.prefill(long))
        return dec, len(long) / (time.perf_counter() - t0)


class HfEager:
    def __init__(self, ckpt: str, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.device = torch, device
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()

    def _gen(self, prompt, n: int):
        torch = self.torch
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt], device=self.device), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, use_cache=True, pad_token_id=0)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out[0, len(prompt):].tolist(), time.perf_counter() - t0

    def greedy(self, prompt, n: int):
        return self._gen(prompt, n)[0], None

    def speed(self, prompt, long, n: int) -> tuple[float, float]:
        torch = self.torch
        self._gen(prompt, 4)  # warm-up
        dec = (n - 1) / (self._gen(prompt, n)[1] - self._gen(prompt, 1)[1])
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(torch.tensor([long], device=self.device), use_cache=True, logits_to_keep=1)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return dec, len(long) / (time.perf_counter() - t0)


class DeviceRows:
    """B rows of the step graph with every input and output bound once to device buffers (ping-pong)."""

    def __init__(self, model, sess, rows: int, dev: str, graph: bool):
        import numpy as np

        ort = model.engine.ort
        self.sess, self.rows, self.cur = sess, rows, 0
        spec, init = model.state_spec, model.initial_state()
        self.bufs = [[ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.repeat(init[s.input_name], rows, 0)),
                                                       dev, 0) for s in spec] for _ in (0, 1)]
        self.ids_host = np.zeros((rows, 1), np.int64)
        self.ids = ort.OrtValue.ortvalue_from_numpy(self.ids_host, dev, 0)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type((rows, model.vocab_size), np.float32, dev, 0)
        self.io, self.ro = [], []
        ids = model.engine.new_graph_ids(2) if graph else (None, None)
        for c, gid in zip((0, 1), ids):
            io = sess.io_binding()
            io.bind_ortvalue_input("input_ids", self.ids)
            for s, src, dst in zip(spec, self.bufs[c], self.bufs[1 - c]):
                io.bind_ortvalue_input(s.input_name, src)
                io.bind_ortvalue_output(s.output_name, dst)
            io.bind_ortvalue_output("logits", self.logits)
            self.io.append(io)
            ro = None
            if gid is not None:
                ro = ort.RunOptions()
                ro.add_run_config_entry("gpu_graph_id", str(gid))
            self.ro.append(ro)

    def step(self, toks) -> None:
        self.ids_host[:, 0] = toks
        self.ids.update_inplace(self.ids_host)
        self.sess.run_with_iobinding(self.io[self.cur], self.ro[self.cur])
        self.cur ^= 1

    def time(self, tokens, steps: int) -> float:
        """Aggregate tok/s over `steps` steps (after 4 warm-up steps: capture of both parities)."""
        for i in range(4):
            self.step(tokens[i % len(tokens)])
        self.io[self.cur].synchronize_outputs()
        t0 = time.perf_counter()
        for i in range(steps):
            self.step(tokens[i % len(tokens)])
        self.io[self.cur].synchronize_outputs()
        return self.rows * steps / (time.perf_counter() - t0)


def gpu_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # no NVML (a CPU machine): memory is not reported
        return None


def state_bytes(model) -> int:
    import numpy as np

    return int(sum(4 * int(np.prod(s.shape)) for s in model.state_spec))


def weight_bytes(bundle: str) -> int:
    return sum(os.path.getsize(os.path.join(bundle, f)) for f in os.listdir(bundle)
               if f.endswith(".bin") or f.endswith(".data"))


def batched(model, dev: str, rows_list: list[int], steps: int, vocab: int, graph_sess, plain_sess) -> dict:
    """Aggregate decode tok/s at each row count, with (graph_sess) and without CUDA graphs."""
    import numpy as np

    out = {}
    rng = np.random.default_rng(1)
    for rows in rows_list:
        toks = rng.integers(0, vocab, (8, rows))
        r = {}
        for label, sess, graph in (("plain", plain_sess, False), ("graph", graph_sess, graph_sess is not plain_sess)):
            before = gpu_used()
            dr = DeviceRows(model, sess, rows, dev, graph)
            try:
                r[label] = dr.time(toks, steps if rows < 64 else max(8, steps // 2))
            except Exception as e:  # a row count the provider cannot run: reported, the others go on
                r[label] = None
                r[label + "_error"] = str(e).splitlines()[0][:300]
            after = gpu_used()
            if before is not None:
                r[label + "_gpu_delta"] = after - before
            del dr
        out[rows] = r
        log(f"  batch {rows}:", {k: (round(v) if isinstance(v, float) else v) for k, v in r.items()})
    return out


def chrome_kernels(path: str, tokens: int) -> dict:
    """Kernels in a torch.profiler chrome trace: count and GPU time per token, by name."""
    with open(path) as f:
        ev = json.load(f)
    ev = ev.get("traceEvents", ev)
    by = collections.defaultdict(lambda: [0, 0.0])
    cats = collections.Counter()
    for e in ev:
        cat = e.get("cat", "")
        if e.get("ph") != "X":
            continue
        cats[cat] += 1
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            k = by[(cat, e.get("name", "?"))]
            k[0] += 1
            k[1] += float(e.get("dur", 0.0))
    rows = sorted(((c, n, k[0] / tokens, k[1] / tokens) for (c, n), k in by.items()), key=lambda x: -x[3])
    kern = [r for r in rows if r[0] == "kernel"]
    return {"kernels_per_token": sum(r[2] for r in kern), "kernel_us_per_token": sum(r[3] for r in kern),
            "memcpy_per_token": sum(r[2] for r in rows if r[0] == "gpu_memcpy"),
            "memcpy_us_per_token": sum(r[3] for r in rows if r[0] == "gpu_memcpy"),
            "categories": dict(cats), "top": [{"cat": c, "name": n[:160], "per_token": cnt, "us_per_token": us}
                                              for c, n, cnt, us in rows[:40]]}


def ort_profile(model, path: str, dev: str, tokens: int, workdir: str) -> dict:
    """ONNX Runtime's profile of `tokens` steps of the step graph (own session, no CUDA graphs)."""
    ort = model.engine.ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(workdir, "ortprof")
    sess = ort.InferenceSession(path, so, providers=model.engine.providers)
    dr = DeviceRows(model, sess, 1, dev, False)
    for i in range(4):
        dr.step([i + 1])
    dr.io[dr.cur].synchronize_outputs()
    t0 = time.perf_counter()
    for i in range(tokens):
        dr.step([i + 1])
    dr.io[dr.cur].synchronize_outputs()
    wall = (time.perf_counter() - t0) / tokens
    prof = sess.end_profiling()
    with open(prof) as f:
        ev = json.load(f)
    runs = [e for e in ev if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in ev if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    n_runs = max(1, len(runs))
    by_op = collections.defaultdict(lambda: [0, 0.0])
    by_node = collections.defaultdict(lambda: [0, 0.0, "", ""])
    prov = collections.Counter()
    for e in nodes:
        a = e.get("args", {})
        op, p = a.get("op_name", "?"), a.get("provider", "?")
        by_op[(op, p)][0] += 1
        by_op[(op, p)][1] += float(e.get("dur", 0))
        k = by_node[e["name"][:-len("_kernel_time")]]
        k[0] += 1
        k[1] += float(e.get("dur", 0))
        k[2], k[3] = op, p
        prov[p] += 1
    return {"runs": n_runs, "wall_us_per_token_profiled": wall * 1e6,
            "nodes_per_token": len(nodes) / n_runs, "providers_per_token": {k: v / n_runs for k, v in prov.items()},
            "node_us_per_token": sum(float(e.get("dur", 0)) for e in nodes) / n_runs,
            "by_op": sorted([{"op": o, "provider": p, "per_token": c / n_runs, "us_per_token": us / n_runs}
                             for (o, p), (c, us) in by_op.items()], key=lambda r: -r["us_per_token"]),
            "top_nodes": sorted([{"node": n, "op": k[2], "provider": k[3], "us_per_token": k[1] / n_runs}
                                 for n, k in by_node.items()], key=lambda r: -r["us_per_token"])[:25]}


def kernel_profile(model, graph_sess, plain_sess, dev: str, tokens: int, workdir: str, dry: bool) -> dict:
    out = {}
    path = os.path.join(model.path, model.manifest["graphs"]["step"]["file"])
    try:
        out["ort"] = ort_profile(model, path, dev, tokens, workdir)
    except Exception as e:
        out["ort_error"] = repr(e)[:300]
    if dry:
        return out
    import torch
    from torch.profiler import ProfilerActivity, profile

    for label, sess, graph in (("plain", plain_sess, False), ("graph", graph_sess, True)):
        try:
            dr = DeviceRows(model, sess, 1, dev, graph)
            for i in range(6):
                dr.step([i + 1])
            dr.io[dr.cur].synchronize_outputs()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for i in range(tokens):
                    dr.step([i + 1])
                dr.io[dr.cur].synchronize_outputs()
                torch.cuda.synchronize()
            trace = os.path.join(workdir, f"trace-{label}.json")
            prof.export_chrome_trace(trace)
            out[label] = chrome_kernels(trace, tokens)
            del dr
        except Exception as e:
            out[label + "_error"] = repr(e)[:300]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="working directory (models and bundles are kept for reruns)")
    ap.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m", "rwkv7-0.1b"])
    ap.add_argument("--quants", nargs="+", default=["f32", "int8", "int4", "f16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256, help="timed decode tokens per run")
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill")
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 8, 64, 256], help="rows of the batched decode")
    ap.add_argument("--batch-steps", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="kernels and nodes per token (f32 and int4)")
    ap.add_argument("--profile-tokens", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=None,
                    help="int8/int4 bundles with this MatMulNBits accuracy_level (0: f32 activations on the CPU, "
                         "the arithmetic of the CUDA kernels; the export's default 4 uses int8 activations on the "
                         "CPU, so the CPU reference then differs from CUDA by more than rounding)")
    ap.add_argument("--hf", action="store_true", help="also HF transformers eager (f32 only)")
    ap.add_argument("--cpu-threads", type=int, default=None, help="threads of the CPU reference")
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny shapes: checks that the script runs")
    ap.add_argument("--json", help="write the raw figures here (rewritten after each model and flavour)")
    a = ap.parse_args()
    ensure_edgeseq()
    import numpy as np
    import onnxruntime as ort

    import edgeseq
    from edgeseq.exporters.export import export
    from harness.models import build

    dev = "cpu" if a.dry_run else "cuda"
    info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "edgeseq": edgeseq.__file__,
            "dry_run": a.dry_run, "argv": sys.argv[1:]}
    if not a.dry_run:
        import torch

        info.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0))
        torch.zeros(1, device="cuda")  # torch's CUDA context first: NVML deltas below are ONNX Runtime's
    log(info)
    results: dict = {"info": info, "models": {}}

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)

    for name in a.models:
        if a.dry_run:
            name = name.split("-")[0] + "-tiny"
        b = build(name, a.out)

        def bundle_of(q: str) -> str:
            al = a.accuracy_level if q in ("int8", "int4") else None
            d = os.path.join(a.out, name, f"bundle-{q}" + ("" if al is None else f"-al{al}"))
            if not os.path.isfile(os.path.join(d, "edgeseq.json")):
                log(f"exporting {d}")
                compute = HALF_COMPUTE.get(q, "f32")
                export(b["checkpoint"], d, quant=q if compute == "f32" else compute, tokenizer=b["tokenizer"],
                       force=True, compute=compute, **({} if al is None else {"accuracy_level": al}))
            return d

        rng = np.random.default_rng(0)
        prompt = rng.integers(0, b["vocab"], PROMPT).tolist()
        long = rng.integers(0, b["vocab"], a.prefill).tolist()
        cpu = Edgeseq(bundle_of("f32"), "cpu", False, a.dry_run, a.cpu_threads)
        cpu_toks, cpu_logits = cpu.greedy(prompt, CHECK_TOKENS)
        del cpu
        mres = results["models"][name] = {"logit_scale": float(np.abs(cpu_logits).max()), "quants": {}}
        for q in a.quants:
            bundle = bundle_of(q)
            gc.collect()
            base = gpu_used()
            systems = {"ort-cuda": Edgeseq(bundle, "cuda", False, a.dry_run),
                       "ort-cuda-graph": Edgeseq(bundle, "cuda", True, a.dry_run)}
            if a.hf and q == "f32" and b["source"] == "hf":
                systems["hf-eager"] = HfEager(b["checkpoint"], dev)
            r: dict = {"bundle": bundle, "weight_bytes": weight_bytes(bundle),
                       "state_bytes_per_row": state_bytes(systems["ort-cuda"].model)}
            if not a.dry_run:
                step = systems["ort-cuda-graph"].model.engine.session("step")
                r["step_cuda_graph_option"] = step.get_provider_options().get(
                    "CUDAExecutionProvider", {}).get("enable_cuda_graph")
            # the same bundle on the CPU provider is the reference; the f32 bundle's first logits give the
            # flavour's own error
            if q in HALF_COMPUTE:  # half compute: against the f32 bundle on the CPU (no bf16 CPU kernels)
                ref_toks, ref_logits = cpu_toks, cpu_logits
            else:
                qcpu = Edgeseq(bundle, "cpu", False, a.dry_run, a.cpu_threads)
                ref_toks, ref_logits = qcpu.greedy(prompt, CHECK_TOKENS)
                del qcpu
            check = {"cpu": {"first_logit_diff_vs_f32": float(np.abs(ref_logits[0] - cpu_logits[0]).max())}}
            for sname, sysobj in systems.items():
                toks, logits = sysobj.greedy(prompt, CHECK_TOKENS)
                parted = next((i for i, (x, y) in enumerate(zip(toks, ref_toks)) if x != y), None)
                upto = parted if parted is not None else CHECK_TOKENS
                check[sname] = {"tokens_equal": parted is None, "parted_at": parted,
                                "max_logit_diff": None if logits is None or upto == 0 else float(np.abs(
                                    logits[:upto] - ref_logits[:upto]).max()),
                                "first_logit_diff_vs_f32": None if logits is None else float(np.abs(
                                    logits[0] - cpu_logits[0]).max())}
                log(name, q, sname, check[sname])
            r["check"] = check
            used = gpu_used()
            r["gpu_used_after_load"] = None if base is None else used - base
            runs: dict = {s: {"decode": [], "prefill": []} for s in systems}
            order = list(systems)
            for i in range(a.rounds):
                for sname in order[i % len(order):] + order[:i % len(order)]:
                    d, p = systems[sname].speed(prompt, long, a.tokens)
                    runs[sname]["decode"].append(d)
                    runs[sname]["prefill"].append(p)
                log(name, q, f"round {i + 1}:", {s: (round(v["decode"][-1], 1), round(v["prefill"][-1]))
                                                 for s, v in runs.items()})
            r["runs"] = runs
            model_g = systems["ort-cuda-graph"].model
            graph_sess = model_g.engine.session("step")
            if a.dry_run:
                plain_sess = graph_sess
            else:  # the step graph without capture: its own session (CUDA graphs are a session option)
                plain = edgeseq.load(bundle, device="cuda")
                plain.engine.decode_graph = "step"
                plain_sess = plain.engine.session("step")
            if a.batch:
                r["batch"] = batched(model_g, dev, a.batch, a.batch_steps, b["vocab"], graph_sess, plain_sess)
                used = gpu_used()
                r["gpu_used_after_batch"] = None if base is None else used - base
            if a.profile and q in ("f32", "int4", "f16", *HALF_COMPUTE):
                wd = os.path.join(a.out, name, f"prof-{q}")
                os.makedirs(wd, exist_ok=True)
                r["profile"] = kernel_profile(model_g, graph_sess, plain_sess, dev, a.profile_tokens, wd, a.dry_run)
                pr = r["profile"]
                log(name, q, "profile:", {k: (round(v.get("kernels_per_token", v.get("nodes_per_token", 0)), 1)
                                              if isinstance(v, dict) else v) for k, v in pr.items()})
            mres["quants"][q] = r
            del systems, model_g, graph_sess, plain_sess
            if not a.dry_run:
                del plain
            save()
    save()
    report(results, a)


def report(results: dict, a) -> None:
    info = results["info"]
    print(f"\nedgeseq {info['edgeseq']}, onnxruntime {info['onnxruntime']}"
          + (f", torch {info.get('torch')}, {info.get('gpu')}" if not info["dry_run"] else " (DRY RUN: CPU, tiny shapes)")
          + f"; {a.tokens} decode tokens, a {a.prefill}-token prefill; medians [min-max] of {a.rounds} "
            "interleaved rounds\n")
    print("| model | bundle | system | greedy = CPU (same bundle) | max logit diff | first logits vs CPU f32 | "
          "decode tok/s | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in results["models"].items():
        for q, r in m["quants"].items():
            for s, v in r["runs"].items():
                c = r["check"][s]
                same = "yes" if c["tokens_equal"] else f"parts at {c['parted_at']}"
                diff = "-" if c["max_logit_diff"] is None else f"{c['max_logit_diff']:.1e}"
                d32 = "-" if c["first_logit_diff_vs_f32"] is None else f"{c['first_logit_diff_vs_f32']:.1e}"
                d, p = v["decode"], v["prefill"]
                print(f"| {name} | {q} | {s} | {same} | {diff} | {d32} | {statistics.median(d):.1f} [{min(d):.1f}-{max(d):.1f}]"
                      f" | {statistics.median(p):.0f} [{min(p):.0f}-{max(p):.0f}] |")
    if any("batch" in r for m in results["models"].values() for r in m["quants"].values()):
        print("\n| model | bundle | rows | aggregate tok/s, plain | with CUDA graphs | x rows=1 (graphs) |")
        print("|---|---|---|---|---|---|")
        for name, m in results["models"].items():
            for q, r in m["quants"].items():
                one = (r.get("batch", {}).get(1) or {}).get("graph")
                for rows, v in r.get("batch", {}).items():
                    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
                    ratio = f"{v['graph'] / one:.1f}x" if v.get("graph") and one else "-"
                    print(f"| {name} | {q} | {rows} | {f(v.get('plain'))} | {f(v.get('graph'))} | {ratio} |")
    print("\n| model | bundle | weights MB | state KB/row | GPU MB after load | GPU MB after batches |")
    print("|---|---|---|---|---|---|")
    for name, m in results["models"].items():
        for q, r in m["quants"].items():
            g = lambda k: "-" if r.get(k) is None else f"{r[k] / 2**20:.0f}"  # noqa: E731
            print(f"| {name} | {q} | {r['weight_bytes'] / 2**20:.0f} | {r['state_bytes_per_row'] / 1024:.0f} | "
                  f"{g('gpu_used_after_load')} | {g('gpu_used_after_batch')} |")
    for name, m in results["models"].items():
        for q, r in m["quants"].items():
            p = r.get("profile")
            if not p:
                continue
            o = p.get("ort", {})
            line = (f"\n{name} {q}: ORT nodes/token {o.get('nodes_per_token', '-')}, providers "
                    f"{o.get('providers_per_token')}, node time {o.get('node_us_per_token', 0):.0f} us/token")
            for lab in ("plain", "graph"):
                k = p.get(lab)
                if k:
                    line += (f"; {lab}: {k['kernels_per_token']:.0f} kernels/token, {k['kernel_us_per_token']:.0f} us "
                             f"GPU/token, {k['memcpy_per_token']:.1f} memcpy/token")
                elif p.get(lab + "_error"):
                    line += f"; {lab}: {p[lab + '_error']}"
            print(line)
            for row in o.get("by_op", [])[:12]:
                print(f"    {row['op']:<28} {row['provider']:<24} {row['per_token']:6.1f}/token "
                      f"{row['us_per_token']:9.1f} us/token")


if __name__ == "__main__":
    main()
