"""Gated DeltaNet's mixer (Yang, Kautz & Hatamizadeh 2024), as Qwen3.5 and Qwen3-Next use it
(transformers' Qwen3_5GatedDeltaNet).

Symbols: b batch · t tokens · d model width · Hk key/query heads · Hv value heads (= state heads; each
key head serves Hv/Hk consecutive value heads) · dk, dv head dims · K = Hk·dk, V = Hv·dv ·
c = 2K + V conv channels · k conv width.

    [q, k, v] = silu(conv([h Wq; h Wk; h Wv]))    (b, t, c): one short causal conv before the split
    q, k = l2norm(q), l2norm(k) per head           eps 1e-6 under the root, as transformers' l2norm
    q, k repeated to Hv heads                      head j reads key head j // (Hv/Hk)
    β = sigmoid(h Wb)                              (b, t, Hv)
    g = A · softplus(h Wa + dt_bias)               (b, t, Hv), A = -exp(A_log) < 0
    y = gated_delta(q / sqrt(dk), k, v, g, β)      (b, t, Hv, dv)   kernels/gdn.py
    out = (rms_norm(y) · w · silu(h Wz)) Wo        the norm per value head (width dv), plain w

State per layer: `conv_state` (c, k-1), the conv's last k-1 inputs (q, k, v before the conv); and
`recurrent_state` (Hv, dk, dv), S with rows key channels and columns value channels: the layout of
transformers' recurrent function and of ONNX Runtime's LinearAttention, so state files move between
the flavours. Fused flavour: CausalConvWithState and LinearAttention(update_rule gated_delta), which
matches the reference exactly (tests/test_gdn_kernel.py); portable: Conv and the Scan of gdn.step.

Checkpoint layouts: Qwen3.5's separate in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, or (`qkvz`)
Qwen3-Next's fused in_proj_qkvz / in_proj_ba, interleaved per key head, split on loading into the same
canonical tensors (the graphs do not change).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels import gdn
from edgeseq.kernels.conv import causal_conv
from edgeseq.kernels.ops import linear, rms_norm
from edgeseq.state import StateTensor
from edgeseq.tensor_table import T, Codec, Fused, Row, t


def _heads_codec(hd: int, axis: int, hk: int, r: int) -> Codec:
    """Value heads along `axis` (Hv·hd wide, Hv = hk·r) from grouped order [hk, r, hd] (transformers') to
    tiled order [r, hk, hd] (llama.cpp's) and back; the identity when r = 1."""
    def swap(a, first, second):
        a = np.asarray(a)
        shape = a.shape
        x = a.reshape(*shape[:axis], first, second, hd, *shape[axis + 1:])
        return np.ascontiguousarray(np.swapaxes(x, axis, axis + 1).reshape(shape))

    return Codec(lambda a: swap(a, hk, r), lambda a: swap(a, r, hk))


@dataclass(frozen=True)
class GatedDeltaNetMixer:
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    d_conv: int
    norm_eps: float = 1e-6  # the gated norm's (rms_norm_eps)
    # Qwen3-Next's layout: the checkpoint's fused in_proj_qkvz / in_proj_ba, interleaved per key head, and
    # llama.cpp's qwen3next names (value heads left grouped, b and a fused as ssm_ba)
    qkvz: bool = False

    @property
    def conv_dim(self) -> int:
        return 2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim

    def state_spec(self, layer: int) -> list[StateTensor]:
        return [StateTensor(layer, "conv_state", (self.conv_dim, self.d_conv - 1),
                            "last k-1 inputs (q, k, v) of the Gated DeltaNet conv"),
                StateTensor(layer, "recurrent_state", (self.v_heads, self.k_dim, self.v_dim),
                            "gated delta rule state S (Hv, dk, dv): rows key channels, columns value channels")]

    def _qkvz_split(self, a: np.ndarray) -> list[np.ndarray]:
        """Qwen3-Next's in_proj_qkvz (Hk·(2dk + 2r·dv), d), per key head [q, k, v, z] (transformers'
        fix_query_key_value_ordering), as the rows of q (K, d), k (K, d), v (V, d), z (V, d): value
        heads in grouped order (head j of key head j // r), as in_proj_qkv / in_proj_z hold them."""
        Hk, dk, rv = self.k_heads, self.k_dim, self.v_heads // self.k_heads * self.v_dim
        x = np.asarray(a).reshape(Hk, 2 * dk + 2 * rv, -1)
        cuts = np.cumsum([dk, dk, rv])
        return [p.reshape(-1, x.shape[-1]) for p in np.split(x, cuts, axis=1)]

    def _ba_split(self, a: np.ndarray) -> list[np.ndarray]:
        """Qwen3-Next's in_proj_ba (Hk·2r, d), per key head [b, a], as b (Hv, d) and a (Hv, d)."""
        r = self.v_heads // self.k_heads
        x = np.asarray(a).reshape(self.k_heads, 2 * r, -1)
        return [x[:, :r].reshape(self.v_heads, -1), x[:, r:].reshape(self.v_heads, -1)]

    def _fused_rows(self, m: str, o: str, g: str) -> list:
        """Qwen3-Next's rows: the fused projections split on loading; llama.cpp's qwen3next keeps the value
        heads grouped and fuses b and a per key head (ssm_ba, the checkpoint's in_proj_ba as it is)."""
        cd, k, K, Hv = self.conv_dim, self.d_conv, 2 * self.k_heads * self.k_dim, self.v_heads
        r = Hv // self.k_heads

        def qkv(a):
            q, kk, v, _ = self._qkvz_split(a)
            return np.ascontiguousarray(np.concatenate([q, kk, v]).T)

        def ba_enc(parts):
            b_, a_ = (p.T.reshape(self.k_heads, r, -1) for p in parts)
            return np.ascontiguousarray(np.concatenate([b_, a_], axis=1).reshape(2 * Hv, -1))

        conv = Codec(lambda a: np.ascontiguousarray(a[:, 0]), lambda a: np.ascontiguousarray(a.reshape(cd, 1, k)))
        q = m + "in_proj_qkvz.weight"
        ba = m + "in_proj_ba.weight"
        return [
            Row(o + "in_qkv", q, qkv, gguf=g + "attn_qkv.weight", codec=T),
            Row(o + "in_z", q, lambda a: np.ascontiguousarray(self._qkvz_split(a)[3].T), gguf=g + "attn_gate.weight",
                codec=T),
            Row(o + "in_b", ba, lambda a: np.ascontiguousarray(self._ba_split(a)[0].T)),
            Row(o + "in_a", ba, lambda a: np.ascontiguousarray(self._ba_split(a)[1].T)),
            Fused(g + "ssm_ba.weight", (o + "in_b", o + "in_a"), ba_enc,
                  lambda a: [np.ascontiguousarray(x.T) for x in self._ba_split(a)]),
            Row(o + "conv", m + "conv1d.weight", lambda a: np.ascontiguousarray(a.reshape(cd, 1, k)),
                gguf=g + "ssm_conv1d.weight", codec=conv),
            Row(o + "dt_bias", m + "dt_bias", gguf=g + "ssm_dt.bias"),
            Row(o + "A", m + "A_log", lambda a: -np.exp(a.astype(np.float64)).astype(np.float32), gguf=g + "ssm_a"),
            Row(o + "gnorm", m + "norm.weight", gguf=g + "ssm_norm.weight"),
            Row(o + "out_proj", m + "out_proj.weight", t, gguf=g + "ssm_out.weight", codec=T),
        ]

    def tensors(self, m: str, o: str, g: str = "blk.{i}.") -> list:
        """The mixer's rows: canonical names under `o`, transformers' names under `m` (`…linear_attn.`),
        llama.cpp's `qwen35` names under `g`. llama.cpp's converter reorders the value heads from grouped
        by key head (head j reads key head j // r) to tiled (j reads j % Hk) where Hv != Hk: the V rows
        of the qkv projection and the conv, z, a, b, A, dt_bias, and the columns of out_proj. With `qkvz`,
        Qwen3-Next's fused projections and llama.cpp's qwen3next names (_fused_rows)."""
        if self.qkvz:
            return self._fused_rows(m, o, g)
        cd, k, K = self.conv_dim, self.d_conv, 2 * self.k_heads * self.k_dim
        v = functools.partial(_heads_codec, hk=self.k_heads, r=self.v_heads // self.k_heads)
        qkv = Codec(lambda a: np.concatenate([a.T[:K], v(self.v_dim, 0).enc(a.T[K:])]),
                    lambda a: np.ascontiguousarray(np.concatenate([a[:K], v(self.v_dim, 0).dec(a[K:])]).T))
        conv = Codec(lambda a: np.concatenate([a[:K, 0], v(self.v_dim, 0).enc(a[K:, 0])]),
                     lambda a: np.concatenate([a[:K], v(self.v_dim, 0).dec(a[K:])]).reshape(cd, 1, k))
        return [
            Row(o + "in_qkv", m + "in_proj_qkv.weight", t, gguf=g + "attn_qkv.weight", codec=qkv),
            Row(o + "in_z", m + "in_proj_z.weight", t, gguf=g + "attn_gate.weight", codec=T.then(v(self.v_dim, 0))),
            Row(o + "in_b", m + "in_proj_b.weight", t, gguf=g + "ssm_beta.weight", codec=T.then(v(1, 0))),
            Row(o + "in_a", m + "in_proj_a.weight", t, gguf=g + "ssm_alpha.weight", codec=T.then(v(1, 0))),
            Row(o + "conv", m + "conv1d.weight", lambda a: np.ascontiguousarray(a.reshape(cd, 1, k)),
                gguf=g + "ssm_conv1d.weight", codec=conv),
            Row(o + "dt_bias", m + "dt_bias", gguf=g + "ssm_dt.bias", codec=v(1, 0)),
            # the recurrence needs the (negative) rate, not its log
            Row(o + "A", m + "A_log", lambda a: -np.exp(a.astype(np.float64)).astype(np.float32), gguf=g + "ssm_a",
                codec=v(1, 0)),
            Row(o + "gnorm", m + "norm.weight", gguf=g + "ssm_norm.weight"),  # plain w (not 1 + w), per head
            Row(o + "out_proj", m + "out_proj.weight", t, gguf=g + "ssm_out.weight", codec=T.then(v(self.v_dim, 1))),
        ]

    def _heads(self, x: Value, n: int, dim: int, repeat: int) -> Value:
        """(b, t, n·dim) -> (b, t, n·repeat, dim): each head repeated for `repeat` consecutive heads."""
        x = x.reshape(0, 0, n, dim)
        if repeat == 1:
            return x
        return x.unsqueeze(3).expand(1, 1, 1, repeat, 1).reshape(0, 0, n * repeat, dim)

    def __call__(self, b: GraphBuilder, h: Value, o: str, conv_state: Value, state: Value, one_token: bool,
                 fused: bool) -> tuple[Value, Value, Value]:
        """The mixer on normed input h (b, t, d). Returns (out (b, t, d), new conv state, new S)."""
        Hk, Hv, dk, dv = self.k_heads, self.v_heads, self.k_dim, self.v_dim
        r = Hv // Hk
        qkv, conv = causal_conv(b, linear(b, h, o + "in_qkv").transpose(0, 2, 1), conv_state, o + "conv", None,
                                self.conv_dim, self.d_conv, silu=True, fused=fused)
        q, k, v = qkv.transpose(0, 2, 1).split([Hk * dk, Hk * dk, Hv * dv])  # (b, t, K), (b, t, K), (b, t, V)

        def l2norm(x):  # per head, then repeated to the value heads: (b, t, Hv, dk)
            x = x.reshape(0, 0, Hk, dk)
            return self._heads(x / ((x * x).sum(-1) + 1e-6).sqrt(), Hk, dk, r)

        q, k = l2norm(q), l2norm(k)
        beta = linear(b, h, o + "in_b").sigmoid()  # (b, t, Hv)
        g = b.w(o + "A") * (linear(b, h, o + "in_a") + b.w(o + "dt_bias")).softplus()  # (b, t, Hv) log decay
        if fused:
            y, state = gdn.linear_attention(q.reshape(0, 0, Hv * dk), k.reshape(0, 0, Hv * dk), v, state=state,
                                            log_decay=g, beta=beta, heads=Hv, scale=dk ** -0.5)
            y = y.reshape(0, 0, Hv, dv)
        else:
            def rows(x, n):  # (b, t, Hv, n) -> (b, [t,] Hv, 1, n)
                return x.reshape(-1, Hv, 1, n) if one_token else x.reshape(0, 0, Hv, 1, n)

            y, state = gdn.gdn(state, q=rows(q * dk ** -0.5, dk), k=rows(k, dk), v=rows(v, dv),
                               decay=rows(g.exp(), 1), beta=rows(beta, 1), one_token=one_token)
            y = y.reshape(0, 0, Hv, dv) if not one_token else y.reshape(-1, 1, Hv, dv)  # (b, t, Hv, dv)
        z = linear(b, h, o + "in_z").reshape(0, 0, Hv, dv)
        y = (rms_norm(b, y, o + "gnorm", self.norm_eps) * z.silu()).reshape(0, 0, Hv * dv)
        return linear(b, y, o + "out_proj"), conv, state
