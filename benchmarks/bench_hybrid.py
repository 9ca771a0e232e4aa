"""Hybrid families (attention + recurrence): decode speed and memory at 256 and at 4096 tokens of
context, edgeseq vs HF transformers, fp32, CPU.

    python benchmarks/bench_hybrid.py /tmp/edgeseq-bench-hybrid --shape zamba2-1.2b --rounds 3 \\
        --json /tmp/edgeseq-bench-hybrid/results.json

Shapes (random weights: speed and memory depend on the shapes, not the values). One entry each in
SHAPES: the transformers config class and its keyword arguments; add a shape there (a Griffin /
RecurrentGemma one works the same way, with `max_context` unused by families whose ring is fixed).

    zamba2-1.2b     Zyphra/Zamba2-1.2B's config (HF's defaults are the 2.7B): d 2048, 38 layers of which
                    6 hybrid (5, 11, ..., 35), one shared block, 64 Mamba-2 heads of 64, d_state 128,
                    32 attention heads of 128 (MHA), MLP 8192, LoRA rank 128 on the MLP and q/k/v,
                    RoPE, vocabulary 32000: 1.2 B parameters, 4.9 GB in fp32
    zamba2-1.2b-d1024  the same layer pattern, heads and state sizes at half the width (d 1024, MLP 4096,
                    32 Mamba-2 heads): for machines where the 1.2B does not fit twice in memory

Per round, every system runs in a fresh subprocess (interleaved, the order rotating each round):

    edgeseq   edgeseq.load(bundle, threads=T, max_context=8192): prefill to 248 tokens, 8 warm-up
              steps, N timed greedy steps (tok/s "at 256"), VmRSS; the same at 1024 and at 4096
              (prefilling on from where it stopped); VmHWM (peak)
    hf        AutoModelForCausalLM fp32, torch threads T: a 248-token forward with the cache, 8 warm-up
              cached steps, N timed cached steps (tok/s at 256), VmRSS, VmHWM. HF to 256 only (slow).

Medians over rounds; the machine's load average is recorded with each run (it is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)
SHAPES = {
    "zamba2-1.2b": ("Zamba2Config", dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=38, mamba_d_state=128, mamba_d_conv=4,
        mamba_expand=2, n_mamba_heads=64, mamba_ngroups=1, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=128,
        use_mem_rope=True, layers_block_type=["hybrid" if i % 6 == 5 else "linear_attention" for i in range(38)],
        max_position_embeddings=4096, tie_word_embeddings=True)),
    "zamba2-1.2b-d1024": ("Zamba2Config", dict(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=38, mamba_d_state=128, mamba_d_conv=4,
        mamba_expand=2, n_mamba_heads=32, mamba_ngroups=1, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=4096, num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=128,
        use_mem_rope=True, layers_block_type=["hybrid" if i % 6 == 5 else "linear_attention" for i in range(38)],
        max_position_embeddings=4096, tie_word_embeddings=True)),
    # Griffin 1B as the Griffin paper's appendix C lists it (as recalled, not re-checked here): d 2048,
    # 18 layers (rec, rec, attn)…, 16 heads (MQA, head dim 128), RG-LRU width 2560, MLP 3·d, window 1024;
    # vocabulary 32000 (Gemma's 256000 would add 0.5 G parameters to a shared 23 GB machine): 1.0 B
    # parameters, 4.0 GB in fp32
    "griffin-1b": ("RecurrentGemmaConfig", dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=1,
        lru_width=2560, intermediate_size=2 * 3 * 2048, attention_window_size=1024)),
    "griffin-tiny": ("RecurrentGemmaConfig", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=96, attention_window_size=16)),
    # a smoke test of this script (seconds)
    "zamba2-tiny": ("Zamba2Config", dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=4, mamba_d_state=8, n_mamba_heads=4, num_attention_heads=4,
        intermediate_size=48, adapter_rank=4, use_shared_attention_adapter=True, use_mem_rope=True,
        layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"])),
}
SYSTEMS = ["edgeseq", "hf"]
WARM = 8


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":")) / 1024.0


def ids_for(vocab: int, n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, n).tolist()


# -- workers (one measurement each, in a fresh process) --------------------------------------------
def worker_edgeseq(d: str, n: int, threads: int, max_context: int) -> dict:
    import numpy as np

    import edgeseq

    m = edgeseq.load(os.path.join(d, "bundle"), threads=threads, max_context=max_context)
    s = m.session()
    ids = ids_for(m.vocab_size, 4096)
    out = {"load_rss_mb": status_mb("VmRSS")}
    for at in (256, 1024, 4096):
        logits = s.prefill(ids[s.position:at - WARM])
        for _ in range(WARM):
            logits = s.step(int(np.argmax(logits)))
        t0 = time.perf_counter()
        for _ in range(n):
            logits = s.step(int(np.argmax(logits)))
        out[f"tps_{at}"] = n / (time.perf_counter() - t0)
        out[f"rss_{at}_mb"] = status_mb("VmRSS")
    out["peak_rss_mb"] = status_mb("VmHWM")
    out["state_mb"] = m.state_bytes / 2**20
    return out


def worker_hf(d: str, n: int, threads: int, max_context: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), dtype=torch.float32).eval()
    ids = ids_for(m.config.vocab_size, 256)
    out = {"load_rss_mb": status_mb("VmRSS")}
    if m.config.model_type == "recurrent_gemma":
        return worker_hf_recurrent_gemma(m, ids, n, out)
    with torch.no_grad():
        r = m(torch.tensor([ids[:256 - WARM]]), use_cache=True)
        cache, tok = r.past_key_values, r.logits[0, -1].argmax()
        for i in range(WARM + n):
            if i == WARM:
                t0 = time.perf_counter()
            r = m(tok.view(1, 1), past_key_values=cache, use_cache=True)
            cache, tok = r.past_key_values, r.logits[0, -1].argmax()
    out["tps_256"] = n / (time.perf_counter() - t0)
    out["rss_256_mb"] = status_mb("VmRSS")
    out["peak_rss_mb"] = status_mb("VmHWM")
    return out


def worker_hf_recurrent_gemma(m, ids: list[int], n: int, out: dict) -> dict:
    """RecurrentGemma keeps its recurrent state on the modules and returns no cache: it is stepped with
    a DynamicCache of our own and explicit position_ids (without them every call is position 0, where
    the RG-LRU resets), the module state set up once for the sequence."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=m.config)
    m.model._setup_cache(m.config, 1, "cpu", torch.float32)

    def run(toks, pos):
        r = m(torch.tensor([toks]), position_ids=torch.arange(pos, pos + len(toks))[None], past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        return int(r.logits[0, -1].argmax())

    with torch.no_grad():
        tok, pos = run(ids[:256 - WARM], 0), 256 - WARM
        for i in range(WARM + n):
            if i == WARM:
                t0 = time.perf_counter()
            tok, pos = run([tok], pos), pos + 1
    out["tps_256"] = n / (time.perf_counter() - t0)
    out["rss_256_mb"] = status_mb("VmRSS")
    out["peak_rss_mb"] = status_mb("VmHWM")
    return out


# -- parent ------------------------------------------------------------------------------------------
def build(out: str, shape: str) -> str:
    """HF checkpoint (random init) and its edgeseq bundle (fused, f32), each written once."""
    d = os.path.join(out, shape)
    if not os.path.isfile(os.path.join(d, "bundle", "edgeseq.json")):
        code = f"""
import torch, transformers, sys
sys.path.insert(0, {os.path.dirname(HERE)!r})
from bench_hybrid import SHAPES
cls, kw = SHAPES[{shape!r}]
torch.manual_seed(0)
cfg = getattr(transformers, cls)(**kw)
arch = cfg.architectures[0] if cfg.architectures else cls.replace("Config", "ForCausalLM")
model = getattr(transformers, arch)(cfg).eval()
print(sum(p.numel() for p in model.parameters()), "parameters", flush=True)
model.save_pretrained({os.path.join(d, "hf")!r})
del model
import importlib.util, os, shutil
spec = importlib.util.find_spec("mistral_common")  # Zamba2's SentencePiece model (Mistral v0.1), if installed
if cfg.vocab_size == 32000 and spec:
    shutil.copyfile(os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1"),
                    os.path.join({os.path.join(d, "hf")!r}, "tokenizer.model"))
from edgeseq.exporters.export import export
export({os.path.join(d, "hf")!r}, {os.path.join(d, "bundle")!r}, force=True)
"""
        log(f"building {shape} in {d}")
        subprocess.run([sys.executable, "-P", "-c", code], check=True)
    return d


def run_worker(system: str, d: str, n: int, threads: int, max_context: int) -> dict:
    r = subprocess.run([sys.executable, HERE, "--worker", system, d, "--tokens", str(n), "--threads", str(threads),
                        "--max-context", str(max_context)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{system} worker failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["loadavg_1m"] = os.getloadavg()[0]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="/tmp/edgeseq-bench-hybrid")
    ap.add_argument("--shape", action="append", choices=list(SHAPES))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-context", type=int, default=8192)
    ap.add_argument("--json")
    ap.add_argument("--worker", nargs=2, metavar=("SYSTEM", "DIR"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fn = {"edgeseq": worker_edgeseq, "hf": worker_hf}[a.worker[0]]
        print(json.dumps(fn(a.worker[1], a.tokens, a.threads, a.max_context)))
        return
    systems = a.systems.split(",")
    results = {}
    for shape in a.shape or ["zamba2-1.2b"]:
        d = build(a.out, shape)
        runs = {s: [] for s in systems}
        for r in range(a.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for s in order:
                res = run_worker(s, d, a.tokens, a.threads, a.max_context)
                log(shape, f"round {r + 1}", s, json.dumps({k: round(v, 2) for k, v in res.items()}))
                runs[s].append(res)
        results[shape] = runs
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    print("| shape | system | decode tok/s at 256 | at 4096 | RSS MB at 256 | at 1024 | at 4096 | peak RSS MB | "
          "load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, runs in results.items():
        for s, rs in runs.items():
            med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            f = lambda k, fmt="{:.2f}": fmt.format(med[k]) if k in med else "—"  # noqa: E731
            print(f"| {shape} | {s} | {f('tps_256')} | {f('tps_4096')} | {f('rss_256_mb', '{:.0f}')} | "
                  f"{f('rss_1024_mb', '{:.0f}')} | {f('rss_4096_mb', '{:.0f}')} | {f('peak_rss_mb', '{:.0f}')} | "
                  f"{f('loadavg_1m', '{:.1f}')} |")


if __name__ == "__main__":
    main()
