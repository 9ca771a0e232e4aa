"""RWKV-4's WKV: an exponentially decaying weighted average of past values, kept stable with a
running maximum of the exponents (the reference's aa / bb / pp state).

    wkv_t = (e^{p-q} aa + e^{u+k_t-q} v_t) / (e^{p-q} bb + e^{u+k_t-q}),   q = max(p, u + k_t)
    aa, bb, p <- e^{w+p-q'} aa + e^{k_t-q'} v_t,  e^{w+p-q'} bb + e^{k_t-q'},  q' = max(w + p, k_t)

u = time_first (the bonus of the current token), w = -exp(time_decay) (per channel, negative).
Everything is elementwise over the channels: (b, C).
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import Value


def step(aa: Value, bb: Value, pp: Value, *, k: Value, v: Value, u: Value, w: Value):
    """One token, (b, C) each. Returns (wkv, (aa, bb, pp))."""
    ww = u + k
    p = pp.maximum(ww)
    e1, e2 = (pp - p).exp(), (ww - p).exp()
    wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = ww.maximum(k)
    e1, e2 = (ww - p).exp(), (k - p).exp()
    return wkv, (e1 * aa + e2 * v, e1 * bb + e2, p)


def wkv(aa: Value, bb: Value, pp: Value, *, k: Value, v: Value, u: Value, w: Value, one_token: bool):
    """k, v (b, t, C); u, w values of the outer graph. Returns (wkv (b, t, C), aa, bb, pp)."""
    def body(aa, bb, pp, k, v):
        y, state = step(aa, bb, pp, k=k, v=v, u=u, w=w)
        return state, [y]

    (aa, bb, pp), (y,) = k.b.recur(body, [aa, bb, pp], [k, v], one_token, squeeze_time=True, name="wkv4")
    return y, aa, bb, pp


def wkv4_ref(k, v, aa, bb, pp, u, w):
    """numpy reference over (t, C) inputs; returns (wkv (t, C), aa, bb, pp)."""
    out = []
    for t in range(k.shape[0]):
        ww = u + k[t]
        p = np.maximum(pp, ww)
        e1, e2 = np.exp(pp - p), np.exp(ww - p)
        out.append((e1 * aa + e2 * v[t]) / (e1 * bb + e2))
        ww = w + pp
        p = np.maximum(ww, k[t])
        e1, e2 = np.exp(ww - p), np.exp(k[t] - p)
        aa, bb, pp = e1 * aa + e2 * v[t], e1 * bb + e2, p
    return np.stack(out), aa, bb, pp
