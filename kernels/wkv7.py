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

`wkv_chunks` is the same recurrence over a call's tokens in chunks of CHUNK: within a chunk every token's
contribution is matrix products over the chunk (the WY form of the delta rule, below), and a Scan carries
S from chunk to chunk, so a 256-token prompt is 16 Scan iterations of a few MatMuls instead of 256 of the
one-token step. With γ_t = w_1 ⊙ … ⊙ w_t (per key channel, from the chunk's start) and u_t = S_{t-1} a_t:

    S_t = S_0 diag(γ_t) + Σ_{s≤t} (u_s b_sᵀ + v_s k_sᵀ) diag(γ_t / γ_s)
    u_t = S_0 ã_t + Σ_{s<t} u_s (b̂_s·ã_t) + v_s (k̂_s·ã_t)      ã = a ⊙ γ_{t-1}, b̂ = b / γ, k̂ = k / γ
    y_t = S_0 r̃_t + Σ_{s≤t} u_s (b̂_s·r̃_t) + v_s (k̂_s·r̃_t)      r̃ = r ⊙ γ

so U = (I - L_ab)⁻¹ (Ã S_0ᵀ + L_ak V) with L strictly lower triangular (nilpotent: the inverse is
(I + L)(I + L²)(I + L⁴)(I + L⁸) for CHUNK = 16), Y = (M_rb W1 + R̃) S_0ᵀ + ..., everything but the
products with S_0 computed for all chunks at once. RWKV-7's decay keeps log w in (-e^{-1/2}, 0), so over
16 tokens 1/γ stays below e^{9.7}: the factored products are safe in float32. Padding the last chunk with
w = 1 and zeros elsewhere leaves S as it was.
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


CHUNK = 16


def wkv_chunks(S: Value, *, r: Value, logw: Value, k: Value, v: Value, a: Value, bb: Value, heads: int,
               size: int) -> tuple[Value, Value]:
    """The recurrence over a call's tokens in chunks of CHUNK (the module's docstring). S (b, H, N, N);
    r, logw (log of the decay), k, v, a, bb (b, t, H·N). Returns (y (b, t, H·N), final S)."""
    b, C, H, N = r.b, CHUNK, heads, size
    i64 = lambda x: b.const(x, np.int64)  # noqa: E731
    t = r.dims(1, 2)
    pad = (i64(C) - t.mod(i64(C))).mod(i64(C))
    pads = b.concat(b.ints([0, 0, 0, 0]), pad, b.ints([0]), axis=0)  # (b, t, 6·H·N): t's end only
    x = b.op("Pad", b.concat(r, logw, k, v, a, bb, axis=-1), pads)  # w = 1 (log 0) and zeros: S unchanged
    x = x.reshape(0, -1, C, 6 * H, N).transpose(0, 1, 3, 2, 4)  # (b, chunks, 6·H, C, N)
    r, logw, k, v, a, bb = x.split([H] * 6, axis=2)  # each (b, chunks, H, C, N)
    cum = b.op("CumSum", logw, i64(3))  # log γ_t, from the chunk's start
    inv = (-cum).exp()
    at, rt = a * (cum - logw).exp(), r * cum.exp()  # ã, r̃
    bkh = b.concat(bb * inv, k * inv, axis=3)  # [b̂; k̂] (.., 2C, N)
    last = cum.slice(C - 1, C, axis=3)
    dec = (last - cum).exp()  # γ_C / γ_s
    bk_end = b.concat(bb * dec, k * dec, axis=3)  # [B̄; K̄]: how each token's rows reach the chunk's end
    lower = np.tril(np.ones((C, C), np.float32), -1)
    bkt = bkh.transpose(0, 1, 2, 4, 3)
    l_ab, l_ak = ((at @ bkt) * b.const(np.concatenate([lower, lower], 1))).split([C, C], axis=-1)
    m_rb, m_rk = ((rt @ bkt) * b.const(np.concatenate([lower + np.eye(C, dtype=np.float32)] * 2, 1))).split(
        [C, C], axis=-1)
    eye = b.const(np.eye(C, dtype=np.float32))
    inv_l, power = eye + l_ab, l_ab  # (I - L)⁻¹ = (I + L)(I + L²)(I + L⁴)(I + L⁸)
    for _ in range(int(np.log2(C)) - 1):
        power = power @ power
        inv_l = inv_l @ (eye + power)
    w1, w2 = inv_l @ at, inv_l @ (l_ak @ v)  # U = W1 S_0ᵀ + W2
    wq = b.concat(w1, m_rb @ w1 + rt, axis=3)  # [W1; Q1] (.., 2C, N): one product with S_0ᵀ
    wq0 = b.concat(w2, m_rb @ w2 + m_rk @ v, axis=3)  # [W2; Q2]
    g_end = last.exp()  # γ_C (.., 1, N)

    def body(S, wq, wq0, v, bk_end, g_end):
        u, y = (wq @ S.transpose(0, 1, 3, 2) + wq0).split([C, C], axis=2)
        S = S * g_end + S.b.concat(u, v, axis=2).transpose(0, 1, 3, 2) @ bk_end
        return [S], [y]

    (S,), (y,) = b.scan(body, [S], [wq, wq0, v, bk_end, g_end], name="wkv7_chunks")
    y = y.transpose(0, 1, 3, 2, 4).reshape(0, -1, H * N)  # (b, chunks·C, H·N)
    return y.slice(0, t, axis=1), S


def wkv7_ref(S: np.ndarray, r, w, k, v, a, bb):
    """numpy reference: S (b, H, N, N); the rest (b, t, H, N). Returns (y (b, t, H, N), final S)."""
    ys = []
    for t in range(r.shape[1]):
        S = (S * w[:, t, :, None, :] + (S @ a[:, t, :, :, None]) * bb[:, t, :, None, :]
             + v[:, t, :, :, None] * k[:, t, :, None, :])
        ys.append((S @ r[:, t, :, :, None])[..., 0])
    return np.stack(ys, axis=1), S
