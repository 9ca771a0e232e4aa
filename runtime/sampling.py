"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingOptions:
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off (CTRL-style: divide positive logits, multiply negative)
    seed: int | None = None
    min_p: float = 0.0  # 0: off; else drop tokens less likely than min_p x the likeliest (llama.cpp's min-p)


class Sampler:
    def __init__(self, opts: SamplingOptions):
        self.opts = opts
        self.rng = np.random.default_rng(opts.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        o = self.opts
        x = np.array(logits, dtype=np.float64)
        if o.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < x.size)]
            v = x[seen]
            x[seen] = np.where(v > 0, v / o.repetition_penalty, v * o.repetition_penalty)
        if o.temperature <= 0:
            return int(np.argmax(x))
        x = x / o.temperature
        if 0 < o.top_k < x.size:
            kth = np.partition(x, -o.top_k)[-o.top_k]
            x[x < kth] = -np.inf
        x = x - np.max(x)
        p = np.exp(x)
        p /= p.sum()
        if o.min_p > 0.0:
            p[p < o.min_p * p.max()] = 0.0
            p /= p.sum()
        if o.top_p < 1.0:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, o.top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))
