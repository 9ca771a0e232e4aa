"""Desktop CUDA: greedy tokens CPU vs CUDA, and decode tokens/s of edgeseq on ONNX Runtime's CUDA provider
(IO binding; with and without CUDA graphs) beside HF transformers eager, on one GPU.

    python benchmarks/cuda_bench.py OUT_DIR [--rounds 5] [--tokens 256]
    python benchmarks/cuda_bench.py OUT_DIR --dry-run        # on a CPU machine: tiny shapes, the CUDA
                                                             # roles played by CPU sessions (checks the script)

Needs torch with CUDA, transformers and onnxruntime-gpu importable; runs from a source checkout without
installing (cuda_check.py's package mapping: the GPU host has no package index). Models, random weights
with noise at the real shapes (speed depends on the shapes, not the values):

    mamba-130m   benchmarks/make_models.py's shape (d 768, 24 layers, d_state 16, vocabulary 50,280), HF
                 checkpoint -> edgeseq bundle (fused, f32)
    rwkv7-0.1b   benchmarks/bench_rwkv.py's shape (C 768, 12 layers, head size 64, vocabulary 65,536),
                 BlinkDL .pth -> edgeseq bundle (fused, f32); transformers has no RWKV-7 class

Systems (one process, interleaved round by round; medians over rounds):

    ort-cuda        edgeseq.load(bundle, device="cuda"): the prefill graph decodes, state bound on the GPU
    ort-cuda-graph  edgeseq.load(bundle, device="cuda", cuda_graph=True): the step graph under CUDA graphs
    hf-eager        MambaForCausalLM on the GPU, fp32, generate() with its cache (Mamba only); decode
                    tok/s = (N - 1) / (time of N new tokens - time of 1 new token)

First a check: 16-token prompt, 32 greedy tokens, on the CPU provider and on each CUDA system; the tokens
must be equal (and the logits close; TF32 is off in edgeseq's CUDA provider options).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SHAPES = {
    "mamba-130m": dict(hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4,
                       vocab_size=50280),
    "rwkv7-0.1b": "rwkv7-0.1b",
}
DRY = {  # --dry-run: same code, tiny shapes
    "mamba-130m": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4, vocab_size=512),
}
PROMPT, CHECK_TOKENS = 16, 32


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def make_mamba(out: str, shape: dict) -> str:
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    import bench_rwkv

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**shape, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith("A_log"):
                p.add_(torch.randn_like(p) * 1.5 / p[0].numel() ** 0.5)
    model.save_pretrained(out, safe_serialization=True)
    bench_rwkv.write_wordlevel(os.path.join(out, "tokenizer.json"), shape["vocab_size"])
    return out


def make_rwkv7(out: str, dry: bool) -> tuple[str, str]:
    import bench_rwkv

    if dry:  # a tiny x070 state dict, the shape the tests use
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        import torch
        from rwkv_builders import v7_state_dict

        os.makedirs(out, exist_ok=True)
        torch.save(v7_state_dict(C=64, L=2, H=1, F=256), os.path.join(out, "model.pth"))
        vocab = 256
    else:
        if not os.path.isfile(os.path.join(out, "model.pth")):
            bench_rwkv.make_pth("rwkv7-0.1b", out)
        vocab = 65536
    tok = os.path.join(out, "wordlevel.json")  # the GPU host may lack the rwkv package's World vocabulary
    if not os.path.isfile(tok):
        bench_rwkv.write_wordlevel(tok, vocab)
    return os.path.join(out, "model.pth"), tok


class Edgeseq:
    def __init__(self, bundle: str, device: str, cuda_graph: bool, dry: bool):
        import edgeseq

        if dry and device == "cuda":  # the CPU stands in; cuda_graph -> the same fixed-IO step path
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

    def decode_tps(self, prompt: list[int], n: int) -> float:
        import numpy as np

        s = self.session
        s.reset()
        tok = int(np.argmax(s.prefill(prompt)))
        for _ in range(8):  # warm-up (CUDA graphs: capture of both parities)
            tok = int(np.argmax(s.step(tok)))
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(s.step(tok)))
        return n / (time.perf_counter() - t0)


class HfEager:
    def __init__(self, ckpt: str, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.device = torch, device
        self.model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()

    def _gen(self, prompt, n: int) -> float:
        torch = self.torch
        ids = torch.tensor([prompt], device=self.device)
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                      pad_token_id=0)
        if self.device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - t0

    def greedy(self, prompt, n: int):
        torch = self.torch
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt], device=self.device), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return out[0, len(prompt):].tolist(), None

    def decode_tps(self, prompt, n: int) -> float:
        self._gen(prompt, 4)  # warm-up
        return (n - 1) / (self._gen(prompt, n) - self._gen(prompt, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="working directory (models and bundles are kept for reruns)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256, help="timed decode tokens per run")
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny shapes: checks that the script runs")
    ap.add_argument("--json", help="write the raw figures here")
    a = ap.parse_args()
    import cuda_check

    cuda_check._import_from_checkout()
    import numpy as np
    import onnxruntime as ort

    import edgeseq
    from edgeseq.exporters.export import export

    dev = "cpu" if a.dry_run else "cuda"
    info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "edgeseq": edgeseq.__version__,
            "dry_run": a.dry_run}
    if not a.dry_run:
        import torch

        info.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0))
    log(info)
    os.makedirs(a.out, exist_ok=True)
    results: dict = {"info": info, "models": {}}
    for name in SHAPES:
        d = os.path.join(a.out, name + ("-dry" if a.dry_run else ""))
        bundle = os.path.join(d, "bundle")
        if name.startswith("mamba"):
            ckpt = make_mamba(os.path.join(d, "hf"), (DRY if a.dry_run else SHAPES)[name])
            export(ckpt, bundle, force=True)
        else:
            ckpt, tok = make_rwkv7(d, a.dry_run)
            export(ckpt, bundle, tokenizer=tok, force=True)
        vocab = edgeseq.load(bundle).vocab_size
        prompt = np.random.default_rng(0).integers(0, vocab, PROMPT).tolist()
        systems = {"ort-cuda": Edgeseq(bundle, "cuda", False, a.dry_run),
                   "ort-cuda-graph": Edgeseq(bundle, "cuda", True, a.dry_run)}
        if name.startswith("mamba"):
            systems["hf-eager"] = HfEager(ckpt, dev)
        if not a.dry_run:  # say whether ONNX Runtime kept CUDA graphs on for the step session
            step = systems["ort-cuda-graph"].model.engine.session("step")
            info[f"{name}.step_provider_options"] = step.get_provider_options().get("CUDAExecutionProvider", {}).get(
                "enable_cuda_graph")
        cpu_toks, cpu_logits = Edgeseq(bundle, "cpu", False, a.dry_run).greedy(prompt, CHECK_TOKENS)
        check = {}
        for sname, sysobj in systems.items():
            toks, logits = sysobj.greedy(prompt, CHECK_TOKENS)
            check[sname] = {"tokens_equal": toks == cpu_toks,
                            "max_logit_diff": None if logits is None else float(np.abs(logits - cpu_logits).max())}
            log(name, sname, check[sname])
        tps: dict = {s: [] for s in systems}
        order = list(systems)
        for r in range(a.rounds):
            for sname in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
                tps[sname].append(systems[sname].decode_tps(prompt, a.tokens))
            log(name, f"round {r + 1}:", {s: round(v[-1], 1) for s, v in tps.items()})
        results["models"][name] = {"check": check, "decode_tps": tps, "logit_scale": float(np.abs(cpu_logits).max())}
        del systems
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nedgeseq {info['edgeseq']}, onnxruntime {info['onnxruntime']}"
          + (f", torch {info.get('torch')}, {info.get('gpu')}" if not a.dry_run else " (DRY RUN: CPU, tiny shapes)")
          + f"; fp32; {a.tokens} decode tokens, median of {a.rounds} interleaved rounds\n")
    print("| model | system | greedy tokens = CPU | max logit diff | decode tok/s (median) | min–max | vs hf-eager |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        med = {s: statistics.median(v) for s, v in r["decode_tps"].items()}
        for s, v in r["decode_tps"].items():
            c = r["check"][s]
            diff = "–" if c["max_logit_diff"] is None else f"{c['max_logit_diff']:.1e}"
            ratio = f"{med[s] / med['hf-eager']:.2f}×" if "hf-eager" in med else "–"
            print(f"| {name} | {s} | {'yes' if c['tokens_equal'] else 'NO'} | {diff} | {med[s]:.1f} | "
                  f"{min(v):.1f}–{max(v):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
