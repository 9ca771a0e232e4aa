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
            keep = _nucleus(p, o.top_p)
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        # what Generator.choice(p.size, p=p) does, less its checks of p (finite, >= 0, sums to 1: true by
        # construction here): the same draw from the same stream
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        return int(cdf.searchsorted(self.rng.random(), side="right"))


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The likeliest tokens whose probabilities first reach `top_p`, likeliest first: the head of a full
    descending sort, found by sorting only the k largest (k grown until they hold top_p)."""
    k = min(p.size, 256)
    while True:
        top = np.argpartition(-p, k - 1)[:k] if k < p.size else np.arange(p.size)
        top = top[np.argsort(-p[top], kind="stable")]
        cum = np.cumsum(p[top])
        if cum[-1] >= top_p or k == p.size:
            return top[: int(np.searchsorted(cum, top_p) + 1)]
        k = min(p.size, k * 8)
