"""Diagonal linear recurrences: the selective scan of Mamba-1 and the SSD recurrence of Mamba-2.

    h_t = a_t * h_{t-1} + u_t          (elementwise; a_t broadcast over h)
    y_t = sum_n h_t[..., n, ...] * c_t  (contracted over the state axis n)

Three ways to build it: `step` (one token, plain ops, no loop), `scan` (any number of tokens, a
standard ONNX Scan whose body is the step: portable), and `linear_attention` (com.microsoft
LinearAttention, gated rule: S_t = exp(g_t) * S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgeseq.graph import MS_DOMAIN, GraphBuilder


def step(b: GraphBuilder, a: str, u: str, c: str, h: str, reduce_axis: int,
         names: tuple[str, str] | None = None) -> tuple[str, str]:
    """One token: a, u, c without a time axis. Returns (y, new_h), named `names` if given."""
    y_name, h_name = names or (None, None)
    h_new = b.op("Add", b.op("Mul", a, h), u, outputs=[h_name] if h_name else 1)
    y = b.op("ReduceSum", b.op("Mul", h_new, c), b.ints([reduce_axis]), keepdims=0, outputs=[y_name] if y_name else 1)
    return y, h_new


def scan(b: GraphBuilder, a: str, u: str, c: str, h: str, reduce_axis: int) -> tuple[str, str]:
    """a, u, c carry the time axis at position 1: (b, t, ...). Returns (y (b, t, ...), final h)."""
    name = b.fresh("scan_body")
    body = GraphBuilder({}, name=name, prefix=name + "/")
    f = TensorProto.FLOAT
    hb, ab, ub, cb = (body.input(n, f, None) for n in ("h_in", "a_t", "u_t", "c_t"))
    step(body, ab, ub, cb, hb, reduce_axis, names=("y_t", "h_out"))  # named outputs: no Identity per token
    body.output("h_out", "h_out", f, None)
    body.output("y_t", "y_t", f, None)
    graph = helper.make_graph(body.nodes, body.name, body.inputs, body.outputs, list(body.initializers.values()))
    h_final, y = b.op("Scan", h, a, u, c, outputs=2, body=graph, num_scan_inputs=3,
                      scan_input_axes=[1, 1, 1], scan_output_axes=[1])
    return y, h_final


def linear_attention(b: GraphBuilder, q: str, k: str, v: str, state: str, decay: str, q_heads: int,
                     kv_heads: int) -> tuple[str, str]:
    """Packed (b, t, heads*dim) q/k/v/decay, state (b, kv_heads, d_k, d_v). Returns (out, new_state)."""
    out, new_state = b.op("LinearAttention", q, k, v, state, decay, outputs=2, domain=MS_DOMAIN,
                          update_rule="gated", q_num_heads=q_heads, kv_num_heads=kv_heads, scale=1.0)
    return out, new_state


def scan_ref(a: np.ndarray, u: np.ndarray, c: np.ndarray, h: np.ndarray, reduce_axis: int):
    """numpy reference of `scan`: a, u, c (b, t, ...); h the state. Returns (y (b, t, ...), h)."""
    ys = []
    for t in range(u.shape[1]):
        h = a[:, t] * h + u[:, t]
        ys.append((h * c[:, t]).sum(axis=reduce_axis))
    return np.stack(ys, axis=1), h
