"""Mamba-2's mixer: SSD (state-space duality) with a scalar decay per head (Dao & Gu 2024).

Symbols: b batch · t tokens · d model width · di inner width · H heads · P head dim (di = H·P) ·
G groups (B and C are shared by H/G heads) · n state size · k conv width.

    [z, xBC, dt] = in_proj(h)
    xBC = silu(conv(xBC));  [x, B, C] = split(xBC)             x (b, t, H, P), B, C (b, t, G, n)
    dt = softplus(dt + dt_bias), clipped to [dt_min, dt_max]   (b, t, H)
    s_t = exp(dt·A) · s_{t-1} + B_t ⊗ (dt·x_t)                 s (b, H, n, P)
    y_t = C_t · s_t + D · x_t                                  (b, H, P)
    out = out_proj( group_rms_norm(y · silu(z)) )

The state (b, H, n, P) is the layout of ONNX Runtime's LinearAttention (d_k = n, d_v = P), which the
fused flavour uses directly: gated rule, per-head decay g = dt·A, k = B, v = dt·x, q = C.
Used by Mamba2, Zamba2 and Falcon-H1 (whose options: no gated norm, or the norm before the gate).
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels import scan as ssm
from edgeseq.kernels.conv import causal_conv
from edgeseq.kernels.ops import linear, rms_norm, softplus, split
from edgeseq.state import StateTensor
from edgeseq.tensor_table import T, Codec, Row, reshape, shaped, t


@dataclass(frozen=True)
class Mamba2Mixer:
    d_inner: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int
    norm_eps: float = 1e-5  # the gated group norm's
    dt_min: float = 0.0  # time_step_limit; (0, None) means no clipping
    dt_max: float | None = None
    norm: bool = True  # the gated group norm; False: out_proj(y · silu(z)) (Falcon-H1's mamba_rms_norm off)
    norm_before_gate: bool = False  # True: group_rms_norm(y) · silu(z) (Falcon-H1's mamba_norm_before_gate)

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def state_spec(self, layer: int) -> list[StateTensor]:
        return [StateTensor(layer, "conv_state", (self.conv_dim, self.d_conv - 1),
                            "last k-1 inputs (x, B, C) of the Mamba-2 conv"),
                StateTensor(layer, "recurrent_state", (self.n_heads, self.d_state, self.head_dim),
                            "SSD state h (H, n, P)")]

    def tensors(self, m: str, o: str = "layers.{i}.", g: str = "blk.{i}.") -> list[Row]:
        """The mixer's rows: canonical names under `o`, checkpoint names under `m` (HF `…mixer.` /
        `…mamba.`), llama.cpp's `mamba2` names under `g` (A and D per head as (H, 1), the gated norm as
        (groups, di/groups))."""
        H, P, k, cd = self.n_heads, self.head_dim, self.d_conv, self.conv_dim
        per_head = Codec(lambda a: np.ascontiguousarray(a.reshape(H, P)[:, :1]), lambda a: np.repeat(a.reshape(H), P))
        return [
            Row(o + "in_proj", m + "in_proj.weight", t, gguf=g + "ssm_in.weight", codec=T),
            Row(o + "in_proj_bias", m + "in_proj.bias", optional=True),
            Row(o + "conv", m + "conv1d.weight", reshape(cd, 1, k), gguf=g + "ssm_conv1d.weight",
                codec=shaped((cd, k), (cd, 1, k))),
            Row(o + "conv_bias", m + "conv1d.bias", optional=True, gguf=g + "ssm_conv1d.bias", shape=(cd,)),
            Row(o + "dt_bias", m + "dt_bias", gguf=g + "ssm_dt.bias", shape=(H,)),
            # the recurrence needs the (negative) rate, not its log
            Row(o + "A", m + "A_log", lambda a: -np.exp(a), gguf=g + "ssm_a", codec=shaped((H, 1), (H,)), shape=(H,)),
            # per channel: the skip needs no reshape (llama.cpp keeps it per head)
            Row(o + "D", m + "D", lambda a: np.repeat(a, P), gguf=g + "ssm_d", codec=per_head),
            *([Row(o + "gnorm", m + "norm.weight", gguf=g + "ssm_norm.weight",
                   codec=shaped((self.n_groups, self.d_inner // self.n_groups), (self.d_inner,)))] if self.norm else []),
            Row(o + "out_proj", m + "out_proj.weight", t, gguf=g + "ssm_out.weight", codec=T),
            Row(o + "out_proj_bias", m + "out_proj.bias", optional=True),
        ]

    def head_expand(self) -> np.ndarray:
        """(H, di): dt (b, t, H) @ head_expand repeats each head's step over its P channels (one small
        MatMul instead of reshaping x to heads and back in every layer). One per model: `head_expand`."""
        return np.kron(np.eye(self.n_heads, dtype=np.float32), np.ones((1, self.head_dim), np.float32))

    def __call__(self, b: GraphBuilder, h: Value, o: str, conv_state: Value, state: Value, one_token: bool,
                 fused: bool) -> tuple[Value, Value, Value]:
        """The mixer on normed input h (b, t, d). Returns (out (b, t, d), new conv state, new SSD state)."""
        G, N = self.n_groups, self.d_state
        z, xbc, dt = split(b, linear(b, h, o + "in_proj", o + "in_proj_bias"), [self.d_inner, self.conv_dim, self.n_heads])
        xbc, conv = causal_conv(b, xbc.transpose(0, 2, 1), conv_state, o + "conv", o + "conv_bias", self.conv_dim,
                                self.d_conv, silu=True, fused=fused)
        xs, B, C = split(b, xbc.transpose(0, 2, 1), [self.d_inner, G * N, G * N])
        dt = softplus(b, dt + b.w(o + "dt_bias"))  # (b, t, H)
        if self.dt_min > 0 or self.dt_max is not None:
            dt = dt.clip(self.dt_min, self.dt_max if self.dt_max is not None else np.inf)
        dtx = xs * (dt @ b.w("head_expand"))  # (b, t, di): dt·x per channel
        y, state = self._ssd(b, dtx, dt, B, C, o, state, one_token, fused)  # (b, t, di)
        y = y + xs * b.w(o + "D")
        if self.norm and self.norm_before_gate:
            y = rms_norm(b, y, o + "gnorm", self.norm_eps, groups=G, width=self.d_inner) * z.silu()
        else:
            y = y * z.silu()
            if self.norm:
                y = rms_norm(b, y, o + "gnorm", self.norm_eps, groups=G, width=self.d_inner)
        return linear(b, y, o + "out_proj", o + "out_proj_bias"), conv, state

    def _groups_to_heads(self, b: GraphBuilder, v: Value) -> Value:
        """(b, t, G*n) -> (b, t, H*n): each group's B or C repeated for its H/G heads."""
        G, N, r = self.n_groups, self.d_state, self.n_heads // self.n_groups
        if G == 1:
            return v.tile(1, 1, r)
        v = v.reshape(0, 0, G, N).unsqueeze(3)  # (b, t, G, 1, n)
        return v.expand(1, 1, 1, r, 1).reshape(0, 0, self.n_heads * N)

    def _ssd(self, b, dtx, dt, B, C, o, state, one_token, fused):
        """SSD over dt·x (b, t, di); returns (y (b, t, di), new state (b, H, n, P))."""
        H, N = self.n_heads, self.d_state
        log_a = dt * b.w(o + "A")  # (b, t, H)
        Bh = self._groups_to_heads(b, B)  # (b, t, H*n)
        if fused:
            # q = C per group: LinearAttention shares each query head across H/G state heads
            return ssm.linear_attention(C, Bh, dtx, state=state, log_decay=log_a, q_heads=self.n_groups,
                                        kv_heads=H)
        Ch = self._groups_to_heads(b, C).reshape(0, 0, H, N, 1)  # (b, t, H, n, 1)
        a = log_a.exp().unsqueeze(-1, -2)  # (b, t, H, 1, 1)
        u = Bh.reshape(0, 0, H, N, 1) * dtx.reshape(0, 0, H, 1, self.head_dim)  # (b, t, H, n, P)
        y, state = ssm.selective_scan(state, a=a, u=u, c=Ch, reduce_axis=-2, one_token=one_token)
        return y.reshape(0, 0, self.d_inner), state
