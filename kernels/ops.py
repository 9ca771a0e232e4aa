"""Small graph fragments shared by every family: linear layers, norms, activations.

Shapes use the symbols b (batch), t (tokens in this call), d (model width).
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import GraphBuilder


def linear(b: GraphBuilder, x: str, weight: str, bias: str | None = None) -> str:
    """x @ W (+ bias). Weights are stored [in, out] so the graph needs no transpose."""
    y = b.op("MatMul", x, b.w(weight))
    if bias is not None and b.has_weight(bias):
        y = b.op("Add", y, b.w(bias))
    return y


def linear_t(b: GraphBuilder, x: str, weight: str, out_features: int) -> str:
    """x @ W^T for a weight kept [out, in] (a tied embedding used as the LM head): (b, t, d) -> (b, t, out)."""
    in_features = b.weights[weight].shape[1]
    flat = b.op("Reshape", x, b.ints([-1, in_features]))  # (b*t, d)
    y = b.op("Gemm", flat, b.w(weight, alias=weight + ".T"), transB=1)  # (b*t, out)
    shape = b.op("Concat", b.op("Shape", x, end=2), b.ints([out_features]), axis=0)
    return b.op("Reshape", y, shape)


def rms_norm(b: GraphBuilder, x: str, weight: str | None, eps: float, groups: int = 1, width: int = 0) -> str:
    """x / sqrt(mean(x^2) + eps) * w over the last axis (or over `groups` equal slices of it)."""
    if groups > 1:
        x = b.op("Reshape", x, b.ints([0, 0, groups, width // groups]))
    # Pow/ReduceMean/Add/Sqrt/Div/Mul is the pattern ONNX Runtime fuses into SimplifiedLayerNormalization
    ms = b.op("ReduceMean", b.op("Pow", x, b.const(2.0)), b.ints([-1]), keepdims=1)
    y = b.op("Div", x, b.op("Sqrt", b.op("Add", ms, b.const(eps))))
    if groups > 1:
        y = b.op("Reshape", y, b.ints([0, 0, width]))
    if weight is not None:
        y = b.op("Mul", y, b.w(weight))
    return y


def silu(b: GraphBuilder, x: str) -> str:
    return b.op("Mul", x, b.op("Sigmoid", x))


def softplus(b: GraphBuilder, x: str) -> str:
    # Softplus is a standard op; ORT computes log1p(exp(x)) stably. torch switches to x above 20, where
    # the two agree to float32 precision.
    return b.op("Softplus", x)


def split(b: GraphBuilder, x: str, sizes: list[int], axis: int = -1) -> list[str]:
    outs = b.op("Split", x, b.ints(sizes), axis=axis, outputs=len(sizes))
    return outs if isinstance(outs, list) else [outs]


# -- numpy references ---------------------------------------------------------------------------
def rms_norm_ref(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * w if w is not None else y


def silu_ref(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softplus_ref(x: np.ndarray) -> np.ndarray:
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def layer_norm(b: GraphBuilder, x: str, weight: str, bias: str, eps: float = 1e-5) -> str:
    """LayerNormalization over the last axis (opset 17), with weight and bias."""
    return b.op("LayerNormalization", x, b.w(weight), b.w(bias), axis=-1, epsilon=eps)


def group_norm(b: GraphBuilder, x: str, groups: int, width: int, weight: str, bias: str, eps: float) -> str:
    """torch.nn.functional.group_norm over (b, t, width) split into `groups` equal slices of the last
    axis, then an affine weight/bias over the width (as RWKV's ln_x)."""
    g = b.op("Reshape", x, b.ints([0, 0, groups, width // groups]))
    mean = b.op("ReduceMean", g, b.ints([-1]), keepdims=1)
    c = b.op("Sub", g, mean)
    var = b.op("ReduceMean", b.op("Mul", c, c), b.ints([-1]), keepdims=1)
    y = b.op("Div", c, b.op("Sqrt", b.op("Add", var, b.const(eps))))
    y = b.op("Reshape", y, b.ints([0, 0, width]))
    return b.op("Add", b.op("Mul", y, b.w(weight)), b.w(bias))


def layer_norm_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + bias
