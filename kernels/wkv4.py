"""RWKV-4's WKV: an exponentially decaying weighted average of past values, kept stable with a
running maximum of the exponents (the reference's aa / bb / pp state).

    wkv_t = (e^{p-q} aa + e^{u+k_t-q} v_t) / (e^{p-q} bb + e^{u+k_t-q}),   q = max(p, u + k_t)
    aa, bb, p <- e^{w+p-q'} aa + e^{k_t-q'} v_t,  e^{w+p-q'} bb + e^{k_t-q'},  q' = max(w + p, k_t)

u = time_first (the bonus of the current token), w = -exp(time_decay) (per channel, negative).
Everything is elementwise over the channels: (b, C).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgeseq.graph import GraphBuilder


def step(b: GraphBuilder, k: str, v: str, aa: str, bb: str, pp: str, u: str, w: str,
         names: tuple[str, str, str, str] | None = None):
    """One token. Returns (wkv, aa, bb, pp), the outputs named `names` if given."""
    n_wkv, n_aa, n_bb, n_pp = names or (None,) * 4

    def out(name):
        return [name] if name else 1

    ww = b.op("Add", u, k)
    p = b.op("Max", pp, ww)
    e1, e2 = b.op("Exp", b.op("Sub", pp, p)), b.op("Exp", b.op("Sub", ww, p))
    num = b.op("Add", b.op("Mul", e1, aa), b.op("Mul", e2, v))
    den = b.op("Add", b.op("Mul", e1, bb), e2)
    wkv = b.op("Div", num, den, outputs=out(n_wkv))
    ww = b.op("Add", w, pp)
    p2 = b.op("Max", ww, k, outputs=out(n_pp))
    e1, e2 = b.op("Exp", b.op("Sub", ww, p2)), b.op("Exp", b.op("Sub", k, p2))
    aa2 = b.op("Add", b.op("Mul", e1, aa), b.op("Mul", e2, v), outputs=out(n_aa))
    bb2 = b.op("Add", b.op("Mul", e1, bb), e2, outputs=out(n_bb))
    return wkv, aa2, bb2, p2


def scan(b: GraphBuilder, k: str, v: str, aa: str, bb: str, pp: str, u: str, w: str):
    """k, v: (b, t, C). A standard Scan whose body is `step` (u and w are read from the outer graph).
    Returns (wkv (b, t, C), aa, bb, pp)."""
    name = b.fresh("wkv4_body")
    body = GraphBuilder({}, name=name, prefix=name + "/")
    f = TensorProto.FLOAT
    ins = [body.input(n, f, None) for n in ("aa_in", "bb_in", "pp_in", "k_t", "v_t")]
    step(body, ins[3], ins[4], ins[0], ins[1], ins[2], u, w, names=("wkv_t", "aa_out", "bb_out", "pp_out"))
    for n in ("aa_out", "bb_out", "pp_out", "wkv_t"):
        body.output(n, n, f, None)
    graph = helper.make_graph(body.nodes, body.name, body.inputs, body.outputs, list(body.initializers.values()))
    aa2, bb2, pp2, wkv = b.op("Scan", aa, bb, pp, k, v, outputs=4, body=graph, num_scan_inputs=2,
                              scan_input_axes=[1, 1], scan_output_axes=[1])
    return wkv, aa2, bb2, pp2


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
