"""LFM2's gated short convolution (transformers' Lfm2ShortConv; llama.cpp's `shortconv`).

Symbols: b batch · t tokens · d model width · k the conv width (config `conv_L_cache`).

    [B, C, x] = h W_in                  (b, t, d) each: in_proj's rows split in three
    u = conv(B · x)                     depthwise causal conv over time, width k, no activation
    out = (C · u) W_out

State per layer: `conv_state` (d, k-1), the conv's last k-1 inputs (B · x), in the layout of
kernels/conv.py (llama.cpp's and ONNX Runtime's). Fused flavour: CausalConvWithState; portable: Conv.
Biases (config `conv_bias`) on in_proj, the conv and out_proj are read when the checkpoint has them.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.conv import causal_conv
from edgeseq.kernels.ops import linear
from edgeseq.state import StateTensor
from edgeseq.tensor_table import T, Row, shaped, t


@dataclass(frozen=True)
class ShortConvMixer:
    d_model: int
    d_conv: int  # conv_L_cache

    def state_spec(self, layer: int) -> list[StateTensor]:
        return [StateTensor(layer, "conv_state", (self.d_model, self.d_conv - 1),
                            "last k-1 inputs (B·x) of the short conv")]

    def tensors(self, m: str, o: str, g: str | None = None) -> list[Row]:
        """The mixer's rows: canonical names under `o`, transformers' under `m` (`…conv.`), llama.cpp's
        under `g` (`blk.{i}.shortconv.`; None: no GGUF names)."""
        d, k = self.d_model, self.d_conv
        gg = (lambda n: g + n) if g is not None else (lambda n: None)
        return [
            Row(o + "in_proj", m + "in_proj.weight", t, gguf=gg("in_proj.weight"), codec=T),
            Row(o + "in_bias", m + "in_proj.bias", optional=True),
            # torch's (d, 1, k); llama.cpp's converter squeezes it to (d, k)
            Row(o + "conv", m + "conv.weight", gguf=gg("conv.weight"), codec=shaped((d, k), (d, 1, k))),
            Row(o + "conv_bias", m + "conv.bias", optional=True),
            Row(o + "out_proj", m + "out_proj.weight", t, gguf=gg("out_proj.weight"), codec=T),
            Row(o + "out_bias", m + "out_proj.bias", optional=True),
        ]

    def __call__(self, b: GraphBuilder, h: Value, o: str, conv_state: Value, fused: bool) -> tuple[Value, Value]:
        """The mixer on normed input h (b, t, d). Returns (out (b, t, d), new conv state)."""
        d = self.d_model
        B, C, x = linear(b, h, o + "in_proj", o + "in_bias").split([d, d, d])  # (b, t, d) each
        u, state = causal_conv(b, (B * x).transpose(0, 2, 1), conv_state, o + "conv", o + "conv_bias", d,
                               self.d_conv, silu=False, fused=fused)  # (b, d, t)
        return linear(b, C * u.transpose(0, 2, 1), o + "out_proj", o + "out_bias"), state
