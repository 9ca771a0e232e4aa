"""How much memory each model shape needs with edgeseq (weights + state + runtime), so a user can pick
what fits a 4 GB Raspberry Pi: peak RSS of one session, measured on this x86-64 machine.

    python benchmarks/memory_table.py OUT_DIR [--models mamba-130m rwkv7-0.1b ...] [--quants f32 f16]
                                              [--markdown] [--json FILE]

For each model (random weights with noise at the real shape; memory depends on shapes, not values) and
each quantization, a bundle is exported (fused flavour) and, in a fresh subprocess per measurement:

    base      VmRSS after `import edgeseq, onnxruntime, numpy` (Python + the runtime's libraries)
    loaded    VmRSS after edgeseq.load + one session (ONNX Runtime has read and prepacked the weights)
    peak      VmHWM (peak RSS) after a 64-token prompt and 64 greedy tokens: what the device must hold
    anon      RssAnon at the end: memory the process owns (the rest of RSS is file pages: weights mapped
              from the bundle, which the kernel can drop and re-read under pressure, slowly)

Each is measured with ONNX Runtime's default (prepacking on) and with low_memory=True (prepacking off:
the weights are held as stored, decode is slower). Threads: 2. Mobile bundles (.ort, `export --mobile`)
are measured too where --mobile is given: ONNX Runtime loading an ORT-format file by path.

Models (make_models.py / bench_rwkv.py shapes; the larger ones from the released configs):
    mamba-130m  d 768,  24 layers, d_state 16, vocab 50,280     mamba-370m  d 1024, 48 layers
    mamba-790m  d 1536, 48 layers                               mamba2-130m d 768, 24 layers, d_state 128, head 64
    rwkv7-0.1b  C 768, 12 layers, vocab 65,536                  rwkv7-0.4b  C 1024, 24 layers, ffn 4096
    rwkv4-169m  C 768, 12 layers, vocab 50,277
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MIB = 2 ** 20

MAMBA = {
    "mamba-130m": dict(hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4, vocab_size=50280),
    "mamba-370m": dict(hidden_size=1024, num_hidden_layers=48, state_size=16, expand=2, conv_kernel=4,
                       vocab_size=50280),
    "mamba-790m": dict(hidden_size=1536, num_hidden_layers=48, state_size=16, expand=2, conv_kernel=4,
                       vocab_size=50280),
    "mamba2-130m": dict(arch="mamba2", hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64,
                        num_heads=24, n_groups=1, expand=2, conv_kernel=4, vocab_size=50288),
}
RWKV = {  # bench_rwkv.make_pth specs; LoRA ranks from BlinkDL's formulas at C 1024 for 0.4B
    "rwkv7-0.1b": None,
    "rwkv4-169m": None,
    "rwkv7-0.4b": dict(version=7, n_embd=1024, n_layer=24, head_size=64, dim_ffn=4096, vocab=65536,
                       lora=dict(w=64, a=64, v=32, g=160)),
}
DEFAULT_MODELS = ["mamba-130m", "mamba2-130m", "rwkv7-0.1b", "rwkv4-169m", "mamba-370m", "rwkv7-0.4b"]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def checkpoint(name: str, d: str) -> tuple[str, str | None]:
    """(checkpoint path, tokenizer to pass to export or None)."""
    import bench_rwkv

    if name in MAMBA:
        ckpt = os.path.join(d, "hf")
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            import torch
            from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

            shape = dict(MAMBA[name])
            v2 = shape.pop("arch", "mamba") == "mamba2"
            cfg = (Mamba2Config if v2 else MambaConfig)(**shape, tie_word_embeddings=True, bos_token_id=0,
                                                        eos_token_id=0, pad_token_id=0)
            torch.manual_seed(0)
            model = (Mamba2ForCausalLM if v2 else MambaForCausalLM)(cfg).eval()
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if p.ndim >= 2 and not pname.endswith("A_log"):
                        p.add_(torch.randn_like(p) * 1.5 / p[0].numel() ** 0.5)
            model.save_pretrained(ckpt, safe_serialization=True)
            del model
            bench_rwkv.write_wordlevel(os.path.join(ckpt, "tokenizer.json"), shape["vocab_size"])
        return ckpt, None
    if RWKV[name] is not None:
        bench_rwkv.MODELS[name] = RWKV[name]
    if not os.path.isfile(os.path.join(d, "model.pth")):
        bench_rwkv.make_pth(name, d)
    tok = os.path.join(d, "tokenizer.json")
    if not os.path.isfile(tok):  # a World-sized vocabulary: a WordLevel stand-in (ids are fed, not text)
        bench_rwkv.write_wordlevel(tok, bench_rwkv.MODELS[name]["vocab"])
    return os.path.join(d, "model.pth"), tok


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(bundle: str, low_memory: bool) -> dict:
    import numpy as np
    import onnxruntime  # noqa: F401

    import edgeseq

    base = _status("VmRSS")
    m = edgeseq.load(bundle, threads=2, low_memory=low_memory)
    s = m.session()
    loaded = _status("VmRSS")
    ids = np.random.default_rng(0).integers(0, m.vocab_size, 64).tolist()
    tok = int(np.argmax(s.prefill(ids)))
    t0 = time.perf_counter()
    for _ in range(64):
        tok = int(np.argmax(s.step(tok)))
    tps = 64 / (time.perf_counter() - t0)
    return {"base": base, "loaded": loaded, "peak": _status("VmHWM"), "anon": _status("RssAnon"),
            "file": _status("RssFile"), "state": m.state_bytes,
            "weights": m.weights_bytes, "decode_tps": tps}


def measure(bundle: str, low_memory: bool) -> dict:
    code = f"import sys, json; sys.path.insert(0, {HERE!r}); import memory_table as mt; " \
           f"print(json.dumps(mt.worker({bundle!r}, {low_memory!r})))"
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MAMBA) + list(RWKV))
    ap.add_argument("--quants", nargs="*", default=["f32", "f16"], help="fused bundles of these quants")
    ap.add_argument("--mobile", nargs="*", metavar="QUANT", help="also mobile bundles (step.ort) of these quants "
                    "(none given: f32)")
    ap.add_argument("--rounds", type=int, default=1, help="measurements per configuration (median)")
    ap.add_argument("--skip-low-memory", action="store_true", help="measure with prepacking only")
    ap.add_argument("--keep", action="store_true", help="keep the bundles (they are large)")
    ap.add_argument("--json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--from-json", nargs="+", metavar="FILE", help="measure nothing: print the table of saved runs")
    a = ap.parse_args()
    if a.from_json:
        rows = [r for f in a.from_json for r in json.load(open(f))]
        order = {m: i for i, m in enumerate(DEFAULT_MODELS + [m for m in list(MAMBA) + list(RWKV)])}
        qorder = {q: i for i, q in enumerate(["f32", "f16", "int8", "int4"])}
        rows.sort(key=lambda r: (order[r["model"]], r["flavour"] == "mobile", qorder.get(r["quant"], 9)))
        print(table(rows))
        return
    from edgeseq.exporters.export import export
    from edgeseq.exporters.mobile import export_mobile

    rows = []
    for name in a.models:
        d = os.path.join(a.out, name)
        os.makedirs(d, exist_ok=True)
        ckpt, tok = checkpoint(name, d)
        mobile = (a.mobile or ["f32"]) if a.mobile is not None else []
        configs = [(q, "fused") for q in a.quants] + [(q, "mobile") for q in mobile]
        for q, flavour in configs:
            bundle = os.path.join(d, f"bundle-{q}-{flavour}")
            t0 = time.perf_counter()
            if flavour == "mobile":
                export_mobile(ckpt, bundle, quant=q, tokenizer=tok, force=True)
            else:
                export(ckpt, bundle, quant=q, tokenizer=tok, force=True)
            size = sum(os.path.getsize(os.path.join(bundle, f)) for f in os.listdir(bundle))
            log(f"{name} {q} {flavour}: exported {size / MIB:.0f} MiB in {time.perf_counter() - t0:.0f} s")
            for low in (False,) if a.skip_low_memory else (False, True):
                runs = [measure(bundle, low) for _ in range(a.rounds)]
                r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                r.update(model=name, quant=q, flavour=flavour, low_memory=low, bundle_bytes=size)
                rows.append(r)
                log(f"  low_memory={low}: base {r['base'] / MIB:.0f} MiB, loaded {r['loaded'] / MIB:.0f}, "
                    f"peak {r['peak'] / MIB:.0f}, decode {r['decode_tps']:.1f} tok/s")
            if not a.keep:
                shutil.rmtree(bundle)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.markdown:
        print(table(rows))


def table(rows: list[dict]) -> str:
    out = ["| model | quant | bundle on disk | state | peak RSS (prepacked) | of which anon at end | "
           "peak RSS (low_memory) | of which anon at end | runtime alone | decode tok/s (prepacked / low_memory) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    by: dict = {}
    for r in rows:
        by.setdefault((r["model"], r["quant"], r["flavour"]), {})[r["low_memory"]] = r
    for (name, q, flavour), pair in by.items():
        p, lm = pair[False], pair.get(True)
        label = q if flavour == "fused" else f"{q} mobile (.ort)"
        low = (f"{lm['peak'] / MIB:.0f} MiB | {lm['anon'] / MIB:.0f} MiB", f"{lm['decode_tps']:.1f}") if lm else \
            ("not measured | –", "–")
        out.append(f"| {name} | {label} | {p['bundle_bytes'] / MIB:.0f} MiB | {p['state'] / MIB:.2f} MiB | "
                   f"{p['peak'] / MIB:.0f} MiB | {p['anon'] / MIB:.0f} MiB | {low[0]} | {p['base'] / MIB:.0f} MiB | "
                   f"{p['decode_tps']:.1f} / {low[1]} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
