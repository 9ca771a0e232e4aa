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
        self._x: np.ndarray | None = None  # the working copy of the logits, reused token after token
        self._s: np.ndarray | None = None  # scratch for top-k and top-p's partial sorts

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        o = self.opts
        penalty = o.repetition_penalty != 1.0 and history
        if o.temperature <= 0 and not penalty:
            return int(np.argmax(logits))
        # the rules below write into a copy; one buffer per sampler, so no token allocates a vocabulary's
        # worth of memory (a server's malloc then has nothing of that size to fragment its heap with)
        src = np.asarray(logits).reshape(-1)
        if self._x is None or self._x.size != src.size:
            self._x, self._s = np.empty(src.size, np.float32), np.empty(src.size, np.float32)
        x = self._x
        np.copyto(x, src, casting="same_kind")
        if penalty:
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < x.size)]
            v = x[seen]
            x[seen] = np.where(v > 0, v / o.repetition_penalty, v * o.repetition_penalty)
        if o.temperature <= 0:
            return int(np.argmax(x))
        if o.temperature != 1.0:
            x /= np.float32(o.temperature)
        ids = None  # top-k: the rules below see only the k candidates (ascending ids: choice()'s order)
        if 0 < o.top_k < x.size:
            ids = np.flatnonzero(x >= _kth_largest(x, o.top_k, self._s))
            x = x[ids]
        # weights = exp(x - max): the probabilities times their sum (the likeliest weighs 1); float32 (the
        # float64 exp costs 6x; its rounding moves a draw only where the uniform lands within ~1e-7 of an edge)
        w = np.subtract(x, x.max(), out=x)
        np.exp(w, out=w)
        if o.min_p > 0.0:
            w[w < o.min_p] = 0.0  # p < min_p * p_max, with p_max's weight 1
        if o.top_p < 1.0:
            keep = np.sort(_nucleus(w, o.top_p, self._s))  # index order: the draw walks the tokens as choice() does
            cum = np.cumsum(w[keep], dtype=np.float64)
            i = int(keep[min(int(cum.searchsorted(self.rng.random() * cum[-1], side="right")), keep.size - 1)])
        else:
            i = _draw(w, self.rng.random())
        return i if ids is None else int(ids[i])


_BLOCK = 256


def _draw(w: np.ndarray, u: float) -> int:
    """The first token whose running sum of weights passes u x the total: what Generator.choice(w.size,
    p=w/w.sum()) draws for the uniform u, found through sums of blocks of 256 (a cumulative sum of the whole
    vocabulary costs more than the rest of the sampler)."""
    starts = np.arange(0, w.size, _BLOCK)
    whole = w.size // _BLOCK
    sums = np.empty(starts.size)
    # float64 sums through the reduction's own small buffers (reduceat with dtype= casts all of w at once: a
    # vocabulary x 8 bytes allocated per token)
    sums[:whole] = w[:whole * _BLOCK].reshape(whole, _BLOCK).sum(axis=1, dtype=np.float64)
    if whole < starts.size:
        sums[whole] = w[whole * _BLOCK:].sum(dtype=np.float64)
    blocks = np.cumsum(sums)
    target = u * blocks[-1]
    b = min(int(blocks.searchsorted(target, side="right")), blocks.size - 1)
    base = blocks[b - 1] if b else 0.0
    cum = base + np.cumsum(w[starts[b]:starts[b] + _BLOCK], dtype=np.float64)
    i = int(cum.searchsorted(target, side="right"))
    if i == cum.size:  # the block's own sum rounded below the running total's: its last token that weighs
        i = int(np.flatnonzero(w[starts[b]:starts[b] + _BLOCK])[-1])
    return int(starts[b] + i)


def _kth_largest(x: np.ndarray, k: int, scratch: np.ndarray):
    """The k-th largest value of x, partitioned in a scratch copy (np.partition would allocate one)."""
    s = scratch[:x.size]
    np.copyto(s, x)
    s.partition(x.size - k)
    return s[x.size - k]


def _nucleus(w: np.ndarray, top_p: float, scratch: np.ndarray) -> np.ndarray:
    """The likeliest tokens whose probabilities first reach `top_p` (w: the weights, probabilities times their
    sum), likeliest first, ties in id order: the head of a full stable descending sort, found by sorting only
    the tokens at or above the k-th largest weight (k grown until they hold top_p)."""
    need = top_p * np.sum(w, dtype=np.float64)
    k = min(w.size, 256)
    while True:
        if k < w.size:
            t = _kth_largest(w, k, scratch)
            top = np.flatnonzero(w >= t) if t > 0 else np.flatnonzero(w > 0)
        else:
            top = np.arange(w.size)
        top = top[np.argsort(-w[top], kind="stable")]
        cum = np.cumsum(w[top], dtype=np.float64)
        if cum[-1] >= need or k == w.size:
            return top[: int(np.searchsorted(cum, need) + 1)]
        k = min(w.size, k * 8)
