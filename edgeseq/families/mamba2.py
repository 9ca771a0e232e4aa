"""Mamba-2: state-space duality (SSD) layers with a scalar decay per head.

Symbols (Dao & Gu 2024): b batch · t tokens · d model width · di inner width · H heads · P head dim
(di = H·P) · G groups (B and C are shared by H/G heads) · n state size · k conv width.

    per layer:  [z, xBC, dt] = in_proj(rms_norm(x))
                xBC = silu(conv(xBC));  [x, B, C] = split(xBC)          x (b, t, H, P), B, C (b, t, G, n)
                dt = softplus(dt + dt_bias), clipped to time_step_limit  (b, t, H)
                h_t = exp(dt·A) · h_{t-1} + B_t ⊗ (dt·x_t)              h (b, H, n, P)
                y_t = C_t · h_t + D · x_t                               (b, H, P)
                x += out_proj( group_rms_norm(y · silu(z)) )

The state (b, H, n, P) is the layout of ONNX Runtime's LinearAttention (d_k = n, d_v = P), which
the fused flavour uses directly: gated rule, per-head decay g = dt·A, k = B, v = dt·x, q = C.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, find_prefix, head_is_embedding, norm_and_head, pick, transposed
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import scan as ssm
from edgeseq.kernels.conv import causal_conv
from edgeseq.kernels.ops import linear, rms_norm, silu, softplus, split

EMBED_SUFFIXES = ["embeddings.weight", "embedding.weight"]


@dataclass
class Mamba2Config:
    vocab_size: int
    d_model: int
    n_layer: int
    d_inner: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int
    norm_eps: float = 1e-5
    dt_min: float = 0.0  # time_step_limit; (0, None) means no clipping
    dt_max: float | None = None
    tie_embeddings: bool = False

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state


@register("Mamba2ForCausalLM", "Mamba2LMHeadModel")
class Mamba2(Family):
    name = "mamba2"
    Config = Mamba2Config

    @classmethod
    def read_config(cls, src) -> Mamba2Config:
        cfg, where = src.config, f"{src.path}/config.json"
        ssm_cfg = cfg.get("ssm_cfg") or {}
        p = find_prefix(src, EMBED_SUFFIXES)
        m = f"{p}layers.0.mixer."
        vocab, d_model = src.shape(pick(src, [p + s for s in EMBED_SUFFIXES], "the embedding"))
        layers = sum(1 for k in src.keys() if k.endswith(".mixer.A_log"))
        n_heads = src.shape(m + "A_log")[0]
        d_inner = src.shape(m + "norm.weight")[0]
        conv_dim, _, d_conv = src.shape(m + "conv1d.weight")
        groups = int(cfg_get({**ssm_cfg, **cfg}, ("n_groups", "ngroups"), 1, where))
        d_state = (conv_dim - d_inner) // (2 * groups)
        in_rows = src.shape(m + "in_proj.weight")[0]
        if in_rows != d_inner + conv_dim + n_heads:
            raise UnsupportedError(f"{where}: in_proj has {in_rows} rows, expected {d_inner + conv_dim + n_heads}; "
                                   f"Mamba-2 layers with an extra gated MLP (d_ssm < d_inner) are not supported")
        if cfg.get("rms_norm") is False or ssm_cfg.get("rmsnorm") is False:
            raise UnsupportedError(f"{where}: Mamba-2 without RMS norms is not supported")
        if ssm_cfg.get("norm_before_gate"):
            raise UnsupportedError(f"{where}: norm_before_gate=true is not supported")
        limit = cfg.get("time_step_limit") or ssm_cfg.get("dt_limit") or (0.0, float("inf"))
        lo, hi = _float(limit[0]), _float(limit[1])
        return Mamba2Config(
            vocab_size=vocab, d_model=d_model, n_layer=layers, d_inner=d_inner, n_heads=n_heads,
            head_dim=d_inner // n_heads, n_groups=groups, d_state=d_state, d_conv=d_conv,
            norm_eps=float(cfg_get(cfg, ("layer_norm_epsilon", "norm_epsilon"), 1e-5, where)),
            dt_min=lo, dt_max=None if hi == float("inf") else hi, tie_embeddings=head_is_embedding(src, p))

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        out = []
        for i in range(c.n_layer):
            out.append(StateTensor(i, "conv_state", (c.conv_dim, c.d_conv - 1), "last k-1 inputs (x, B, C) of the conv"))
            out.append(StateTensor(i, "recurrent_state", (c.n_heads, c.d_state, c.head_dim), "SSD state h (H, n, P)"))
        return out

    def convert(self, src) -> Iterator[tuple[str, np.ndarray]]:
        c = self.config
        p = find_prefix(src, EMBED_SUFFIXES)
        yield "embed", src.get(pick(src, [p + s for s in EMBED_SUFFIXES], "the embedding"))
        for i in range(c.n_layer):
            m, o = f"{p}layers.{i}.mixer.", f"layers.{i}."
            yield o + "norm", src.get(f"{p}layers.{i}.norm.weight")
            yield o + "in_proj", transposed(src.get(m + "in_proj.weight"))
            if src.has(m + "in_proj.bias"):
                yield o + "in_proj_bias", src.get(m + "in_proj.bias")
            yield o + "conv", src.get(m + "conv1d.weight").reshape(c.conv_dim, 1, c.d_conv)
            if src.has(m + "conv1d.bias"):
                yield o + "conv_bias", src.get(m + "conv1d.bias")
            yield o + "dt_bias", src.get(m + "dt_bias")
            # the recurrence needs the (negative) rate; the checkpoint keeps its log
            yield o + "A", -np.exp(src.get(m + "A_log"))
            # D per channel (each head's value repeated over its P channels) so the skip needs no reshape
            yield o + "D", np.repeat(src.get(m + "D"), c.head_dim)
            yield o + "gnorm", src.get(m + "norm.weight")
            yield o + "out_proj", transposed(src.get(m + "out_proj.weight"))
            if src.has(m + "out_proj.bias"):
                yield o + "out_proj_bias", src.get(m + "out_proj.bias")
        # dt (b, t, H) @ head_expand (H, di) repeats each head's step over its P channels: one small
        # MatMul instead of reshaping x to heads and back in every layer
        yield "head_expand", np.kron(np.eye(c.n_heads, dtype=np.float32), np.ones((1, c.head_dim), np.float32))
        yield "norm_f", src.get(pick(src, [p + "norm_f.weight"], "the final norm"))
        if not c.tie_embeddings:
            yield "lm_head", transposed(src.get("lm_head.weight"))

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        H, G, N = c.n_heads, c.n_groups, c.d_state
        x = embed(b, ids)  # (b, t, d)
        out = {}
        for i in range(c.n_layer):
            o = f"layers.{i}."
            h = rms_norm(b, x, o + "norm", c.norm_eps)
            z, xbc, dt = split(b, linear(b, h, o + "in_proj", o + "in_proj_bias"), [c.d_inner, c.conv_dim, H])
            xbc, out[f"present.{i}.conv_state"] = causal_conv(
                b, b.op("Transpose", xbc, perm=[0, 2, 1]), state[f"past_key_values.{i}.conv_state"], o + "conv",
                o + "conv_bias", c.conv_dim, c.d_conv, silu=True, fused=fused)
            xs, B, C = split(b, b.op("Transpose", xbc, perm=[0, 2, 1]), [c.d_inner, G * N, G * N])
            dt = softplus(b, b.op("Add", dt, b.w(o + "dt_bias")))  # (b, t, H)
            if c.dt_min > 0 or c.dt_max is not None:
                dt = b.op("Clip", dt, b.const(c.dt_min), b.const(c.dt_max if c.dt_max is not None else np.inf))
            dtx = b.op("Mul", xs, b.op("MatMul", dt, b.w("head_expand")))  # (b, t, di): dt·x per channel
            y, out[f"present.{i}.recurrent_state"] = self._ssd(
                b, dtx, dt, B, C, o, state[f"past_key_values.{i}.recurrent_state"], tokens, fused)  # (b, t, di)
            y = b.op("Add", y, b.op("Mul", xs, b.w(o + "D")))
            y = b.op("Mul", y, silu(b, z))  # (b, t, di)
            y = rms_norm(b, y, o + "gnorm", c.norm_eps, groups=G, width=c.d_inner)
            x = b.op("Add", x, linear(b, y, o + "out_proj", o + "out_proj_bias"))
        return x, out

    def _heads(self, b, v):
        """(b, t, G*n) -> (b, t, H*n): each group's B or C repeated for its H/G heads."""
        c = self.config
        G, N, r = c.n_groups, c.d_state, c.n_heads // c.n_groups
        if G == 1:
            return b.op("Tile", v, b.ints([1, 1, r]))
        v = b.op("Unsqueeze", b.op("Reshape", v, b.ints([0, 0, G, N])), b.ints([3]))  # (b, t, G, 1, n)
        return b.op("Reshape", b.op("Expand", v, b.ints([1, 1, 1, r, 1])), b.ints([0, 0, c.n_heads * N]))

    def _ssd(self, b, dtx, dt, B, C, o, h, tokens, fused):
        """SSD over dt·x (b, t, di); returns (y (b, t, di), new state (b, H, n, P))."""
        c = self.config
        H, N = c.n_heads, c.d_state
        log_a = dt * b.w(o + "A")  # (b, t, H)
        Bh = self._heads(b, B)  # (b, t, H*n)
        if fused:
            # q = C per group: LinearAttention shares each query head across H/G state heads
            return ssm.linear_attention(C, Bh, dtx, state=h, log_decay=log_a, q_heads=c.n_groups, kv_heads=H)
        Bh = Bh.reshape(0, 0, H, N, 1)
        Ch = self._heads(b, C).reshape(0, 0, H, N, 1)  # (b, t, H, n, 1)
        a = log_a.exp().unsqueeze(-1, -2)  # (b, t, H, 1, 1)
        u = Bh * dtx.reshape(0, 0, H, 1, c.head_dim)  # (b, t, H, n, P)
        y, h = ssm.selective_scan(h, a=a, u=u, c=Ch, reduce_axis=-2, one_token=tokens == 1)
        return y.reshape(0, 0, c.d_inner), h

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)

    def quant_policy(self, name, shape):
        return "f32" if name == "head_expand" else None  # an exact 0/1 expansion, not a learned matrix


def _float(v) -> float:
    """transformers writes infinity in config.json as {"__float__": "Infinity"}."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float("inf") if v is None else float(v)
