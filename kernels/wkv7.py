"""WKV-7: RWKV-7's generalized delta rule, per head, with a state S (N_v, N_k) per head.

    S_t = S_{t-1} · (diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ     w, a, b, k (N_k) · v (N_v)
    y_t = S_t · r_t                                         (N_v)

RWKV-7 feeds a = -kk, b = kk·iclr (kk the normalized key; iclr the in-context learning rate), so the
a bᵀ term removes part of what the state held along kk before v kᵀ writes the new value. Rows of S
are value channels, columns key channels: the reference's (H, N, N) layout, kept as the state.

`step` is one token with plain ops (no loop); `wkv` runs it over a call's tokens (a standard ONNX Scan
whose body is `step` when there are several). Inputs come shaped for broadcasting against S (b, H, N, N): columns
(b, [t,] H, N, 1) for a, v, r and rows (b, [t,] H, 1, N) for w, b, k; `column`/`row` reshape
(b, t, H·N) tensors into those.
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import GraphBuilder, Value


def column(b: GraphBuilder, x: Value, heads: int, size: int, time_axis: bool) -> Value:
    """(b, t, H·N) -> (b, t, H, N, 1), or (b, H, N, 1) when t = 1 and no time axis is wanted."""
    return x.reshape(0, 0, heads, size, 1) if time_axis else x.reshape(-1, heads, size, 1)


def row(b: GraphBuilder, x: Value, heads: int, size: int, time_axis: bool) -> Value:
    """(b, t, H·N) -> (b, t, H, 1, N), or (b, H, 1, N) when t = 1 and no time axis is wanted."""
    return x.reshape(0, 0, heads, 1, size) if time_axis else x.reshape(-1, heads, 1, size)


def step(S: Value, *, r: Value, w: Value, v: Value, a: Value, kb: Value) -> tuple[Value, Value]:
    """One token. S (b, H, N, N); r, v, a columns; w a row; kb (b, H, 2, N) the rows bb and k stacked.
    The two rank-1 updates are one MatMul of inner size 2: [S a | v] @ [bbᵀ; kᵀ] = (S a) bbᵀ + v kᵀ
    (ONNX Runtime broadcasts a column times a row as an outer product 2x slower for one sequence, 2x for 16).
    Returns (y (b, H, N, 1), new S)."""
    b = S.b
    S = S * w + b.concat(S @ a, v, axis=-1) @ kb  # S·diag(w) + (S a) bbᵀ + v kᵀ
    return S @ r, S


def wkv(S: Value, *, r: Value, w: Value, k: Value, v: Value, a: Value, bb: Value, one_token: bool):
    """Inputs as `step` takes them (k and bb as rows, stacked here once for all tokens), with the time axis
    at position 1 unless one_token. Returns (y (b, [t,] H, N, 1), final S)."""
    def body(S, r, w, v, a, kb):
        y, S = step(S, r=r, w=w, v=v, a=a, kb=kb)
        return [S], [y]

    kb = S.b.concat(bb, k, axis=-2)  # (b, [t,] H, 2, N)
    (S,), (y,) = S.b.recur(body, [S], [r, w, v, a, kb], one_token, name="wkv7")
    return y, S


def wkv7_ref(S: np.ndarray, r, w, k, v, a, bb):
    """numpy reference: S (b, H, N, N); the rest (b, t, H, N). Returns (y (b, t, H, N), final S)."""
    ys = []
    for t in range(r.shape[1]):
        S = (S * w[:, t, :, None, :] + (S @ a[:, t, :, :, None]) * bb[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append((S @ r[:, t, :, :, None])[..., 0])
    return np.stack(ys, axis=1), S
