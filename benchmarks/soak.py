"""Soak: long generation runs, watching resident memory and the numbers (docs/reliability.md).

    nice -n 19 .venv/bin/python -P benchmarks/soak.py            # the full run (hours on 2 shared cores)
    .venv/bin/python -P benchmarks/soak.py --tokens 20000 --tiny-tokens 5000   # a shortened one

For each shipped demo model (RWKV-7 and Mamba-2, byte-level) in f32 and int4: `--tokens` generated tokens
(100,000 by default); for every other family at the benchmark harness's tiny random shape (f32):
`--tiny-tokens` (20,000). The full-attention families (Zamba, Zamba2) run with a small KV ring
(`--ring`, 64 tokens) and on_full="slide", so the ring wraps hundreds of times. Each model runs in its
own process (one session, sampled tokens from a seeded generator, temperature 1). Reported per run:
tokens/s, RSS after warm-up (the first 10 % of tokens) and its largest growth after that (must stay
within 1 %; `--json` keeps RSS at every tenth of the run), and every check of the logits and the state for NaN or inf (every 1,000 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEMOS = {"demo-rwkv7": "rwkv7", "demo-mamba2": "mamba2"}
TINY = ["mamba-tiny", "rwkv4-tiny", "rwkv5-tiny", "rwkv6-tiny", "zamba-tiny", "zamba2-tiny", "griffin-tiny"]
RING = ("zamba", "zamba2")


def rss(field: str = "VmRSS") -> int:
    """Resident bytes: VmRSS, or its parts RssAnon (heap, arenas: what a leak grows) and RssFile (mapped
    files: the weights, which the kernel may drop and read back)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))


def soak(bundle: str, tokens: int, ring: int | None, seed: int = 0, every: int = 1000) -> dict:
    """One session generating `tokens` sampled tokens from `bundle`, checked every `every` tokens."""
    import numpy as np

    import edgeseq

    opts = {"max_context": ring, "on_full": "slide"} if ring else {}
    m = edgeseq.load(bundle, threads=1, **opts)
    s = m.session()
    rng = np.random.default_rng(seed)
    logits = s.prefill([1, 2, 3, 4])
    warm = max(every, tokens // 10)
    rss_warm, rss_max, bad, checks, series = None, 0, [], 0, []
    t0 = time.perf_counter()
    for i in range(1, tokens + 1):
        z = logits.astype(np.float64) - logits.max()
        p = np.exp(z)
        tok = int(rng.choice(len(p), p=p / p.sum()))
        logits = s.step(tok)
        if i % every == 0:
            checks += 1
            if not np.isfinite(logits).all() or not all(np.isfinite(a).all() for a in s.state().values()):
                bad.append(i)
            now = rss()
            if i % max(every, tokens // 10) == 0:
                # (token, RSS, anon, file MB): the curve, in --json
                series.append([i, *(round(rss(k) / 2 ** 20, 2) for k in ("VmRSS", "RssAnon", "RssFile"))])
            if i == warm:
                rss_warm = now
            elif i > warm:
                rss_max = max(rss_max, now)
    secs = time.perf_counter() - t0
    growth = (rss_max - rss_warm) / rss_warm * 100 if rss_warm and rss_max else 0.0
    return {"tokens": tokens, "tok_s": tokens / secs, "rss_warm_mb": (rss_warm or 0) / 2 ** 20,
            "rss_max_mb": rss_max / 2 ** 20, "growth_pct": growth, "nonfinite_at": bad, "checks": checks,
            "position": s.position, "ring": ring, "wraps": (s.position // ring) if ring else 0,
            "state_kib": m.state_bytes / 1024, "rss_mb": series}


def export_all(work: str, names: list[str], quants: list[str]) -> list[tuple[str, str, str]]:
    """(name, quant, bundle) for every model to soak."""
    sys.path.insert(0, HERE)
    from harness.models import SHAPES, build

    from edgeseq.exporters.export import export

    out = []
    for name in names:
        for q in (quants if name in DEMOS else ["f32"]):
            b = os.path.join(work, f"{name}-{q}")
            if not os.path.isdir(b):
                if name in DEMOS:
                    import edgeseq

                    src = os.path.join(os.path.dirname(edgeseq.__file__), "demo", DEMOS[name])
                    export(src, b, quant=q)
                else:
                    built = build(name, os.path.join(work, "ckpt"))
                    export(built["checkpoint"], b, quant=q, tokenizer=built["tokenizer"])
            out.append((name, q, b))
    del SHAPES
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--tiny-tokens", type=int, default=20_000)
    ap.add_argument("--models", default=",".join([*DEMOS, *TINY]))
    ap.add_argument("--quants", default="f32,int4")
    ap.add_argument("--ring", type=int, default=64)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "edgeseq-soak"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=3, metavar=("BUNDLE", "TOKENS", "RING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        ring = int(a.child[2]) or None
        print(json.dumps(soak(a.child[0], int(a.child[1]), ring)))
        return 0
    runs = export_all(a.work, a.models.split(","), a.quants.split(","))
    rows = []
    print("| model | quant | tokens | tok/s | RSS after warm-up | growth after | NaN/inf checks | ring wraps |")
    print("|---|---|---|---|---|---|---|---|")
    for name, q, b in runs:
        tokens = a.tokens if name in DEMOS else a.tiny_tokens
        ring = a.ring if any(name.startswith(f + "-") for f in RING) else 0
        r = subprocess.run([sys.executable, "-P", __file__, "--child", b, str(tokens), str(ring)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode:
            print(f"| {name} | {q} | failed: {r.stderr.strip().splitlines()[-1][:120]} |", flush=True)
            rows.append({"model": name, "quant": q, "error": r.stderr[-2000:]})
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"model": name, "quant": q, **res})
        print(f"| {name} | {q} | {tokens} | {res['tok_s']:.0f} | {res['rss_warm_mb']:.1f} MB | "
              f"{res['growth_pct']:+.2f} % | {len(res['nonfinite_at'])} of {res['checks']} | "
              f"{res['wraps'] if ring else '-'} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    ok = all("error" not in r and r["growth_pct"] <= 1.0 and not r["nonfinite_at"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
