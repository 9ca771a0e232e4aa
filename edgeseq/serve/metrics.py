"""Counters and per-phase latencies, written as Prometheus text (exposition format 0.0.4) at GET /metrics."""
from __future__ import annotations

import threading
from collections import defaultdict

COUNTERS = {
    "prompt_tokens": "prompt tokens of admitted requests",
    "cached_tokens": "prompt tokens resumed from the state cache (not prefilled)",
    "generated_tokens": "tokens decoded",
    "cache_hits": "requests that resumed a cached state",
    "cache_misses": "requests prefilled from the initial state",
    "reply_ids_reused": "text prompts that took an earlier reply's own token ids for its text",
    "requests_done": "requests answered in full",
    "cancelled": "requests whose client went away before the end",
    "rejected_queue_full": "requests refused with 429 (queue full)",
}
PHASES = {
    "queue_wait": "seconds from arrival to admission",
    "prefill": "seconds per prefill slice",
    "ttft": "seconds from arrival to the first token",
    "decode_step": "seconds per batched decode step",
}
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict[str, float] = defaultdict(float)
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.hist = {p: [0] * (len(BUCKETS) + 1) for p in PHASES}
        self.sums = defaultdict(float)

    def add(self, name: str, n: float) -> None:
        with self.lock:
            self.counts[name] += n

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def observe(self, phase: str, seconds: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
            self.hist[phase][i] += 1
            self.sums[phase] += seconds

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        out = ["# HELP edgeseq_requests_total HTTP requests by endpoint and status",
               "# TYPE edgeseq_requests_total counter"]
        with self.lock:
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'edgeseq_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            for name, doc in COUNTERS.items():
                out += [f"# HELP edgeseq_{name}_total {doc}", f"# TYPE edgeseq_{name}_total counter",
                        f"edgeseq_{name}_total {self.counts[name]:g}"]
            for phase, doc in PHASES.items():
                m = f"edgeseq_{phase}_seconds"
                out += [f"# HELP {m} {doc}", f"# TYPE {m} histogram"]
                acc = 0
                for b, n in zip((*BUCKETS, "+Inf"), self.hist[phase]):
                    acc += n
                    out.append(f'{m}_bucket{{le="{b}"}} {acc}')
                out += [f"{m}_sum {self.sums[phase]:.6f}", f"{m}_count {acc}"]
        for name, (value, doc) in gauges.items():
            out += [f"# HELP edgeseq_{name} {doc}", f"# TYPE edgeseq_{name} gauge", f"edgeseq_{name} {value:g}"]
        return "\n".join(out) + "\n"
