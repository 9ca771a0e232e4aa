"""RWKV-6 ("Finch") WKV: v5.2's matrix state per head, with a decay that changes every token.

Per head (N = head size), for each token t with r_t, k_t, v_t of N and the decay w_t (N, 1):

    out_t = r_t · (u ⊙ k_tᵀ v_t + S_{t-1})
    S_t   = k_tᵀ v_t + w_t ⊙ S_{t-1}               w_t = exp(-exp(d_t)), d_t data dependent

S is (b, H, N, N) (key × value), as in kernels/wkv5.py. The one-token update is wkv5.step (its w
broadcasts, so a per-token (b, H, N, 1) decay fits as is); what changes is that w becomes a scanned
input of the Scan, and LinearAttention gets the per-token log-decay instead of a fixed one.

- `scan`: standard ONNX Scan over r, k, v and w (portable prefill).
- `linear_attention`: com.microsoft LinearAttention (gated rule, per-key decay), with the same
  one-token shift as wkv5.linear_attention: the op sees k, v and log w of the previous token, so its
  state after token t is RWKV's S_{t-1}; the bonus is added outside and the last token's update is
  applied once at the end with w_T = exp(log w_T). log w = -exp(d) is computed directly, never as
  log(w), so strongly decaying channels cannot produce log(0).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv5
from edgeseq.kernels.wkv5 import step  # noqa: F401  (the one-token update is v5.2's)


def scan(b: GraphBuilder, r: str, k: str, v: str, w: str, s: str, u: str) -> tuple[str, str]:
    """r, k, v (b, t, H, N); w (b, t, H, N, 1); s (b, H, N, N); u (H, N, 1) a value of the outer graph.
    Returns (out (b, t, H, N), new s)."""
    name = b.fresh("wkv6_body")
    body = GraphBuilder({}, name=name, prefix=name + "/")
    f = TensorProto.FLOAT
    sb, rb, kb, vb, wb = (body.input(n, f, None) for n in ("s_in", "r_t", "k_t", "v_t", "w_t"))
    step(body, rb, kb, vb, sb, u, wb, names=("y_t", "s_out"))
    body.output("s_out", "s_out", f, None)
    body.output("y_t", "y_t", f, None)
    graph = helper.make_graph(body.nodes, body.name, body.inputs, body.outputs, list(body.initializers.values()))
    s_final, y = b.op("Scan", s, r, k, v, w, outputs=2, body=graph, num_scan_inputs=4,
                      scan_input_axes=[1, 1, 1, 1], scan_output_axes=[1])
    return y, s_final


def linear_attention(b: GraphBuilder, r: str, k: str, v: str, log_w: str, s: str, u: str,
                     heads: int, size: int) -> tuple[str, str]:
    """Packed r, k, v, log_w (b, t, H*N); s (b, H, N, N); u (H, N, 1): wkv5's LinearAttention with the
    per-token decay. Returns (out (b, t, H*N), new s)."""
    w_last = b.op("Reshape", b.op("Exp", b.op("Gather", log_w, b.ints([-1]), axis=1)), b.ints([0, heads, size, 1]))
    return wkv5.linear_attention(b, r, k, v, s, u, log_w, w_last, heads, size)


def wkv6_ref(r: np.ndarray, k: np.ndarray, v: np.ndarray, w: np.ndarray, s: np.ndarray, u: np.ndarray):
    """numpy reference: r, k, v, w (b, t, H, N); s (b, H, N, N); u (H, N, 1). Returns (out (b, t, H, N), s)."""
    ys = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(np.einsum("bhk,bhkv->bhv", r[:, t], u * kv + s))
        s = kv + w[:, t, :, :, None] * s
    return np.stack(ys, axis=1), s
