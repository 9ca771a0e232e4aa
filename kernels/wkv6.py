"""RWKV-6 ("Finch") WKV: v5.2's matrix state per head, with a decay that changes every token.

Per head (N = head size), for each token t with r_t, k_t, v_t of N and the decay w_t (N, 1):

    out_t = r_t · (u ⊙ k_tᵀ v_t + S_{t-1})
    S_t   = k_tᵀ v_t + w_t ⊙ S_{t-1}               w_t = exp(-exp(d_t)), d_t data dependent

S is (b, H, N, N) (key × value), as in kernels/wkv5.py. The one-token update is wkv5.step (its w
broadcasts, so a per-token (b, H, N, 1) decay fits as is); what changes is that w becomes a scanned
input of the Scan, and LinearAttention gets the per-token log-decay instead of a fixed one.

- `wkv`: v5.2's step over a call's tokens, w scanned with r, k and v (the portable prefill).
- `linear_attention`: com.microsoft LinearAttention (gated rule, per-key decay), with the same
  one-token shift as wkv5.linear_attention: the op sees k, v and log w of the previous token, so its
  state after token t is RWKV's S_{t-1}; the bonus is added outside and the last token's update is
  applied once at the end with w_T = exp(log w_T). log w = -exp(d) is computed directly, never as
  log(w), so strongly decaying channels cannot produce log(0).
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import Value
from edgeseq.kernels import wkv5


def wkv(s: Value, *, r: Value, k: Value, v: Value, w: Value, u: Value, one_token: bool) -> tuple[Value, Value]:
    """r, k, v (b, t, H, N); w (b, t, H, N, 1), the per-token decay; s (b, H, N, N); u (H, N, 1) a value
    of the outer graph. For one token the time axis is absent. Returns (out (b, t, H, N), new s)."""
    def body(s, r, k, v, w):
        y, s = wkv5.step(s, r=r, k=k, v=v, u=u, w=w)
        return [s], [y]

    (s,), (y,) = s.b.recur(body, [s], [r, k, v, w], one_token, name="wkv6")
    return y, s


def linear_attention(r: Value, k: Value, v: Value, *, state: Value, bonus: Value, log_decay: Value, heads: int,
                     size: int) -> tuple[Value, Value]:
    """Packed r, k, v, log_decay (b, t, H*N); state (b, H, N, N); bonus u (H, N, 1): wkv5's
    LinearAttention with the per-token decay. Returns (out (b, t, H*N), new state)."""
    decay_last = log_decay.gather([-1], axis=1).exp().reshape(0, heads, size, 1)
    return wkv5.linear_attention(r, k, v, state=state, bonus=bonus, log_decay=log_decay, decay_last=decay_last,
                                 heads=heads, size=size)


def wkv6_ref(r: np.ndarray, k: np.ndarray, v: np.ndarray, w: np.ndarray, s: np.ndarray, u: np.ndarray):
    """numpy reference: r, k, v, w (b, t, H, N); s (b, H, N, N); u (H, N, 1). Returns (out (b, t, H, N), s)."""
    ys = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(np.einsum("bhk,bhkv->bhv", r[:, t], u * kv + s))
        s = kv + w[:, t, :, :, None] * s
    return np.stack(ys, axis=1), s
