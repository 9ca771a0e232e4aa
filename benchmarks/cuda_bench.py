"""Desktop CUDA: edgeseq on ONNX Runtime's CUDA provider (IO binding; with and without CUDA graphs) beside
HF transformers eager on the GPU, on one GPU: greedy tokens and logits against the CPU provider, then
decode and prefill speed.

    python benchmarks/cuda_bench.py OUT_DIR [--models mamba-130m mamba2-130m rwkv7-0.1b] [--rounds 5] \\
        [--tokens 256] [--prefill 512] [--json FILE]
    python benchmarks/cuda_bench.py OUT_DIR --dry-run   # a CPU machine: the tiny shapes, CPU sessions
                                                        # standing in for CUDA (checks the script)

Why this is not a `bench.py` system: the GPU host has no package index and no installed edgeseq (when
`import edgeseq` fails the script runs itself again with the checkout laid out as the package on
PYTHONPATH: harness.checkout), and a fresh process per measurement would time CUDA's start-up, so the
systems share one process and interleave round by round, the order rotating. The models are the harness's
registry (harness.models: random weights at the real shapes), built under OUT_DIR.

    ort-cuda        edgeseq.load(bundle, device="cuda"): the prefill graph decodes, the state bound on the GPU
    ort-cuda-graph  edgeseq.load(bundle, device="cuda", cuda_graph=True): the step graph under CUDA graphs
    hf-eager        the HF checkpoint on the GPU, fp32, generate() with its cache (not for .pth models);
                    decode tok/s = (N - 1) / (time of N new tokens - time of 1 new token)

The check: a 16-token prompt and 32 greedy tokens on the CPU provider and on each system; the tokens
should be equal and the logits close (edgeseq turns TF32 off for f32 bundles). Free-running greedy
decoding of a random model can part at a near-tie (two top logits within the rounding), so a
difference there is reported, not fatal. Timing per round: --tokens greedy steps after 8 warm-up steps
(CUDA graphs capture both parities then), and a --prefill-token prompt from a fresh state.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT, CHECK_TOKENS = 16, 32


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="working directory (models and bundles are kept for reruns)")
    ap.add_argument("--models", nargs="+", default=["mamba-130m", "mamba2-130m", "rwkv7-0.1b"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256, help="timed decode tokens per run")
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill")
    ap.add_argument("--cpu-threads", type=int, default=None, help="threads of the CPU reference")
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny shapes: checks that the script runs")
    ap.add_argument("--json", help="write the raw figures here")
    a = ap.parse_args()
    ensure_edgeseq()
    import numpy as np
    import onnxruntime as ort

    import edgeseq
    from edgeseq.exporters.export import export
    from harness.models import build
    from harness.proc import log

    dev = "cpu" if a.dry_run else "cuda"
    info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "edgeseq": edgeseq.__file__,
            "dry_run": a.dry_run}
    if not a.dry_run:
        import torch

        info.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0))
    log(info)
    results: dict = {"info": info, "models": {}}
    for name in a.models:
        if a.dry_run:
            name = name.split("-")[0] + "-tiny"
        b = build(name, a.out)
        bundle = os.path.join(a.out, name, "bundle")
        export(b["checkpoint"], bundle, tokenizer=b["tokenizer"], force=True)
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, b["vocab"], PROMPT).tolist()
        long = rng.integers(0, b["vocab"], a.prefill).tolist()
        systems = {"ort-cuda": Edgeseq(bundle, "cuda", False, a.dry_run),
                   "ort-cuda-graph": Edgeseq(bundle, "cuda", True, a.dry_run)}
        if b["source"] == "hf":
            systems["hf-eager"] = HfEager(b["checkpoint"], dev)
        if not a.dry_run:  # whether ONNX Runtime kept CUDA graphs on for the step session
            step = systems["ort-cuda-graph"].model.engine.session("step")
            info[f"{name}.step_provider_options"] = step.get_provider_options().get("CUDAExecutionProvider", {}).get(
                "enable_cuda_graph")
        cpu = Edgeseq(bundle, "cpu", False, a.dry_run, a.cpu_threads)
        cpu_toks, cpu_logits = cpu.greedy(prompt, CHECK_TOKENS)
        systems["cpu"] = cpu
        check = {}
        for sname, sysobj in systems.items():
            toks, logits = sysobj.greedy(prompt, CHECK_TOKENS)
            parted = next((i for i, (x, y) in enumerate(zip(toks, cpu_toks)) if x != y), None)
            check[sname] = {"tokens_equal": parted is None, "parted_at": parted,
                            "max_logit_diff": None if logits is None else float(np.abs(
                                logits[:parted] - cpu_logits[:parted]).max())}
            log(name, sname, check[sname])
        runs: dict = {s: {"decode": [], "prefill": []} for s in systems}
        order = list(systems)
        for r in range(a.rounds):
            for sname in order[r % len(order):] + order[:r % len(order)]:
                d, p = systems[sname].speed(prompt, long, a.tokens)
                runs[sname]["decode"].append(d)
                runs[sname]["prefill"].append(p)
            log(name, f"round {r + 1}:", {s: (round(v["decode"][-1], 1), round(v["prefill"][-1])) for s, v in runs.items()})
        results["models"][name] = {"check": check, "runs": runs, "logit_scale": float(np.abs(cpu_logits).max())}
        del systems
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nedgeseq {info['edgeseq']}, onnxruntime {info['onnxruntime']}"
          + (f", torch {info.get('torch')}, {info.get('gpu')}" if not a.dry_run else " (DRY RUN: CPU, tiny shapes)")
          + f"; fp32; {a.tokens} decode tokens, a {a.prefill}-token prefill; medians [min–max] of {a.rounds} "
            "interleaved rounds\n")
    print("| model | system | greedy tokens = CPU | max logit diff | decode tok/s | prefill tok/s | decode vs hf-eager |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        med = {s: statistics.median(v["decode"]) for s, v in r["runs"].items()}
        for s, v in r["runs"].items():
            c = r["check"][s]
            same = "yes" if c["tokens_equal"] else f"parts at {c['parted_at']}"
            diff = "–" if c["max_logit_diff"] is None else f"{c['max_logit_diff']:.1e}"
            ratio = f"{med[s] / med['hf-eager']:.2f}×" if "hf-eager" in med else "–"
            d, p = v["decode"], v["prefill"]
            print(f"| {name} | {s} | {same} | {diff} | {statistics.median(d):.1f} [{min(d):.1f}–{max(d):.1f}] | "
                  f"{statistics.median(p):.0f} [{min(p):.0f}–{max(p):.0f}] | {ratio} |")


if __name__ == "__main__":
    main()
