"""Small graph fragments shared by every family: linear layers, norms, activations.

Shapes use the symbols b (batch), t (tokens in this call), d (model width).
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import GraphBuilder, Value


def linear(b: GraphBuilder, x: Value, weight: str, bias: str | None = None) -> Value:
    """x @ W (+ bias). Weights are stored [in, out] so the graph needs no transpose."""
    y = x @ b.w(weight)
    if bias is not None and b.has_weight(bias):
        y = y + b.w(bias)
    return y


def linear_t(b: GraphBuilder, x: Value, weight: str, out_features: int) -> Value:
    """x @ W^T for a weight kept [out, in] (a tied embedding used as the LM head): (b, t, d) -> (b, t, out)."""
    in_features = b.weights[weight].shape[1]
    y = b.op("Gemm", x.reshape(-1, in_features), b.w(weight, alias=weight + ".T"), transB=1)  # (b*t, out)
    return y.reshape(b.concat(x.dims(end=2), b.ints([out_features]), axis=0))


def rms_norm(b: GraphBuilder, x: Value, weight: str | None, eps: float, groups: int = 1, width: int = 0) -> Value:
    """x / sqrt(mean(x^2) + eps) * w over the last axis (or over `groups` equal slices of it)."""
    if groups > 1:
        x = x.reshape(0, 0, groups, width // groups)
    # Pow/ReduceMean/Add/Sqrt/Div/Mul is the pattern ONNX Runtime fuses into SimplifiedLayerNormalization
    y = x / ((x ** 2.0).mean(-1) + eps).sqrt()
    if groups > 1:
        y = y.reshape(0, 0, width)
    if weight is not None:
        y = y * b.w(weight)
    return y


def silu(b: GraphBuilder, x: Value) -> Value:
    return x.silu()


def softplus(b: GraphBuilder, x: Value) -> Value:
    # Softplus is a standard op; ORT computes log1p(exp(x)) stably. torch switches to x above 20, where
    # the two agree to float32 precision.
    return x.softplus()


def split(b: GraphBuilder, x: Value, sizes: list[int], axis: int = -1) -> list[Value]:
    return x.split(sizes, axis)


# -- numpy references ---------------------------------------------------------------------------
def rms_norm_ref(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


def silu_ref(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softplus_ref(x: np.ndarray) -> np.ndarray:
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def layer_norm(b: GraphBuilder, x: Value, weight: str, bias: str, eps: float = 1e-5) -> Value:
    """LayerNormalization over the last axis (opset 17), with weight and bias."""
    return b.op("LayerNormalization", x, b.w(weight), b.w(bias), axis=-1, epsilon=eps)


def group_norm(b: GraphBuilder, x: Value, groups: int, width: int, weight: str, bias: str, eps: float) -> Value:
    """torch.nn.functional.group_norm over (b, t, width) split into `groups` equal slices of the last
    axis, then an affine weight/bias over the width (as RWKV's ln_x)."""
    g = x.reshape(0, 0, groups, width // groups)
    c = g - g.mean(-1)
    y = (c / ((c * c).mean(-1) + eps).sqrt()).reshape(0, 0, width)
    return y * b.w(weight) + b.w(bias)


def layer_norm_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + bias
