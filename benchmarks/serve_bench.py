"""edgeseq serve under load: time to first token per turn of a growing chat, and aggregate decode speed.

    python benchmarks/serve_bench.py [--model demo|mamba-130m|rwkv7-0.1b|...] [--quant int8] [--turns 10]
        [--clients 1 4 16] [--decode 64] [--threads N] [--out results.json]

The model: `demo` (the shipped byte-level RWKV-7, f32) or a shape of the harness's registry
(harness/models.py: random weights, exported here at --quant). The server runs as a real process
(`python -m edgeseq.cli_serve serve`, loopback, a free port); the clients are plain http.client threads
(little CPU of their own: this machine may have two cores).

1. TTFT per turn: a --turns-turn conversation through /v1/completions, streamed, greedy; each turn's prompt
   is the whole history (every earlier prompt and reply) plus --user-tokens new words, as a chat client sends
   it. TTFT = request sent -> first text chunk. Twice: with the state cache (each turn resumes the previous
   reply's state: cached_tokens) and with --cache-ram 0 (every turn prefills its whole history, as a server
   that re-reads the prompt does).
2. Throughput: C clients at once (C in --clients), each one streamed request of a distinct 16-word prompt
   and --decode tokens (temperature 1, seeded, so an end token is rare): completion tokens / wall time.

3. --load N: on a server of --parallel 16 and a 64 MB state cache, N requests from 32 clients (random
   prompt and reply lengths, streamed or not, 10 % bad requests of a dozen kinds): the status codes (no
   5xx), p50/p99 latency of the good ones, and the server's RSS after each tenth of the run (flat once
   the cache is full: no leak per request).

--llama-server PATH: the same TTFT and throughput runs against llama.cpp's own server (a `llama-server`
binary built from the llama.cpp sources of the pinned llama-cpp-python), both servers on one GGUF file (the
model exported by edgeseq at --quant: int8 -> Q8_0, int4 -> Q4_0), the same text requests to the same
OpenAI endpoint (/v1/completions, streamed), each server tokenizing with the GGUF's vocabulary. A random
model's reply need not re-tokenize to the ids it was generated as: edgeseq keeps a reply's own ids when its
text comes back (docs/serve.md), so it resumes the state after the reply; both servers report what they
reused (cached_tokens). Both servers run at once and get every turn and every client level in turn, the
order flipped each round (--rounds, fresh words each round): the figures are medians over rounds, so a
machine whose speed drifts over the minutes of a run weighs on both alike. llama-server runs as a user
would: `--parallel` as edgeseq's, a context of 8192 tokens a slot (a 10-turn history outgrows 2048), its
default prompt cache and context checkpoints.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def bundle_for(name: str, quant: str, work: str) -> tuple[str, bool]:
    """(bundle path, byte-level?)"""
    if name == "demo":
        from edgeseq.exporters.demo import demo_bundle

        return demo_bundle(), True
    sys.path.insert(0, HERE)  # the harness package beside this script
    from harness.models import build

    from edgeseq.exporters.export import export

    built = build(name, work)
    out = os.path.join(work, name, f"bundle-{quant}")
    if not os.path.isfile(os.path.join(out, "edgeseq.json")):
        kw = {"tokenizer": built["tokenizer"]} if built["tokenizer"] else {}
        export(built["checkpoint"], out, quant=quant, **kw)
    return out, built["vocab"] == 256


class Server:
    def __init__(self, bundle: str, *args):
        cmd = [sys.executable, "-P", "-m", "edgeseq.cli_serve", "serve", bundle, "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
            if line.startswith("error"):
                raise SystemExit(line)
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        for _ in range(300):
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the server did not start")

    def stream(self, body: dict) -> dict:
        """One streamed completion: TTFT, wall time, text, usage."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", json.dumps({**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
        ttft, text, usage = None, [], None
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            d = json.loads(line[6:])
            if d["choices"] and d["choices"][0]["text"]:
                ttft = ttft or time.perf_counter() - t0
                text.append(d["choices"][0]["text"])
            if d.get("usage"):
                usage = d["usage"]
        c.close()
        return {"ttft": ttft, "seconds": time.perf_counter() - t0, "text": "".join(text), "usage": usage}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class LlamaServer(Server):
    """llama.cpp's llama-server on a GGUF file; the same OpenAI endpoint as Server (stream() is shared)."""

    def __init__(self, binary: str, gguf: str, parallel: int, threads: int | None):
        import socket

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        t = ["-t", str(threads), "-tb", str(threads)] if threads else []
        cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-np", str(parallel),
               "-c", str(8192 * parallel), "--no-webui", *t]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited with {self.proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.2)
        raise SystemExit("llama-server did not start")


def versus_llama(a, res: dict) -> None:
    """edgeseq serve and llama-server on one GGUF file, the same text requests (see the module's docstring)."""
    sys.path.insert(0, HERE)
    from harness.models import build

    from edgeseq.exporters.gguf_writer import export_gguf

    built = build(a.model, a.work)
    gq = {"int8": "q8_0", "int4": "q4_0", "f32": "f32"}[a.quant]
    gguf = os.path.join(a.work, a.model, f"{a.model}-{gq}-served.gguf")
    if not os.path.isfile(gguf):
        kw = {"tokenizer": built["tokenizer"]} if built["tokenizer"] else {}
        export_gguf(built["checkpoint"], gguf, quant=gq, **kw)
    res["gguf"] = gguf
    par = max(a.clients)
    # --edgeseq-quant: edgeseq serves its own bundle of the same checkpoint at that quant (w8a8 has no GGUF form)
    served = bundle_for(a.model, a.edgeseq_quant, a.work)[0] if a.edgeseq_quant else gguf
    res["edgeseq_served"] = served
    # both servers up at once, idle but for the request in flight; every turn and every client level goes to
    # one, then the other (the order flipped each round), so a machine that speeds up or slows down over the
    # minutes of a run (these do, by up to 1.5x) weighs on both alike; each round a fresh conversation and
    # fresh prompts (a server may keep its caches from earlier rounds; neither can reuse them)
    servers = {"edgeseq": Server(served, "--parallel", par, "--cache-ram", 1024,
                                 *(["--threads", a.threads] if a.threads else []))}
    try:
        servers["llama_server"] = LlamaServer(a.llama_server, gguf, par, a.threads)
        for s in servers.values():
            s.stream({"prompt": user_turns(1, 8, False)[0][::-1], "max_tokens": 4})  # warm-up, unrelated
        runs = {k: {"ttft": [], "throughput": []} for k in servers}
        for r in range(a.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            turns = user_turns(a.turns, a.user_tokens, False, seed=100 + r)
            chats = {k: ChatTurns(servers[k], a.reply_tokens, False) for k in order}
            got = {k: [] for k in order}
            for user in turns:
                for k in order:
                    got[k].append(chats[k].turn(user))
            for c in a.clients:
                for k in order:
                    t = throughput(servers[k], c, a.decode, False, seed=1000 * (r + 1))
                    runs[k]["throughput"].append({**t, "round": r})
            for k in order:
                runs[k]["ttft"].append(got[k])
    finally:
        for s in servers.values():
            s.stop()
    for k, v in runs.items():
        ttft = [{"turn": i + 1, "ttft_ms": round(statistics.median(t[i]["ttft_ms"] for t in v["ttft"]), 1),
                 "ttft_ms_rounds": [t[i]["ttft_ms"] for t in v["ttft"]],
                 "prompt_tokens": v["ttft"][0][i]["prompt_tokens"], "cached_tokens": v["ttft"][0][i]["cached_tokens"]}
                for i in range(a.turns)]
        thr = [{"clients": c, "tok_s": round(statistics.median(t["tok_s"] for t in v["throughput"]
                                                               if t["clients"] == c), 1),
                "tok_s_rounds": [t["tok_s"] for t in v["throughput"] if t["clients"] == c]} for c in a.clients]
        res[f"versus_{k}"] = {"ttft": ttft, "throughput": thr, "runs": v}
    e, L = res["versus_edgeseq"], res["versus_llama_server"]
    print(f"{a.model} on {os.path.basename(gguf)}, edgeseq serving {os.path.basename(served)}: TTFT ms per turn, "
          f"medians of {a.rounds} interleaved rounds, edgeseq serve / llama-server (cached tokens, first round)")
    for x, y in zip(e["ttft"], L["ttft"]):
        print(f"{x['turn']:4d}  prompt {x['prompt_tokens']:5d} / {y['prompt_tokens']:5d}  {x['ttft_ms']:8.1f} "
              f"({x['cached_tokens']:4d})  {y['ttft_ms']:8.1f} ({y['cached_tokens']:4d})  "
              f"llama/edgeseq {y['ttft_ms'] / x['ttft_ms']:.2f}")
    for x, y in zip(e["throughput"], L["throughput"]):
        print(f"{x['clients']:2d} clients: edgeseq {x['tok_s']:7.1f} tok/s, llama-server {y['tok_s']:7.1f} tok/s, "
              f"edgeseq/llama {x['tok_s'] / y['tok_s']:.2f}")


def user_turns(n: int, words: int, byte_level: bool, seed: int = 0) -> list[str]:
    if byte_level:  # held-out Bible text, about `words` bytes a turn
        src = open(os.path.join(HERE, "..", "tests", "data", "kjv_heldout.txt"), encoding="utf-8").read()
        return [src[(seed * n + i) * words:(seed * n + i + 1) * words] for i in range(n)]
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(1, 1000)}" for _ in range(words)) for _ in range(n)]


class ChatTurns:
    """A conversation with growing history, one turn at a time: each prompt is every earlier prompt and reply
    (as it came) plus the new user words, through /v1/completions, streamed, greedy."""

    def __init__(self, server: Server, reply: int, byte_level: bool):
        self.server, self.reply, self.sep = server, reply, "" if byte_level else " "
        self.history, self.n = "", 0

    def turn(self, user: str) -> dict:
        prompt = self.history + (self.sep if self.history else "") + user
        r = self.server.stream({"prompt": prompt, "max_tokens": self.reply, "temperature": 0})
        self.n += 1
        self.history = prompt + r["text"]
        return {"turn": self.n, "ttft_ms": round(r["ttft"] * 1000, 1), "prompt_tokens": r["usage"]["prompt_tokens"],
                "cached_tokens": r["usage"]["prompt_tokens_details"]["cached_tokens"]}


def chat_ttft(server: Server, turns: list[str], reply: int, byte_level: bool) -> list[dict]:
    chat = ChatTurns(server, reply, byte_level)
    return [chat.turn(user) for user in turns]


def throughput(server: Server, clients: int, decode: int, byte_level: bool, seed: int = 0) -> dict:
    prompts = user_turns(clients, 16, byte_level, seed)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rs = list(pool.map(lambda ip: server.stream({"prompt": ip[1], "max_tokens": decode, "temperature": 1.0,
                                                     "seed": ip[0]}), enumerate(prompts)))
    wall = time.perf_counter() - t0
    tokens = sum(r["usage"]["completion_tokens"] for r in rs)
    return {"clients": clients, "tokens": tokens, "seconds": round(wall, 2), "tok_s": round(tokens / wall, 1),
            "ttft_ms_median": round(sorted(r["ttft"] for r in rs)[len(rs) // 2] * 1000, 1)}


BAD = [b"{not json", b"[1]", b'{"prompt": 5}', b'{"prompt": "a", "max_tokens": -1}', b'{"prompt": "a", "n": 99}',
       b'{"prompt": "a", "logprobs": 3}', b'{"prompt": "a", "tools": [1]}', b'{"prompt": "a", "temperature": "hot"}',
       b'{"prompt": "a", "model": "nope"}', b'{"prompt": "\\ud800"}', b'\xff\xfe', b'{"prompt": "a", "stop": [1]}']


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def load_run(server: Server, n: int, byte_level: bool, clients: int = 32) -> dict:
    import random

    words = user_turns(64, 64, byte_level)
    codes, lat, rss = {}, [], []
    lock = threading.Lock()

    def one(i):
        rng = random.Random(i)
        if rng.random() < 0.1:
            body, stream = rng.choice(BAD), False
        else:
            stream = rng.random() < 0.5
            prompt = rng.choice(words)[:rng.randrange(1, 64 if byte_level else 400)] or "a"
            body = json.dumps({"prompt": prompt, "max_tokens": rng.randrange(1, 48), "temperature": 0.8,
                               "seed": i, "stream": stream}).encode()
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        t0 = time.perf_counter()
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        c.close()
        with lock:
            codes[r.status] = codes.get(r.status, 0) + 1
            if r.status == 200:
                lat.append(time.perf_counter() - t0)
            if i % max(1, n // 10) == 0:
                rss.append(round(rss_mb(server.proc.pid)))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n)))
    lat.sort()
    return {"requests": n, "clients": clients, "seconds": round(time.perf_counter() - t0, 1), "codes": codes,
            "p50_ms": round(lat[len(lat) // 2] * 1000, 1), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1),
            "rss_mb": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--quant", default="int8")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--user-tokens", type=int, default=64)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="/tmp/edgeseq-bench")
    p.add_argument("--load", type=int, default=0, metavar="N", help="also the load run of N requests")
    p.add_argument("--out", default=None)
    p.add_argument("--llama-server", default=None, metavar="PATH",
                   help="also the same runs against this llama-server binary, both on one GGUF (token-id prompts)")
    p.add_argument("--rounds", type=int, default=3, help="with --llama-server: interleaved rounds (medians)")
    p.add_argument("--only-versus", action="store_true", help="with --llama-server: only the side-by-side runs")
    p.add_argument("--edgeseq-quant", default=None, metavar="Q", help="with --llama-server: edgeseq serves its "
                   "bundle of the checkpoint at Q (e.g. w8a8) instead of the GGUF llama-server runs")
    a = p.parse_args()
    if a.llama_server:
        res = {"model": a.model, "quant": a.quant, "cpus": os.cpu_count(), "args": vars(a)}
        versus_llama(a, res)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
        if a.only_versus:
            return
    bundle, byte_level = bundle_for(a.model, a.quant, a.work)
    extra = ["--threads", a.threads] if a.threads else []
    res = {"model": a.model, "quant": "f32" if a.model == "demo" else a.quant, "machine": platform.processor()
           or platform.machine(), "cpus": os.cpu_count(), "args": vars(a)}
    turns = user_turns(a.turns, a.user_tokens, byte_level)
    for label, ram in (("cache", 1024), ("no_cache", 0)):
        s = Server(bundle, "--parallel", max(a.clients), "--cache-ram", ram, *extra)
        try:
            s.stream({"prompt": user_turns(1, 8, byte_level)[0][::-1], "max_tokens": 4})  # warm-up, unrelated
            res[f"ttft_{label}"] = chat_ttft(s, turns, a.reply_tokens, byte_level)
            if label == "cache":
                s.stream({"prompt": "warm up", "max_tokens": 4})
                res["throughput"] = [throughput(s, c, a.decode, byte_level) for c in a.clients]

        finally:
            s.stop()
    if a.load:  # its own server, a 64 MB cache: once the cache is full, RSS must stay flat
        s = Server(bundle, "--parallel", 16, "--cache-ram", 64, *extra)
        try:
            res["load"] = load_run(s, a.load, byte_level)
        finally:
            s.stop()
    print(f"{a.model} ({res['quant']}), {res['cpus']} CPUs")
    print("turn  prompt  cached  TTFT ms (cache)  TTFT ms (no cache)")
    for w, wo in zip(res["ttft_cache"], res["ttft_no_cache"]):
        print(f"{w['turn']:4d}  {w['prompt_tokens']:6d}  {w['cached_tokens']:6d}  {w['ttft_ms']:15.1f}  "
              f"{wo['ttft_ms']:18.1f}")
    for t in res["throughput"]:
        print(f"{t['clients']:2d} clients: {t['tok_s']:7.1f} tok/s ({t['tokens']} tokens in {t['seconds']} s, "
              f"median TTFT {t['ttft_ms_median']} ms)")
    if "load" in res:
        L = res["load"]
        print(f"load: {L['requests']} requests from {L['clients']} clients in {L['seconds']} s, status codes "
              f"{L['codes']}, p50 {L['p50_ms']} ms, p99 {L['p99_ms']} ms, server RSS MB {L['rss_mb']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
