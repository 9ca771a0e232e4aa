"""The gated delta rule (Gated DeltaNet: Yang, Kautz & Hatamizadeh 2024; Qwen3.5 and Qwen3-Next's linear
attention layers), per head, with a matrix state S (d_k, d_v) per head.

Symbols: b batch · t tokens · H state heads · dk key/query head dim · dv value head dim ·
g_t the log decay (a scalar per head, <= 0) · β_t the update rate in (0, 1).

    S'  = exp(g_t) · S_{t-1}                     decay first
    δ_t = β_t · (v_t − S'ᵀ k_t)                  (dv)  what S' predicts for k_t, corrected toward v_t
    S_t = S' + k_t δ_tᵀ                          (dk, dv)
    y_t = S_tᵀ q_t                               (dv)

Rows of S are key channels, columns value channels: the (H, dk, dv) layout of transformers'
`torch_recurrent_gated_delta_rule` and of ONNX Runtime's LinearAttention (`gated_delta` rule, whose
docstring writes the same update: S = e^g S + β k ⊗ (v − e^g Sᵀ k)), so a state moves between the
flavours unchanged. q and k come in L2-normalised and q already scaled (1/sqrt(dk)) by the caller.

`step` is one token with plain ops; `gdn` runs it over a call's tokens (the step itself for one token,
a standard ONNX Scan whose body is the step otherwise); `linear_attention` is the fused op. The step's
inputs are rows shaped for S (b, H, dk, dv): q, k (b, [t,] H, 1, dk), v (b, [t,] H, 1, dv), and
decay = exp(g), beta (b, [t,] H, 1, 1).
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import MS_DOMAIN, Value


def step(S: Value, *, q: Value, k: Value, v: Value, decay: Value, beta: Value) -> tuple[Value, Value]:
    """One token. S (b, H, dk, dv); q, k (b, H, 1, dk); v (b, H, 1, dv); decay, beta (b, H, 1, 1).
    Returns (y (b, H, 1, dv), new S)."""
    S = S * decay
    delta = (v - k @ S) * beta  # (b, H, 1, dv)
    S = S + k.transpose(0, 1, 3, 2) @ delta  # + k δᵀ
    return q @ S, S


def gdn(S: Value, *, q: Value, k: Value, v: Value, decay: Value, beta: Value, one_token: bool):
    """Inputs as `step` takes them, with the time axis at position 1 unless one_token.
    Returns (y (b, [t,] H, 1, dv), final S)."""
    def body(S, q, k, v, decay, beta):
        y, S = step(S, q=q, k=k, v=v, decay=decay, beta=beta)
        return [S], [y]

    (S,), (y,) = S.b.recur(body, [S], [q, k, v, decay, beta], one_token, name="gdn")
    return y, S


def linear_attention(q: Value, k: Value, v: Value, *, state: Value, log_decay: Value, beta: Value, heads: int,
                     scale: float) -> tuple[Value, Value]:
    """com.microsoft LinearAttention, rule gated_delta. Packed q, k (b, t, H·dk), v (b, t, H·dv),
    log_decay and beta (b, t, H), state (b, H, dk, dv). Returns (out (b, t, H·dv), new state)."""
    out, new_state = q.b.op("LinearAttention", q, k, v, state, log_decay, beta, outputs=2, domain=MS_DOMAIN,
                            update_rule="gated_delta", q_num_heads=heads, kv_num_heads=heads, scale=scale)
    return out, new_state


def gdn_ref(S: np.ndarray, q, k, v, g, beta):
    """numpy reference (float64): S (b, H, dk, dv); q, k (b, t, H, dk); v (b, t, H, dv); g, beta (b, t, H).
    Returns (y (b, t, H, dv), final S)."""
    ys = []
    for t in range(q.shape[1]):
        S = S * np.exp(g[:, t])[..., None, None]
        pred = np.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + np.einsum("bhk,bhv->bhkv", k[:, t], (v[:, t] - pred) * beta[:, t, :, None])
        ys.append(np.einsum("bhk,bhkv->bhv", q[:, t], S))
    return np.stack(ys, axis=1), S
