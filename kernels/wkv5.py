"""RWKV-5 WKV: per-head matrix state with a per-(head, key channel) decay and a bonus (v5.0/5.1's
per-head decay and bonus arrive broadcast to (H, N, 1), so the kernel is the same for every version).

Per head (N = head size), for each token t with r_t, k_t, v_t of N:

    out_t = r_t · (u ⊙ k_tᵀ v_t + S_{t-1})        (u, w: (N, 1), broadcast over value columns)
    S_t   = k_tᵀ v_t + w ⊙ S_{t-1}                 S: (N_key, N_value), w = exp(-exp(time_decay))

S is kept (b, H, N, N), ONNX Runtime LinearAttention's (H, d_k, d_v) layout, so both flavours share
one state layout.

Three ways to build it:
- `step`: one token, plain ops (the step graph; also the Scan body).
- `scan`: any number of tokens, a standard ONNX Scan whose body is `step` (portable prefill).
- `linear_attention`: com.microsoft LinearAttention, gated rule, per-key decay log(w). That op reads
  the state *after* the token's update (o_t = q_t · S'_t), while RWKV reads it *before*. Feeding the
  op the previous token's k and v (k'_t = k_{t-1}, v'_t = v_{t-1}; k'_0 = 0 with decay 1) makes its
  state S'_t equal RWKV's S_{t-1}, so o_t = r_t · S_{t-1} exactly; the current token enters through
  the bonus term r_t·(u ⊙ k_t)ᵀ v_t added outside, and one plain update S_T = w ⊙ S'_T + k_Tᵀ v_T gives
  the state to return. No division by w (which underflows for strongly decaying channels).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgeseq.graph import MS_DOMAIN, GraphBuilder


def step(b: GraphBuilder, r: str, k: str, v: str, s: str, u: str, w: str,
         names: tuple[str, str] | None = None) -> tuple[str, str]:
    """One token: r, k, v (b, H, N); s (b, H, N, N); u, w (H, N, 1) values. Returns (out (b, H, N), new s)."""
    y_name, s_name = names or (None, None)
    kv = b.op("Mul", b.op("Unsqueeze", k, b.ints([-1])), b.op("Unsqueeze", v, b.ints([-2])))  # (b, H, N, N)
    both = b.op("Add", b.op("Mul", u, kv), s)
    y = b.op("ReduceSum", b.op("Mul", b.op("Unsqueeze", r, b.ints([-1])), both), b.ints([-2]), keepdims=0,
             outputs=[y_name] if y_name else 1)
    s_new = b.op("Add", kv, b.op("Mul", w, s), outputs=[s_name] if s_name else 1)
    return y, s_new


def scan(b: GraphBuilder, r: str, k: str, v: str, s: str, u: str, w: str) -> tuple[str, str]:
    """r, k, v (b, t, H, N); u, w are values of the outer graph (the body reads them by name)."""
    name = b.fresh("wkv5_body")
    body = GraphBuilder({}, name=name, prefix=name + "/")  # names unique model-wide (SSA across bodies)
    f = TensorProto.FLOAT
    sb, rb, kb, vb = (body.input(n, f, None) for n in ("s_in", "r_t", "k_t", "v_t"))
    step(body, rb, kb, vb, sb, u, w, names=("y_t", "s_out"))
    body.output("s_out", "s_out", f, None)
    body.output("y_t", "y_t", f, None)
    graph = helper.make_graph(body.nodes, body.name, body.inputs, body.outputs, list(body.initializers.values()))
    s_final, y = b.op("Scan", s, r, k, v, outputs=2, body=graph, num_scan_inputs=3,
                      scan_input_axes=[1, 1, 1], scan_output_axes=[1])
    return y, s_final


def linear_attention(b: GraphBuilder, r: str, k: str, v: str, s: str, u: str, log_w: str, w_last: str,
                     heads: int, size: int) -> tuple[str, str]:
    """Packed r, k, v and log_w (b, t, H*N); s (b, H, N, N); u (H, N, 1); w_last, the last token's
    decay, broadcastable to (b, H, N, 1). Returns (out (b, t, H*N), new s). RWKV-5 passes its constant
    decay expanded over the tokens; RWKV-6 its per-token one.

    LinearAttention reads the state after adding the current token; RWKV reads it before. So the op is
    fed the previous token's k, v and log w (zeros first: decay 1 keeps the incoming state), which makes
    its output r·S_{t-1}; the bonus r·(u ⊙ k)ᵀv is added outside, and the last token's update is applied
    to the state the op returns."""
    zero_row = b.op("Mul", b.op("Gather", k, b.ints([0]), axis=1), b.const(0.0))  # (b, 1, H*N) zeros

    def shift(x):  # (b, t, H*N) -> previous token's row, zeros first
        return b.op("Slice", b.op("Concat", zero_row, x, axis=1), b.ints([0]), b.ints([-1]), b.ints([1]))

    out, s_mid = b.op("LinearAttention", r, shift(k), shift(v), s, shift(log_w), outputs=2, domain=MS_DOMAIN,
                      update_rule="gated", q_num_heads=heads, kv_num_heads=heads, scale=1.0)
    # bonus: r_t·(u ⊙ k_t)ᵀ v_t = (sum_n r u k over the head) * v_t
    hd = b.ints([0, 0, heads, size])
    ruk = b.op("Mul", b.op("Mul", r, k), b.op("Reshape", u, b.ints([heads * size])))
    coef = b.op("ReduceSum", b.op("Reshape", ruk, hd), b.ints([-1]), keepdims=1)  # (b, t, H, 1)
    bonus = b.op("Reshape", b.op("Mul", coef, b.op("Reshape", v, hd)), b.ints([0, 0, heads * size]))
    out = b.op("Add", out, bonus)
    # the op's state is S_{T-1} (RWKV's state before the last token): apply the last token's update
    last = b.ints([-1])
    k_last = b.op("Reshape", b.op("Gather", k, last, axis=1), b.ints([0, heads, size, 1]))
    v_last = b.op("Reshape", b.op("Gather", v, last, axis=1), b.ints([0, heads, 1, size]))
    s_new = b.op("Add", b.op("Mul", k_last, v_last), b.op("Mul", w_last, s_mid))
    return out, s_new


def wkv5_ref(r: np.ndarray, k: np.ndarray, v: np.ndarray, s: np.ndarray, u: np.ndarray, w: np.ndarray):
    """numpy reference: r, k, v (b, t, H, N); s (b, H, N, N); u, w (H, N, 1). Returns (out (b, t, H, N), s)."""
    ys = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(np.einsum("bhk,bhkv->bhv", r[:, t], u * kv + s))
        s = kv + w * s
    return np.stack(ys, axis=1), s
