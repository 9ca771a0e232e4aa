"""RWKV-4: time mix with the WKV4 weighted average (running-maximum state), channel mix with relu².

Symbols: b batch · t tokens · C n_embd · F dim_ffn.

    x = ln0(emb[token])
    per layer:  xx = ln1(x); shifted = previous token's xx (state shift_att)
                r, k, v = sigmoid(Wr·lerp_r), Wk·lerp_k, Wv·lerp_v           (b, t, C)
                x += Wo·(r ⊙ wkv4(k, v; aa, bb, pp))
                x = channel_mix(x)                                           (state shift_ffn)
    logits = head(ln_out(x))

Sources: HF `RwkvForCausalLM` directories (renamed to BlinkDL's names by `rwkv_common.hf_view`) and rwkv.cpp `.bin`
files (which store `time_decay` already as -exp(w) and the `time_*` vectors squeezed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.rwkv_common import LN_EPS, channel_mix, embed_ln0, head, hf_view, lerp, token_shift
from edgeseq.graph import GraphBuilder
from edgeseq.kernels import wkv4
from edgeseq.kernels.ops import layer_norm
from edgeseq.tensor_table import Row, t

PP_INIT = -1e30  # the reference's initial running maximum: "no history yet"


@dataclass
class Rwkv4Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    dim_ffn: int
    dim_att: int  # width of k, v, r and the WKV state (HF's attention_hidden_size; n_embd in BlinkDL's)
    norm_eps: float = LN_EPS


@register("rwkv4", "RwkvForCausalLM")
class Rwkv4(Family):
    name = "rwkv4"
    Config = Rwkv4Config
    prefill_chunk = 256

    @classmethod
    def read_config(cls, src) -> Rwkv4Config:
        src = hf_view(src)
        vocab, c = src.shape("emb.weight")
        layers = 0
        while src.has(f"blocks.{layers}.ln1.weight"):
            layers += 1
        if layers == 0:
            raise EdgeseqError(f"{src.path}: no blocks.0.ln1.weight: not an RWKV checkpoint")
        return Rwkv4Config(vocab_size=vocab, n_embd=c, n_layer=layers, dim_ffn=src.shape("blocks.0.ffn.key.weight")[0],
                           dim_att=src.shape("blocks.0.att.key.weight")[0],
                           norm_eps=float(src.config.get("layer_norm_epsilon", LN_EPS)))

    def state_spec(self) -> list[StateTensor]:
        C, A = self.config.n_embd, self.config.dim_att
        out = []
        for i in range(self.config.n_layer):
            out += [StateTensor(i, "shift_att", (C,), "previous token's ln1 output (time-mix token shift)"),
                    StateTensor(i, "aa", (A,), "WKV numerator, scaled by exp(-pp)"),
                    StateTensor(i, "bb", (A,), "WKV denominator, scaled by exp(-pp)"),
                    StateTensor(i, "pp", (A,), "WKV running maximum exponent", init=PP_INIT),
                    StateTensor(i, "shift_ffn", (C,), "previous token's ln2 output (channel-mix token shift)")]
        return out

    source = staticmethod(hf_view)  # HF directories under BlinkDL's names

    def tensors(self):
        """BlinkDL's names (HF directories are renamed to them by rwkv_common.hf_view); rwkv.cpp squeezed the
        (1, 1, C) time_* vectors and stored time_decay already as -exp(time_decay)."""
        b = "blocks.{i}."
        vec = lambda a: a.reshape(-1)  # noqa: E731
        norm = lambda ours, theirs: [Row(f"{ours}.{n}", f"{theirs}.{n}") for n in ("weight", "bias")]  # noqa: E731
        return [
            Row("embed", "emb.weight"),
            *norm("ln0", "blocks.0.ln0"),
            *norm("layers.{i}.ln1", b + "ln1"),
            *norm("layers.{i}.ln2", b + "ln2"),
            *(Row(f"layers.{{i}}.att.time_mix_{m}", f"{b}att.time_mix_{m}", vec) for m in ("k", "v", "r")),
            Row("layers.{i}.att.time_first", b + "att.time_first", vec),
            # the recurrence uses the (negative) log-decay w = -exp(time_decay)
            Row("layers.{i}.att.time_decay", b + "att.time_decay", {"*": lambda a: -np.exp(vec(a)), "rwkv.cpp": vec}),
            *(Row(f"layers.{{i}}.att.{m}", f"{b}att.{m}.weight", t) for m in ("key", "value", "receptance", "output")),
            *(Row(f"layers.{{i}}.ffn.time_mix_{m}", f"{b}ffn.time_mix_{m}", vec) for m in ("k", "r")),
            *(Row(f"layers.{{i}}.ffn.{m}", f"{b}ffn.{m}.weight", t) for m in ("key", "value", "receptance")),
            *norm("ln_out", "ln_out"),
            Row("head", "head.weight"),
        ]

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        x = embed_ln0(b, ids)  # (b, t, C)
        out = {}
        for i in range(self.config.n_layer):
            o, s = f"layers.{i}.", f"past_key_values.{i}."
            xx = layer_norm(b, x, o + "ln1.weight", o + "ln1.bias", self.config.norm_eps)
            shifted, out[f"present.{i}.shift_att"] = token_shift(b, xx, state[s + "shift_att"], tokens)
            r = (lerp(b, xx, shifted, o + "att.time_mix_r") @ b.w(o + "att.receptance")).sigmoid()
            k = lerp(b, xx, shifted, o + "att.time_mix_k") @ b.w(o + "att.key")
            v = lerp(b, xx, shifted, o + "att.time_mix_v") @ b.w(o + "att.value")
            wkv, *new_state = wkv4.wkv(state[s + "aa"], state[s + "bb"], state[s + "pp"], k=k, v=v,
                                       u=b.w(o + "att.time_first"), w=b.w(o + "att.time_decay"),
                                       one_token=tokens == 1)
            out[f"present.{i}.aa"], out[f"present.{i}.bb"], out[f"present.{i}.pp"] = new_state
            x = x + (r * wkv) @ b.w(o + "att.output")
            x, out[f"present.{i}.shift_ffn"] = channel_mix(b, x, state[s + "shift_ffn"], o, tokens)
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return head(b, hidden, self.config.vocab_size)
