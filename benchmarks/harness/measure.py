"""One measurement, in a fresh child process: what every system is put through.

    imports            the system's libraries             -> mem_imports (VmRSS and co. after them)
    load               open the artifact                  -> load_s, mem_load
    prefill            P random tokens once as warm-up, reset, P tokens timed (canary beside)
                                                          -> prefill_tps, prefill_cpu_tps
    decode             reset, a 16-token prompt, 16 warm-up steps, D greedy steps timed (the argmax of
                       each step's logits fed back; canary beside)
                                                          -> decode_tps (D / time), decode_tps_step
                                                             (1 / median step time), decode_cpu_tps
                                                             (D / CPU time: see canary.py),
                                                             distinct_tokens
    256 tokens         greedy steps on until 256 tokens of context
                                                          -> mem_256
    marks (optional)   for each mark M: prefill random tokens up to M - 16 - D, 16 warm-up and D timed
                       steps, ending at context M          -> at[M] = {decode_tps, mem}
    end                                                   -> peak (VmHWM: the whole process, the
                                                             P-token prefill included), mem_end (+ PSS)
"""
from __future__ import annotations

import statistics
import time

from harness.canary import Canary
from harness.proc import memory

PROMPT, WARM = 16, 16


def measure(system, artifact: dict, built: dict, decode: int, prefill: int, threads: int, marks=(),
            max_context=None) -> dict:
    system.imports()
    import numpy as np

    res = {"mem_imports": memory()}
    t0 = time.perf_counter()
    r = system.open(artifact, built, threads, max_context)
    res["load_s"] = time.perf_counter() - t0
    res["mem_load"] = memory()
    res.update(r.info())
    ids = np.random.default_rng(0).integers(0, min(r.vocab, built["vocab"]), max(prefill, 64) + 8192).tolist()
    canary = {}
    if prefill:
        r.reset()
        r.prefill(ids[:prefill])
        r.reset()
        c = Canary().start()
        t0 = time.perf_counter()
        r.prefill(ids[:prefill])
        res["prefill_s"] = time.perf_counter() - t0
        canary["prefill"] = c.stop()
        res["prefill_tps"] = prefill / res["prefill_s"]
        res["prefill_cpu_tps"] = prefill / max(canary["prefill"]["cpu_s"], 1e-9)

    def argmax(logits) -> int:
        return int(np.argmax(logits))

    r.reset()
    tok = argmax(r.prefill(ids[:PROMPT]))
    for _ in range(WARM):
        tok = argmax(r.step(tok))
    toks, times = [], []
    c = Canary().start()
    t0 = time.perf_counter()
    for _ in range(decode):
        t1 = time.perf_counter()
        tok = argmax(r.step(tok))
        times.append(time.perf_counter() - t1)
        toks.append(tok)
    if decode:
        res["decode_s"] = time.perf_counter() - t0
        canary["decode"] = c.stop()
        res["decode_tps"] = decode / res["decode_s"]
        res["decode_cpu_tps"] = decode / max(canary["decode"]["cpu_s"], 1e-9)
        res["decode_tps_step"] = 1.0 / statistics.median(times)
        res["distinct_tokens"] = len(set(toks))
    pos = PROMPT + WARM + decode
    while pos < 256:
        tok = argmax(r.step(tok))
        pos += 1
    res["mem_256"] = memory(pss=True)
    res["at"] = {}
    for m in sorted(marks):
        fill = m - WARM - decode - pos
        if fill > 0:
            tok = argmax(r.prefill(ids[pos:pos + fill]))
            pos += fill
        for _ in range(WARM):
            tok = argmax(r.step(tok))
        c = Canary().start()
        t0 = time.perf_counter()
        for _ in range(decode):
            tok = argmax(r.step(tok))
        secs = time.perf_counter() - t0
        pos += WARM + decode
        res["at"][str(m)] = {"position": pos, "decode_tps": decode / secs if decode else None,
                             "mem": memory(pss=True), "canary": c.stop()}
    res["mem_end"] = memory(pss=True)
    res["peak"] = res["mem_end"]["peak"]
    res["canary"] = canary
    return res
