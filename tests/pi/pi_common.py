"""What both sides of `make pi-check` run: the logits of a bundle for fixed tokens, and a fresh-process peak
RSS measurement. Torch-free (the aarch64 guest has no torch); numpy, onnxruntime and edgeseq only.

    pi_common.py mem-worker BUNDLE [NPZ]   one measurement in this process; JSON on stdout
    pi_common.py guest-logits WORK CPU     (guest) logits of every bundle under WORK/logits, as <quant>.arm-CPU.npz
    pi_common.py guest-memory WORK         (guest) mem-worker in a fresh process per bundle -> WORK/memory/arm.json

Under qemu's user mode the process is qemu itself: VmHWM counts the guest's memory plus the emulator's
(its binary, heap and translated-code cache). qemu maps guest memory 1:1 (guest_base 0 for aarch64 on
x86-64), and /proc/self/maps is emulated (guest mappings only) while /proc/self/smaps is the host's: the
RSS of smaps entries outside the guest's mappings is the emulator's share.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FAMILIES = ["mamba", "mamba2", "rwkv4", "rwkv5", "rwkv6", "rwkv7", "zamba", "zamba2", "recurrent_gemma"]
QUANTS = ["f32", "int8", "int4"]
MEM_MODELS = ["mamba-130m", "rwkv7-0.1b"]
N_TOKENS = 24
THREADS = 2


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def run_logits(bundle) -> dict:
    """Per-token step logits and prefill_all logits of the same 24 tokens, each from a fresh session."""
    import edgeseq

    m = edgeseq.load(str(bundle), threads=THREADS)
    ids = np.random.default_rng(7).integers(0, m.vocab_size, N_TOKENS).tolist()
    s = m.session()
    out = {"ids": np.array(ids), "steps": np.stack([s.step(int(t)) for t in ids]).astype(np.float32)}
    out["prefill_all"] = np.asarray(m.session().logits_all(ids), np.float32)
    out["prefill_last"] = np.asarray(m.session().prefill(ids), np.float32)
    return out


# -- memory -------------------------------------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def emulator_rss() -> int:
    """Bytes of resident memory that belong to qemu rather than to the guest program; 0 when native."""
    smaps = open("/proc/self/smaps").read()
    if "qemu-" not in smaps:
        return 0
    guest = []
    for line in open("/proc/self/maps"):
        a, b = line.split()[0].split("-")
        guest.append((int(a, 16), int(b, 16)))
    guest.sort()
    starts = [g[0] for g in guest]
    import bisect

    emu = 0
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*\n(?:(?![0-9a-f]+-[0-9a-f]+ ).*\n)*?Rss:\s+(\d+) kB", smaps, re.M):
        a, b, rss = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3)) * 1024
        i = bisect.bisect_right(starts, a) - 1
        inside = i >= 0 and guest[i][0] <= a < guest[i][1]
        if not inside and i + 1 < len(guest) and guest[i + 1][0] < b:
            inside = True
        if not inside:
            emu += rss
    return emu


def mem_worker(bundle: str, npz: str | None = None) -> dict:
    """benchmarks/memory_table.py's worker, shortened for emulation: load with 2 threads (prepacking on), a
    64-token prompt, 16 greedy tokens (not 64: the state and arena are allocated at the first step and stay
    flat); peak RSS (VmHWM) after it."""
    import onnxruntime  # noqa: F401

    import edgeseq

    base, emu_base = _status("VmRSS"), emulator_rss()
    m = edgeseq.load(bundle, threads=THREADS)
    s = m.session()
    loaded = _status("VmRSS")
    ids = np.random.default_rng(0).integers(0, m.vocab_size, 64).tolist()
    first = s.prefill(ids)
    tok, steps = int(np.argmax(first)), []
    for _ in range(16):
        lg = s.step(tok)
        steps.append(lg[:4096].copy() if len(steps) < 8 else None)
        tok = int(np.argmax(lg))
    if npz:
        np.savez(npz, prefill_last=np.asarray(first, np.float32), steps=np.stack(steps[:8]).astype(np.float32))
    return {"base": base, "loaded": loaded, "peak": _status("VmHWM"), "anon": _status("RssAnon"),
            "emulator": emulator_rss(), "emulator_base": emu_base, "state": m.state_bytes,
            "weights": m.weights_bytes, "last_token": tok}


def fresh(bundle: str, npz: str | None) -> dict:
    """mem_worker in a new process, with an empty edgeseq cache: a GGUF file is converted to a bundle on its
    first load and the conversion is part of the peak (a later load finds it in the cache)."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        r = subprocess.run([sys.executable, "-P", str(HERE / "pi_common.py"), "mem-worker", bundle] + ([npz] if npz else []),
                           capture_output=True, text=True, timeout=3000, env={**os.environ, "EDGESEQ_CACHE": cache})
    if r.returncode:
        raise RuntimeError(f"{bundle}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def guest_memory(work: Path, cpu: str) -> int:
    x86 = json.loads((work / "memory" / "x86.json").read_text())
    jobs = {k: (str(work / v["bundle"]), str(work / "memory" / f"{k.replace(' ', '_')}.arm-{cpu}.npz")) for k, v in x86.items()}
    rows, bad = {}, 0
    for k, (b, npz) in jobs.items():
        log(f"aarch64 ({cpu}) peak RSS: {k}")
        try:
            r = fresh(b, npz)
        except Exception as e:  # noqa: BLE001 - reported, and the check fails
            print(f"FAIL memory {k}: {e}", file=sys.stderr)
            bad += 1
            continue
        p = Path(b)
        r["bundle_bytes"] = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.iterdir())
        rows[k] = r
        log(f"  VmHWM {r['peak'] / 2**20:.0f} MiB, qemu's share {r['emulator'] / 2**20:.0f} MiB")
    (work / "memory" / "arm.json").write_text(json.dumps(rows, indent=1))
    return bad


def guest_logits(work: Path, cpu: str) -> int:
    bad = 0
    for family in FAMILIES:
        for quant in QUANTS:
            b = work / "logits" / family / quant
            log(f"aarch64 ({cpu}) logits: {family} {quant}")
            try:
                np.savez(b.parent / f"{quant}.arm-{cpu}.npz", **run_logits(b))
            except Exception as e:  # noqa: BLE001 - reported, and the check fails
                print(f"FAIL logits {family} {quant} ({cpu}): {type(e).__name__}: {e}", file=sys.stderr)
                bad += 1
    return bad


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "mem-worker":
        print(json.dumps(mem_worker(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)))
    elif cmd == "guest-logits":
        sys.exit(1 if guest_logits(Path(sys.argv[2]), sys.argv[3]) else 0)
    elif cmd == "guest-memory":
        sys.exit(1 if guest_memory(Path(sys.argv[2]), sys.argv[3]) else 0)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
