"""RG-LRU: the Real-Gated Linear Recurrent Unit of Griffin / RecurrentGemma (De et al. 2024).

Symbols: b batch · t tokens · W lru width · H gate blocks (the model's head count) · w = W/H.

    gate_x, gate_a = sigmoid(blockdiag(x) + bias)          each (b, t, W); block h maps x[h] (w) -> (w)
    log_a = gate_a · c            c = -8 · softplus(a_param), per channel, fixed at export
    a = exp(log_a)
    m = sqrt(1 - a²)               (the input normalisation; m = 1 at a reset), as sqrt(-2·a·sinh(log a))
    h_t = a_t · h_{t-1} + m_t · gate_x_t · x_t          h (b, W), kept in float32
    y_t = h_t

A reset (the first token of a sequence, absolute position 0) drops h_{t-1} and uses m = 1. Only the
first token of a call can sit at position 0, so the graphs pass `keep`: (1, t, 1), 0 at a reset, else 1.

Graph pieces: `gates` (both block-diagonal gates as one batched MatMul), `step` (one token, plain
ops), `recurrence` (the step over a call's tokens: a standard ONNX Scan whose body is the step). `rglru_ref` is the
numpy reference.
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import Value


def gates(x: Value, *, weight: Value, bias: Value, heads: int, width: int) -> tuple[Value, Value]:
    """x (b, t, W); weight (H, 1, w, 2w) = [input gate | a gate] per block; bias (H, 2w).
    Returns sigmoid gates (gate_x, gate_a), each (b, t, W)."""
    w = width // heads
    xh = x.reshape(0, 0, heads, w).transpose(2, 0, 1, 3)  # (H, b, t, w)
    g = ((xh @ weight).transpose(1, 2, 0, 3) + bias).sigmoid()  # (b, t, H, 2w)
    gx, ga = (v.reshape(0, 0, width) for v in g.split([w, w], axis=-1))
    return gx, ga  # (b, t, W) each


def inputs(x: Value, *, gx: Value, ga: Value, neg_c: Value, keep: Value) -> tuple[Value, Value]:
    """The recurrence's decay a and input u = m · gate_x · x, both (b, t, W). `keep` (1, t, 1) is 0 at a
    reset: there a = 0 and m = 1."""
    log_a = ga * neg_c  # (b, t, W), <= 0
    e = log_a.exp()
    a = e * keep
    # 1 - a² written as -2·a·sinh(log a): the same number, without the cancellation of 1 - a² in float32
    # when a is near 1 (there 1 - a² keeps only a few significant bits and sqrt passes the error on)
    m = (e * log_a.sinh() * -2.0).sqrt()
    m = m * keep + (1.0 - keep)
    return a, x * gx * m


def step(h: Value, *, a: Value, u: Value) -> tuple[Value, Value]:
    """One token: a, u, h (b, W). Returns (y, new h); y is h."""
    h = a * h + u
    return h, h


def recurrence(h: Value, *, a: Value, u: Value, one_token: bool) -> tuple[Value, Value]:
    """a, u (b, t, W), h (b, W): the step over a call's tokens. Returns (y (b, t, W), new h (b, W))."""
    def body(h, a, u):
        y, h = step(h, a=a, u=u)
        return [h], [y]

    (h,), (y,) = h.b.recur(body, [h], [a, u], one_token, squeeze_time=True, name="rglru")
    return y, h


# -- export-time transforms and the numpy reference ------------------------------------------------
def neg_c(a_param: np.ndarray) -> np.ndarray:
    """c = -8 · softplus(a_param), computed once in float64 (a constant of the layer)."""
    p = a_param.astype(np.float64)
    return (-8.0 * np.logaddexp(0.0, p)).astype(np.float32)


def fuse_gate_weight(input_w: np.ndarray, a_w: np.ndarray) -> np.ndarray:
    """(H, w, w) ×2 -> (H, 1, w, 2w): one MatMul computes both gates (the 1 broadcasts over the batch axis
    of the (H, b, t, w) activations)."""
    return np.ascontiguousarray(np.concatenate([input_w, a_w], axis=-1)[:, None].astype(np.float32))


def fuse_gate_bias(input_b: np.ndarray, a_b: np.ndarray) -> np.ndarray:
    """(H, w) ×2 -> (H, 2w), the fused gates' bias."""
    return np.ascontiguousarray(np.concatenate([input_b, a_b], axis=-1).astype(np.float32))


def rglru_ref(x: np.ndarray, positions: np.ndarray, h: np.ndarray, input_w, input_b, a_w, a_b, a_param):
    """numpy reference. x (b, t, W), positions (t,), h (b, W); the HF/recurrentgemma parameter layout
    (gate weights (H, w, w) applied as x[h] @ W[h]). Returns (y (b, t, W), final h)."""
    bsz, t, width = x.shape
    heads = input_w.shape[0]
    xh = x.reshape(bsz, t, heads, width // heads)
    gx = 1 / (1 + np.exp(-(np.einsum("bthi,hij->bthj", xh, input_w) + input_b).reshape(bsz, t, width)))
    ga = 1 / (1 + np.exp(-(np.einsum("bthi,hij->bthj", xh, a_w) + a_b).reshape(bsz, t, width)))
    log_a = -8.0 * ga * np.logaddexp(0.0, a_param)
    a = np.exp(log_a)
    m = np.sqrt(1 - np.exp(2 * log_a))
    reset = (np.asarray(positions) == 0)[None, :, None]
    a = np.where(reset, 0.0, a)
    m = np.where(reset, 1.0, m)
    u = x * gx * m
    ys = []
    for i in range(t):
        h = a[:, i] * h + u[:, i]
        ys.append(h)
    return np.stack(ys, axis=1), h
