"""Causal depthwise conv1d with a carried state of the last K-1 inputs.

Fused: com.microsoft CausalConvWithState. Portable: Concat(state, x) -> grouped Conv -> Slice.
Both keep the state as (b, channels, K-1), the layout of llama.cpp and of ONNX Runtime's op.
"""
from __future__ import annotations

import numpy as np

from edgeseq.graph import MS_DOMAIN, GraphBuilder, Value


def causal_conv(b: GraphBuilder, x: Value, state: Value, weight: str, bias: str | None, channels: int, k: int,
                silu: bool, fused: bool) -> tuple[Value, Value]:
    """x: (b, channels, t), state: (b, channels, k-1); weight (channels, 1, k) and the optional bias
    named in the weight store. Returns (y, new_state)."""
    bias_in = b.w(bias) if bias is not None and b.has_weight(bias) else None
    if fused:
        y, new_state = b.op("CausalConvWithState", x, b.w(weight), bias_in, state, outputs=2, domain=MS_DOMAIN,
                            activation="silu" if silu else "none")
        return y, new_state
    full = b.concat(state, x, axis=2)  # (b, channels, k-1+t)
    y = b.op("Conv", full, b.w(weight), bias_in, group=channels, kernel_shape=[k])  # (b, channels, t)
    new_state = full.slice(-(k - 1), None, axis=2)  # the last k-1 inputs
    return (y.silu() if silu else y), new_state


def causal_conv_ref(x: np.ndarray, state: np.ndarray, weight: np.ndarray, bias: np.ndarray | None):
    """x (b, c, t), state (b, c, k-1), weight (c, 1, k) -> (y (b, c, t), new_state (b, c, k-1))."""
    k = weight.shape[-1]
    full = np.concatenate([state, x], axis=2)
    t = x.shape[2]
    y = np.stack([(full[:, :, i:i + k] * weight[None, :, 0, :]).sum(-1) for i in range(t)], axis=2)
    if bias is not None:
        y = y + bias[None, :, None]
    return y, full[:, :, full.shape[2] - (k - 1):]
