"""WKV-7: RWKV-7's generalized delta rule, per head, with a state S (N_v, N_k) per head.

    S_t = S_{t-1} · (diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ     w, a, b, k (N_k) · v (N_v)
    y_t = S_t · r_t                                         (N_v)

RWKV-7 feeds a = -kk, b = kk·iclr (kk the normalized key; iclr the in-context learning rate), so the
a bᵀ term removes part of what the state held along kk before v kᵀ writes the new value. Rows of S
are value channels, columns key channels: the reference's (H, N, N) layout, kept as the state.

`step` is one token with plain ops (no loop); `scan` is any number of tokens as a standard ONNX Scan
whose body is `step`. Inputs come shaped for broadcasting against S (b, H, N, N): columns
(b, [t,] H, N, 1) for a, v, r and rows (b, [t,] H, 1, N) for w, b, k; `column`/`row` reshape
(b, t, H·N) tensors into those.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgeseq.graph import GraphBuilder


def column(b: GraphBuilder, x: str, heads: int, size: int, time_axis: bool) -> str:
    """(b, t, H·N) -> (b, t, H, N, 1), or (b, H, N, 1) when t = 1 and no time axis is wanted."""
    return b.op("Reshape", x, b.ints([0, 0, heads, size, 1] if time_axis else [-1, heads, size, 1]))


def row(b: GraphBuilder, x: str, heads: int, size: int, time_axis: bool) -> str:
    """(b, t, H·N) -> (b, t, H, 1, N), or (b, H, 1, N) when t = 1 and no time axis is wanted."""
    return b.op("Reshape", x, b.ints([0, 0, heads, 1, size] if time_axis else [-1, heads, 1, size]))


def step(b: GraphBuilder, S: str, r: str, w: str, k: str, v: str, a: str, bb: str,
         names: tuple[str, str] | None = None) -> tuple[str, str]:
    """One token. S (b, H, N, N); r, v, a columns; w, k, bb rows. Returns (y (b, H, N, 1), new S)."""
    y_name, s_name = names or (None, None)
    decayed = b.op("Mul", S, w)  # S · diag(w): each key column scaled by its decay
    removed = b.op("Mul", b.op("MatMul", S, a), bb)  # (S a) bᵀ
    written = b.op("Mul", v, k)  # v kᵀ
    s_new = b.op("Add", b.op("Add", decayed, removed), written, outputs=[s_name] if s_name else 1)
    y = b.op("MatMul", s_new, r, outputs=[y_name] if y_name else 1)
    return y, s_new


def scan(b: GraphBuilder, S: str, r: str, w: str, k: str, v: str, a: str, bb: str) -> tuple[str, str]:
    """Inputs with the time axis at position 1. Returns (y (b, t, H, N, 1), final S)."""
    name = b.fresh("wkv7_body")
    body = GraphBuilder({}, name=name, prefix=name + "/")  # names unique model-wide (SSA across bodies)
    f = TensorProto.FLOAT
    sb, rb, wb, kb, vb, ab, bbb = (body.input(n, f, None) for n in ("s_in", "r_t", "w_t", "k_t", "v_t", "a_t", "b_t"))
    step(body, sb, rb, wb, kb, vb, ab, bbb, names=("y_t", "s_out"))
    body.output("s_out", "s_out", f, None)
    body.output("y_t", "y_t", f, None)
    graph = helper.make_graph(body.nodes, body.name, body.inputs, body.outputs, list(body.initializers.values()))
    s_final, y = b.op("Scan", S, r, w, k, v, a, bb, outputs=2, body=graph, num_scan_inputs=6,
                      scan_input_axes=[1] * 6, scan_output_axes=[1])
    return y, s_final


def wkv7_ref(S: np.ndarray, r, w, k, v, a, bb):
    """numpy reference: S (b, H, N, N); the rest (b, t, H, N). Returns (y (b, t, H, N), final S)."""
    ys = []
    for t in range(r.shape[1]):
        S = (S * w[:, t, :, None, :] + (S @ a[:, t, :, :, None]) * bb[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append((S @ r[:, t, :, :, None])[..., 0])
    return np.stack(ys, axis=1), S
