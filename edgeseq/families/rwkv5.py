"""RWKV-5 (v5.2, "Eagle"): time mix with a matrix-valued state per head, then the shared channel mix.

Symbols: b batch · t tokens · C width (n_embd) · H heads · N head size (C = H·N) · F dim_ffn.

    per layer:  xx = ln1(x);  shifted = previous token's xx (state shift_att)
                r, k, v = W_{r,k,v} lerp(xx, shifted, time_mix_{r,k,v})        (b, t, H, N)
                g = silu(W_g lerp(xx, shifted, time_mix_g))
                out_t = r_t · (u ⊙ k_tᵀ v_t + S_{t-1});  S_t = k_tᵀ v_t + w ⊙ S_{t-1}   (kernels/wkv5.py)
                x += W_o (group_norm(out, H groups, ln_x; eps see LN_X_EPS) * g)
                x = channel_mix(x)                                           (rwkv_common)

w = exp(-exp(time_decay)) and u = time_faaaa, both per (head, key channel). The state S is
(b, H, N, N) (key × value), LinearAttention's layout, shared by both flavours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.rwkv_common import channel_mix, embed_ln0, head, lerp, token_shift, transposed
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv5
from edgeseq.kernels.ops import group_norm, layer_norm, silu

LN_EPS = 1e-5
# ln_x's group-norm eps depends on the runtime the weights were made for: BlinkDL's training code and the
# rwkv package use 1e-5 * head_size_divisor**2 = 64e-5 for v5.2, while rwkv.cpp normalises with 1e-5
# (its fixtures' expected logits only match with 1e-5: max |diff| 3e-6 vs 1.09 with 64e-5). An rwkv.cpp
# file is exported to reproduce rwkv.cpp; a future .pth reader should set 64e-5.
LN_X_EPS = {"rwkv.cpp": 1e-5, "pth": 64e-5}


@dataclass
class Rwkv5Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    head_size: int
    dim_ffn: int
    version: str = "5.2"
    ln_x_eps: float = 1e-5


@register("rwkv5")
class Rwkv5(Family):
    name = "rwkv5"
    Config = Rwkv5Config

    @classmethod
    def read_config(cls, src) -> Rwkv5Config:
        if getattr(src, "stored_by", None) != "rwkv.cpp":
            raise UnsupportedError(f"{src.path}: RWKV-5 is read from rwkv.cpp files only for now")
        a = "blocks.0.att."
        vocab, C = src.shape("emb.weight")
        layers = sum(1 for k in src.keys() if k.endswith(".att.ln_x.weight"))
        decay = src.shape(a + "time_decay")
        if not src.has(a + "time_faaaa") or len(decay) != 3 or decay[1] == 1:
            # v5.0/5.1 keep time_first (stored exp'd) and/or one decay per head
            raise UnsupportedError(f"{src.path}: only RWKV v5.2 is supported (time_faaaa and a decay per "
                                   f"(head, channel)); this file has time_decay {decay}")
        if not src.has(a + "gate.weight"):
            raise UnsupportedError(f"{src.path}: RWKV-5 without a gate (v5.0) is not supported")
        H, N = decay[0], decay[1]
        if H * N != C:
            raise UnsupportedError(f"{src.path}: time_decay {decay} does not split n_embd {C} into heads")
        return Rwkv5Config(vocab_size=vocab, n_embd=C, n_layer=layers, n_head=H, head_size=N,
                           dim_ffn=src.shape("blocks.0.ffn.key.weight")[0],
                           ln_x_eps=LN_X_EPS["rwkv.cpp"])

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        out = []
        for i in range(c.n_layer):
            out.append(StateTensor(i, "shift_att", (c.n_embd,), "previous token's ln1 output (time mix)"))
            out.append(StateTensor(i, "wkv", (c.n_head, c.head_size, c.head_size), "WKV state S (H, N key, N value)"))
            out.append(StateTensor(i, "shift_ffn", (c.n_embd,), "previous token's ln2 output (channel mix)"))
        return out

    def convert(self, src) -> Iterator[tuple[str, np.ndarray]]:
        c = self.config
        H, N = c.n_head, c.head_size
        yield "embed", src.get("emb.weight")
        yield "ln0.weight", src.get("blocks.0.ln0.weight")
        yield "ln0.bias", src.get("blocks.0.ln0.bias")
        for i in range(c.n_layer):
            s, o = f"blocks.{i}.", f"layers.{i}."
            for n in ("ln1", "ln2"):
                yield f"{o}{n}.weight", src.get(f"{s}{n}.weight")
                yield f"{o}{n}.bias", src.get(f"{s}{n}.bias")
            for m in ("k", "v", "r", "g"):  # rwkv.cpp squeezed them to (C,)
                yield f"{o}att.time_mix_{m}", src.get(f"{s}att.time_mix_{m}").reshape(c.n_embd)
            # rwkv.cpp stores time_decay already as w = exp(-exp(decay)), (H, N, 1): exactly the factor the
            # step multiplies the state's key rows by, so it is kept. The fused flavour's LinearAttention
            # wants log w = -exp(decay) per key channel (H*N); log of a value that underflowed to 0 is
            # clipped to -1e30 (exp gives 0 again) rather than -inf, which would turn 0·(-inf) into NaN.
            w = src.get(f"{s}att.time_decay").reshape(H, N, 1)
            yield o + "att.decay", w
            with np.errstate(divide="ignore"):
                yield o + "att.log_decay", np.maximum(np.log(w), -1e30).reshape(H * N).astype(np.float32)
            # v5.2's bonus u (time_faaaa) is used as is; rwkv.cpp only unsqueezed it to (H, N, 1)
            yield o + "att.bonus", src.get(f"{s}att.time_faaaa").reshape(H, N, 1)
            for m in ("receptance", "key", "value", "gate", "output"):
                yield f"{o}att.{m}", transposed(src.get(f"{s}att.{m}.weight"))
            yield o + "att.ln_x.weight", src.get(f"{s}att.ln_x.weight")
            yield o + "att.ln_x.bias", src.get(f"{s}att.ln_x.bias")
            for m in ("k", "r"):
                yield f"{o}ffn.time_mix_{m}", src.get(f"{s}ffn.time_mix_{m}").reshape(c.n_embd)
            for m in ("key", "value", "receptance"):  # (in, out) for MatMul: key (C, F), value (F, C)
                yield f"{o}ffn.{m}", transposed(src.get(f"{s}ffn.{m}.weight"))
        yield "ln_out.weight", src.get("ln_out.weight")
        yield "ln_out.bias", src.get("ln_out.bias")
        yield "head", src.get("head.weight")  # (vocab, C) as stored; rwkv_common.head reads it transposed

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        x = embed_ln0(b, ids)  # (b, t, C)
        out = {}
        for i in range(c.n_layer):
            o, p = f"layers.{i}.", f"past_key_values.{i}."
            x, out[f"present.{i}.shift_att"], out[f"present.{i}.wkv"] = self._time_mix(
                b, x, state[p + "shift_att"], state[p + "wkv"], o, tokens, fused)
            x, out[f"present.{i}.shift_ffn"] = channel_mix(b, x, state[p + "shift_ffn"], o, tokens)
        return x, out

    def _time_mix(self, b, x, prev, s, o, tokens, fused):
        c = self.config
        H, N, C = c.n_head, c.head_size, c.n_embd
        xx = layer_norm(b, x, o + "ln1.weight", o + "ln1.bias", LN_EPS)
        shifted, new_prev = token_shift(b, xx, prev, tokens)
        r, k, v, g = (b.op("MatMul", lerp(b, xx, shifted, f"{o}att.time_mix_{m}"), b.w(f"{o}att.{name}"))
                      for m, name in (("r", "receptance"), ("k", "key"), ("v", "value"), ("g", "gate")))
        u, w = b.w(o + "att.bonus"), b.w(o + "att.decay")
        if tokens == 1:
            # step graph: plain ops in both flavours
            heads = b.ints([-1, H, N])  # (b, 1, C) -> (b, H, N)
            y, s = wkv5.step(b, *(b.op("Reshape", z, heads) for z in (r, k, v)), s, u, w)
            y = b.op("Reshape", y, b.ints([-1, 1, C]))
        elif fused:
            y, s = wkv5.linear_attention(b, r, k, v, s, u, w, b.w(o + "att.log_decay"), H, N)
        else:
            heads = b.ints([0, 0, H, N])
            y, s = wkv5.scan(b, *(b.op("Reshape", z, heads) for z in (r, k, v)), s, u, w)
            y = b.op("Reshape", y, b.ints([0, 0, C]))
        y = group_norm(b, y, H, C, o + "att.ln_x.weight", o + "att.ln_x.bias", c.ln_x_eps)
        y = b.op("MatMul", b.op("Mul", y, silu(b, g)), b.w(o + "att.output"))
        return b.op("Add", x, y), new_prev, s

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return head(b, hidden, self.config.vocab_size)
