"""RWKV-5 WKV: per-head matrix state with a per-(head, key channel) decay and a bonus (v5.0/5.1's
per-head decay and bonus arrive broadcast to (H, N, 1), so the kernel is the same for every version).

Per head (N = head size), for each token t with r_t, k_t, v_t of N:

    out_t = r_t · (u ⊙ k_tᵀ v_t + S_{t-1})        (u, w: (N, 1), broadcast over value columns)
    S_t   = k_tᵀ v_t + w ⊙ S_{t-1}                 S: (N_key, N_value), w = exp(-exp(time_decay))

S is kept (b, H, N, N), ONNX Runtime LinearAttention's (H, d_k, d_v) layout, so both flavours share
one state layout.

Three ways to build it:
- `step`: one token, plain ops; `wkv` runs it over a call's tokens (the step itself for one token, a
  standard ONNX Scan whose body is `step` otherwise: the portable prefill).
- `linear_attention`: com.microsoft LinearAttention, gated rule, per-key decay log(w). That op reads
  the state *after* the token's update (o_t = q_t · S'_t), while RWKV reads it *before*. Feeding the
  op the previous token's k and v (k'_t = k_{t-1}, v'_t = v_{t-1}; k'_0 = 0 with decay 1) makes its
  state S'_t equal RWKV's S_{t-1}, so o_t = r_t · S_{t-1} exactly; the current token enters through
  the bonus term r_t·(u ⊙ k_t)ᵀ v_t added outside, and one plain update S_T = w ⊙ S'_T + k_Tᵀ v_T gives
  the state to return. No division by w (which underflows for strongly decaying channels).
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import MS_DOMAIN, Value


def step(s: Value, *, r: Value, k: Value, v: Value, u: Value, w: Value) -> tuple[Value, Value]:
    """One token: r, k, v (b, H, N); s (b, H, N, N); u, w broadcast to (H, N, 1). Returns (out (b, H, N), new s)."""
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # (b, H, N, N)
    y = (r.unsqueeze(-1) * (u * kv + s)).sum(-2, keepdims=False)
    return y, kv + w * s


def wkv(s: Value, *, r: Value, k: Value, v: Value, u: Value, w: Value, one_token: bool) -> tuple[Value, Value]:
    """r, k, v (b, t, H, N), or (b, H, N) for one token; u, w values of the outer graph (per-token w: wkv6)."""
    def body(s, r, k, v):
        y, s = step(s, r=r, k=k, v=v, u=u, w=w)
        return [s], [y]

    (s,), (y,) = s.b.recur(body, [s], [r, k, v], one_token, name="wkv5")
    return y, s


def linear_attention(r: Value, k: Value, v: Value, *, state: Value, bonus: Value, log_decay: Value,
                     decay_last: Value, heads: int, size: int) -> tuple[Value, Value]:
    """Packed r, k, v and log_decay (b, t, H*N); state (b, H, N, N); bonus u (H, N, 1); decay_last, the
    last token's decay w, broadcastable to (b, H, N, 1). Returns (out (b, t, H*N), new state). RWKV-5
    passes its constant decay expanded over the tokens; RWKV-6 its per-token one.

    LinearAttention reads the state after adding the current token; RWKV reads it before. So the op is
    fed the previous token's k, v and log w (zeros first: decay 1 keeps the incoming state), which makes
    its output r·S_{t-1}; the bonus r·(u ⊙ k)ᵀv is added outside, and the last token's update is applied
    to the state the op returns."""
    b = r.b
    zero_row = k.gather([0], axis=1) * 0.0  # (b, 1, H*N) zeros

    def shift(x):  # (b, t, H*N) -> previous token's row, zeros first
        return b.concat(zero_row, x, axis=1).slice(0, -1, axis=1)

    out, s_mid = b.op("LinearAttention", r, shift(k), shift(v), state, shift(log_decay), outputs=2,
                      domain=MS_DOMAIN, update_rule="gated", q_num_heads=heads, kv_num_heads=heads, scale=1.0)
    # bonus: r_t·(u ⊙ k_t)ᵀ v_t = (sum_n r u k over the head) * v_t
    coef = (r * k * bonus.reshape(heads * size)).reshape(0, 0, heads, size).sum(-1)  # (b, t, H, 1)
    out = out + (coef * v.reshape(0, 0, heads, size)).reshape(0, 0, heads * size)
    # the op's state is S_{T-1} (RWKV's state before the last token): apply the last token's update
    k_last = k.gather([-1], axis=1).reshape(0, heads, size, 1)
    v_last = v.gather([-1], axis=1).reshape(0, heads, 1, size)
    return out, k_last * v_last + decay_last * s_mid


def wkv5_ref(r: np.ndarray, k: np.ndarray, v: np.ndarray, s: np.ndarray, u: np.ndarray, w: np.ndarray):
    """numpy reference: r, k, v (b, t, H, N); s (b, H, N, N); u, w (H, N, 1). Returns (out (b, t, H, N), s)."""
    ys = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(np.einsum("bhk,bhkv->bhv", r[:, t], u * kv + s))
        s = kv + w * s
    return np.stack(ys, axis=1), s
