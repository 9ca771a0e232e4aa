"""Diagonal linear recurrences: the selective scan of Mamba-1 and the SSD recurrence of Mamba-2.

    h_t = a_t * h_{t-1} + u_t          (elementwise; a_t broadcast over h)
    y_t = sum_n h_t[..., n, ...] * c_t  (contracted over the state axis n)

`step` is the one token; `selective_scan` runs it over the tokens of a call (the step itself for one
token, a standard ONNX Scan whose body is the step otherwise: portable); `linear_attention` is the
fused form (com.microsoft LinearAttention, gated rule: S_t = exp(g_t) * S_{t-1} + k_t v_t^T,
o_t = scale * q_t^T S_t).
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import MS_DOMAIN, Value


def step(h: Value, *, a: Value, u: Value, c: Value, reduce_axis: int) -> tuple[Value, Value]:
    """One token, no time axis. Returns (y, new h)."""
    h = a * h + u
    return (h * c).sum(reduce_axis, keepdims=False), h


def selective_scan(h: Value, *, a: Value, u: Value, c: Value, reduce_axis: int, one_token: bool):
    """a, u, c (b, t, ...) with the time axis at 1; h the state. Returns (y (b, t, ...), final h)."""
    def body(h, a, u, c):
        y, h = step(h, a=a, u=u, c=c, reduce_axis=reduce_axis)
        return [h], [y]

    (h,), (y,) = h.b.recur(body, [h], [a, u, c], one_token, squeeze_time=True, name="ssm")
    return y, h


def linear_attention(q: Value, k: Value, v: Value, *, state: Value, log_decay: Value, q_heads: int,
                     kv_heads: int) -> tuple[Value, Value]:
    """Packed (b, t, heads*dim) q/k/v/log_decay, state (b, kv_heads, d_k, d_v). Returns (out, new_state)."""
    out, new_state = q.b.op("LinearAttention", q, k, v, state, log_decay, outputs=2, domain=MS_DOMAIN,
                            update_rule="gated", q_num_heads=q_heads, kv_num_heads=kv_heads, scale=1.0)
    return out, new_state


def scan_ref(a: np.ndarray, u: np.ndarray, c: np.ndarray, h: np.ndarray, reduce_axis: int):
    """numpy reference of `selective_scan`: a, u, c (b, t, ...); h the state. Returns (y (b, t, ...), h)."""
    ys = []
    for t in range(u.shape[1]):
        h = a[:, t] * h + u[:, t]
        ys.append((h * c[:, t]).sum(axis=reduce_axis))
    return np.stack(ys, axis=1), h
