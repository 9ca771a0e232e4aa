"""Mamba-1's mixer: the selective state-space layer (Gu & Dao 2023, Algorithm 2), with the variants
the families use: FalconMamba's weightless RMS norms on dt, B and C (Jamba's carry weights:
`norm_weights`), and Zamba's heads (x_proj and
dt_proj per head of hd = di / nh channels; one head is Mamba itself).

Symbols: b batch · t tokens · d model width · di inner width · nh heads (hd = di/nh) · n state size ·
r dt rank · k conv width.

    [x, z] = in_proj(h);  x = silu(conv(x))                     (b, t, di)
    [dt, B, C] = x_proj(x)            (per head)                dt (b, t, nh, r), B, C (b, t, nh, n)
    dt = softplus(dt_proj(dt) + dt_bias)   (per head)           (b, t, di)
    s_t = exp(dt·A) ⊙ s_{t-1} + B_t ⊗ (dt·x_t)                  s (b, n, di)
    y_t = C_t · s_t + D ⊙ x_t                                   (b, di)
    out = out_proj(y · silu(z))

The state is kept (n, di), channels innermost (transformers' cache is its transpose): every broadcast
of the recurrence then runs over whole rows of di (ONNX Runtime's broadcasting Muls over (di, 1) x (1, n)
were 2x slower for one sequence and 5-7x for 16, docs/benchmarks.md), and y_t = C_t @ s_t is one MatMul
where B and C are shared by the channels.

ONNX Runtime's LinearAttention fits Mamba-1 only as one head per channel (d_k = n, d_v = 1), and
measured slower that way than the Scan for both decode and prefill (docs/benchmarks.md), so both
flavours use the Scan. Its body takes each token's dt, dt·x, B and C and makes exp(dt·A) and B ⊗ dt·x
itself, so no (t, n, di) tensor is written before the loop and read back in it. Used by Mamba,
FalconMamba, Zamba and Jamba.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.conv import causal_conv
from edgeseq.kernels.ops import linear, rms_norm, softplus, split
from edgeseq.state import StateTensor
from edgeseq.tensor_table import T, Row, as_is, reshape, shaped, t


@dataclass(frozen=True)
class Mamba1Mixer:
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    n_heads: int = 1  # Zamba's Mamba heads; 1 for Mamba
    rms_eps: float | None = None  # FalconMamba's norms on dt, B, C; None for Mamba
    norm_weights: bool = False  # Jamba: those norms scale by weights (dt_norm, b_norm, c_norm)

    @property
    def head_dim(self) -> int:
        return self.d_inner // self.n_heads

    def state_spec(self, layer: int) -> list[StateTensor]:
        return [StateTensor(layer, "conv_state", (self.d_inner, self.d_conv - 1), "last k-1 inputs of the causal conv"),
                StateTensor(layer, "recurrent_state", (self.d_state, self.d_inner),
                                            "SSM state h (n, di): transformers' (di, n) transposed")]

    # -- tensors ---------------------------------------------------------------------------------
    def tensors(self, m: str, o: str = "layers.{i}.", g: str = "blk.{i}.", zamba: bool = False) -> list[Row]:
        """The mixer's rows: canonical names under `o`, checkpoint names under `m` (HF MambaForCausalLM,
        FalconMamba and state-spaces: `…layers.{i}.mixer.`), llama.cpp's `mamba` names under `g`. `zamba`:
        transformers' ZambaForCausalLM (`…mamba.`), whose in_proj rows are interleaved (even rows feed the
        conv, odd rows gate) and whose x_proj and dt_proj are per head (nh, out, in)."""
        di, n, k = self.d_inner, self.d_state, self.d_conv
        evens_first = lambda w: np.concatenate([w[0::2], w[1::2]])  # noqa: E731
        per_head = lambda w: np.ascontiguousarray(w.transpose(0, 2, 1))  # noqa: E731  (nh, in, out): batched MatMuls
        return [
            Row(o + "in_proj", m + "in_proj.weight", (lambda w: t(evens_first(w))) if zamba else t,
                gguf=g + "ssm_in.weight", codec=T),
            Row(o + "in_proj_bias", m + "in_proj.bias", evens_first if zamba else as_is, optional=True,
                shape=(2 * di,)),
            Row(o + "conv", m + "conv1d.weight", reshape(di, 1, k), gguf=g + "ssm_conv1d.weight",
                codec=shaped((di, k), (di, 1, k))),
            Row(o + "conv_bias", m + "conv1d.bias", optional=True, gguf=g + "ssm_conv1d.bias", shape=(di,)),
            Row(o + "x_proj", m + ("x_proj_weight" if zamba else "x_proj.weight"), per_head if zamba else t,
                gguf=g + "ssm_x.weight", codec=T),
            Row(o + "dt_proj", m + ("dt_proj_weight" if zamba else "dt_proj.weight"), per_head if zamba else t,
                gguf=g + "ssm_dt.weight", codec=T),
            Row(o + "dt_bias", m + ("dt_proj_bias" if zamba else "dt_proj.bias"), reshape(di), gguf=g + "ssm_dt.bias",
                shape=(di,)),
            # the recurrence needs the (negative) rate itself; the checkpoint keeps its log
            Row(o + "A", m + "A_log", lambda a: -np.exp(a).reshape(di, n), gguf=g + "ssm_a"),
            Row(o + "D", m + "D", reshape(di), gguf=g + "ssm_d"),
            Row(o + "out_proj", m + "out_proj.weight", t, gguf=g + "ssm_out.weight", codec=T),
            Row(o + "out_proj_bias", m + "out_proj.bias", optional=True),
            *self.norm_rows(m, o, g),
        ]

    def norm_rows(self, m: str, o: str, g: str) -> list[Row]:
        """Jamba's weighted norms on dt, B and C (transformers' JambaMambaMixer names, llama.cpp's jamba)."""
        if not self.norm_weights:
            return []
        return [Row(o + f"{x}_norm", f"{m}{x}_layernorm.weight", gguf=f"{g}ssm_{x}_norm.weight", shape=(size,))
                for x, size in (("dt", self.dt_rank), ("b", self.d_state), ("c", self.d_state))]

    # -- graph -----------------------------------------------------------------------------------
    def __call__(self, b: GraphBuilder, h: Value, o: str, conv_state: Value, state: Value, one_token: bool,
                 fused: bool) -> tuple[Value, Value, Value]:
        """The mixer on normed input h (b, t, d). Returns (out (b, t, d), new conv state, new SSM state)."""
        di, n, r = self.d_inner, self.d_state, self.dt_rank
        xs, z = split(b, linear(b, h, o + "in_proj", o + "in_proj_bias"), [di, di])  # (b, t, di)
        xc, conv = causal_conv(b, xs.transpose(0, 2, 1), conv_state, o + "conv", o + "conv_bias", di,
                               self.d_conv, silu=True, fused=fused)
        xs = xc.transpose(0, 2, 1)  # (b, t, di)
        if self.n_heads == 1:
            dt, B, C = split(b, linear(b, xs, o + "x_proj"), [r, n, n])
            if self.rms_eps is not None:
                w = (o + "dt_norm", o + "b_norm", o + "c_norm") if self.norm_weights else (None, None, None)
                dt, B, C = (rms_norm(b, v, n, self.rms_eps) for v, n in zip((dt, B, C), w))
            dt = softplus(b, linear(b, dt, o + "dt_proj", o + "dt_bias"))  # (b, t, di)
        else:
            nh, hd = self.n_heads, self.head_dim
            dbc = (xs.reshape(0, 0, nh, 1, hd) @ b.w(o + "x_proj")).reshape(0, 0, nh, r + 2 * n)
            dt, B, C = split(b, dbc, [r, n, n])  # (b, t, nh, r | n | n)
            dt = dt.unsqueeze(3) @ b.w(o + "dt_proj")  # (b, t, nh, 1, hd)
            dt = softplus(b, dt.reshape(0, 0, di) + b.w(o + "dt_bias"))
            B, C = self._per_channel(b, B), self._per_channel(b, C)  # (b, t, n, di)
        y, state = self._recurrence(b, state, dt, xs, B, C, b.w(o + "A").transpose(1, 0), one_token)
        y = (y + xs * b.w(o + "D")) * z.silu()
        return linear(b, y, o + "out_proj", o + "out_proj_bias"), conv, state

    def _recurrence(self, b: GraphBuilder, state: Value, dt: Value, xs: Value, B: Value, C: Value, a_t: Value,
                    one_token: bool) -> tuple[Value, Value]:
        """The selective scan in the (n, di) layout: dt, xs (b, t, di); B, C (b, t, n) shared by the
        channels, or (b, t, n, di) per channel (Zamba's heads); a_t = A transposed (n, di); state (b, n, di).
        One token: t = 1 serves as the axis B broadcasts over, so the step needs no Squeeze or Unsqueeze.
        Returns (y (b, t, di), new state)."""
        n, di = self.d_state, self.d_inner
        shared = self.n_heads == 1
        dx = dt * xs  # (b, t, di)

        def body(h, dt, dx, B, C):
            """One token: dt, dx (b, 1, di); B (b, n, 1) shared | (b, n, di); C (b, 1, n) shared | (b, n, di)."""
            y, h = self._step(h, (dt * a_t).exp(), B * dx, C)  # exp(dt·A) and B ⊗ dt·x: (b, n, di)
            return [h], [y]

        if one_token:
            with b.float32():
                (state,), (y,) = body(state, dt, dx, B.reshape(0, n, 1) if shared else B.reshape(0, n, di),
                                      C if shared else C.reshape(0, n, di))
            return y, state  # y (b, 1, di)
        # the Scan reads each token's dt, dt·x, B and C and makes its (n, di) decay and input in the body:
        # no (t, n, di) tensors written and read back (prefill 1.2x, 16-row decode 1.14x, docs/benchmarks.md)
        xs_t = [dt.unsqueeze(2), dx.unsqueeze(2), B.unsqueeze(3) if shared else B, C.unsqueeze(2) if shared else C]
        (state,), (y,) = b.recur(body, [state], xs_t, False, name="ssm")
        return y.reshape(0, 0, di), state  # (b, t, 1, di) -> (b, t, di)

    def _step(self, h: Value, a: Value, u: Value, c: Value) -> tuple[Value, Value]:
        """One token: h (b, n, di); c (b, 1, n) shared (y = c @ h) or (b, n, di) per channel (y = ones @ (h * c):
        a MatMul sums in the same order for any number of rows, where ReduceSum over axis 1 does not).
        Returns (y (b, 1, di), new h)."""
        h = a * h + u
        if self.n_heads == 1:
            return c @ h, h
        ones = Value(h.b.const(np.ones((1, self.d_state))), h.b)
        return ones @ (h * c), h

    def _per_channel(self, b: GraphBuilder, v: Value) -> Value:
        """(b, t, nh, n) -> (b, t, n, di): each head's B or C over its hd channels."""
        return (v.transpose(0, 1, 3, 2).unsqueeze(4).expand(1, 1, 1, 1, self.head_dim)
                .reshape(0, 0, self.d_state, self.d_inner))
