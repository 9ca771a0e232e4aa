"""LFM2 (Liquid AI): gated short-convolution layers and full-attention layers (transformers'
Lfm2ForCausalLM; llama.cpp's `lfm2`).

Symbols: b batch · t tokens · d model width · L layers · H attention heads (Hkv key/value heads) ·
hd = d / H head dim · f MLP width · k conv width (conv_L_cache) · R the KV ring length (max_context,
chosen per session).

    x = embed(ids)                                   (b, t, d)
    per layer i:
        a = rms_norm(x) · w                          operator_norm
        if layer_types[i] == "conv":
            x = x + shortconv_i(a)                   edgeseq.mixers.shortconv
        else:                                        full attention
            q, k = rms_norm(a Wq)·wq, rms_norm(a Wk)·wk   per head (QK-norm), (b, t, H|Hkv, hd)
            q, k = rope(q, k)                        rotate-half, every channel
            x = x + attention(q, k, a Wv over the ring) Wo   scale hd^-1/2, causal, full
        m = rms_norm(x) · w                          ffn_norm
        x = x + (silu(m W1) · m W3) W2
    logits = head(rms_norm(x) · w)                   embedding_norm (at the end, despite its name); tied or untied

The MLP width is transformers' (block_auto_adjust_ff_dim: 2/3 of intermediate_size, times
block_ffn_dim_multiplier, rounded up to block_multiple_of).

State: per conv layer `conv_state` (d, k-1) (the mixer's); per attention layer the ring `key` / `value`
(Hkv, max_context, hd), keys after QK-norm and RoPE (kernels/attention.py); `position`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, hybrid_state, norm_and_head, ring_state
from edgeseq.gguf_names import ArchMap, f32, u32
from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.attention import attention, rope, token_positions
from edgeseq.kernels.ops import linear, rms_norm
from edgeseq.mixers.shortconv import ShortConvMixer
from edgeseq.tensor_table import T, Row, t

MAX_CONTEXT = 4096  # the default KV ring length recorded in the manifest; sessions may choose another
CONV, FULL = "conv", "full_attention"


@dataclass
class Lfm2Config:
    vocab_size: int
    d_model: int
    n_layer: int
    layer_types: list[str]
    ffn_dim: int
    attn_heads: int
    kv_heads: int
    d_conv: int
    rope_theta: float
    norm_eps: float = 1e-5
    conv_bias: bool = False
    tie_embeddings: bool = True
    max_position_embeddings: int = 128000  # GGUF's context_length only; the ring is max_context

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attn_heads

    def mixer(self) -> ShortConvMixer:
        return ShortConvMixer(self.d_model, self.d_conv)


def config_number(v, key: str, where: str, kind=int, low=1):
    """A config.json value as `kind` (int: a whole number >= low; float: finite, and >= low unless low is
    None), or one error naming the file and the key (a traceback otherwise)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))
    if ok and kind is int:
        ok = float(v).is_integer() and v >= low
    elif ok and low is not None:
        ok = v >= low
    if not ok:
        want = f"a whole number >= {low}" if kind is int else ("a number" + (f" >= {low}" if low is not None else ""))
        raise UnsupportedError(f"{where}: {key} must be {want}; got {v!r}")
    return kind(v)


def config_key(cfg: dict, names: tuple[str, ...], where: str, default=None, kind=int, low=1):
    """The first of `names` in cfg (`default` when none; an error when no default) through config_number."""
    v = cfg_get(cfg, names, where=where) if default is None else cfg_get(cfg, names, default, where)
    return config_number(v, next((n for n in names if cfg.get(n) is not None), names[0]), where, kind, low)


def ffn_width(cfg: dict, where: str) -> int:
    """transformers' Lfm2MLP width (and llama.cpp's converter's)."""
    f = config_key(cfg, ("block_ff_dim", "intermediate_size"), where)
    if cfg.get("block_auto_adjust_ff_dim", True):
        f = int(2 * f / 3)
        mult = cfg.get("block_ffn_dim_multiplier", 1.0)
        if mult is not None:
            f = int(config_number(mult, "block_ffn_dim_multiplier", where, float, 0.0) * f)
            m = config_key(cfg, ("block_multiple_of",), where, 256)
            f = m * ((f + m - 1) // m)
    return f


def read_lfm2_config(src) -> Lfm2Config:
    cfg, where = src.config, f"{src.path}/config.json"
    n = config_key(cfg, ("num_hidden_layers",), where)
    types = cfg.get("layer_types")
    if types is None:  # older configs: the attention layers' indices
        idx = cfg.get("full_attn_idxs")
        idx = list(range(n)) if idx is None else idx
        if not isinstance(idx, list):
            raise UnsupportedError(f"{where}: full_attn_idxs must list layer indices; got {idx!r}")
        types = [FULL if i in idx else CONV for i in range(n)]
    bad = [x for x in types if x not in (CONV, FULL)] if isinstance(types, list) else [types]
    if bad or len(types) != n:
        raise UnsupportedError(f"{where}: layer_types must list {n} of {CONV!r} / {FULL!r}; got "
                               + (f"{bad[0]!r}" if bad else f"{len(types)} entries"))
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise UnsupportedError(f"{where}: rope_parameters must be an object; got {rp!r}")
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        raise UnsupportedError(f"{where}: rope_parameters.rope_type {rp.get('rope_type')!r} is not supported (default)")
    theta = config_number(rp.get("rope_theta", cfg.get("rope_theta", 1e6)), "rope_theta", where, float, 1e-9)
    d = config_key(cfg, ("hidden_size",), where)
    heads = config_key(cfg, ("num_attention_heads",), where)
    kv = config_key(cfg, ("num_key_value_heads",), where, heads)
    if d % heads or heads % kv:
        raise UnsupportedError(f"{where}: hidden_size {d}, num_attention_heads {heads} and num_key_value_heads {kv} "
                               "must divide evenly")
    hd = cfg.get("head_dim")
    if hd is not None and hd != d // heads:
        raise UnsupportedError(f"{where}: head_dim {hd} other than hidden_size / num_attention_heads is not supported")
    tie = cfg.get("tie_embedding", cfg.get("tie_word_embeddings", True))
    return Lfm2Config(
        vocab_size=config_key(cfg, ("vocab_size",), where), d_model=d, n_layer=n, layer_types=list(types),
        ffn_dim=ffn_width(cfg, where), attn_heads=heads, kv_heads=kv,
        d_conv=config_key(cfg, ("conv_L_cache",), where, 3, low=2), rope_theta=theta,
        norm_eps=config_key(cfg, ("norm_eps",), where, 1e-5, float, 0.0), conv_bias=bool(cfg.get("conv_bias", False)),
        tie_embeddings=bool(tie) or not src.has("lm_head.weight"),
        max_position_embeddings=config_key(cfg, ("max_position_embeddings",), where, 128000))


class Lfm2Gguf(ArchMap):
    """llama.cpp's lfm2: the layer pattern as head_count_kv per layer (0 for a conv layer), the final
    norm as token_embd_norm, the conv taps as (d, k)."""

    arch = "lfm2"
    family = "lfm2"

    def supports(self, fam):
        return "llama.cpp's lfm2 has no conv biases (conv_bias)" if fam.config.conv_bias else None

    def metadata(self, fam, shapes):
        c = fam.config
        kv = [c.kv_heads if kind == FULL else 0 for kind in c.layer_types]
        return [u32("block_count", c.n_layer), u32("context_length", c.max_position_embeddings),
                u32("embedding_length", c.d_model), u32("feed_forward_length", c.ffn_dim),
                u32("attention.head_count", c.attn_heads), ("attention.head_count_kv", kv, "i32s"),
                f32("rope.freq_base", c.rope_theta), f32("attention.layer_norm_rms_epsilon", c.norm_eps),
                u32("vocab_size", c.vocab_size), u32("shortconv.l_cache", c.d_conv)]

    def config(self, g):
        a = g.arch_key
        vocab, d = g.tensor("token_embd.weight").shape
        n = g.need(a("block_count"), int)
        kv = g.need(a("attention.head_count_kv"))
        kv = [int(x) for x in (kv if isinstance(kv, (list, tuple, np.ndarray)) else [kv] * n)]
        if len(kv) != n or len({x for x in kv if x}) > 1:
            raise EdgeseqError(f"{g.path}: attention.head_count_kv must give one count per layer (0 for a conv "
                               "layer), the same for every attention layer")
        return dict(vocab_size=vocab, d_model=d, n_layer=n, layer_types=[FULL if x else CONV for x in kv],
                    ffn_dim=g.need(a("feed_forward_length"), int), attn_heads=g.need(a("attention.head_count"), int),
                    kv_heads=max(kv) or g.need(a("attention.head_count"), int),
                    d_conv=g.need(a("shortconv.l_cache"), int), rope_theta=float(g.get(a("rope.freq_base"), 1e6)),
                    norm_eps=float(g.get(a("attention.layer_norm_rms_epsilon"), 1e-5)),
                    tie_embeddings="output.weight" not in g.tensors,
                    max_position_embeddings=int(g.get(a("context_length"), 128000)))


def lfm2_attention(b: GraphBuilder, a: Value, o: str, ring_k: Value, ring_v: Value, position: Value, pos: Value,
                   c: Lfm2Config, tokens: int | None, *, theta: float | None = None, inv_freq=None,
                   window: int | None = None, gate: bool = False) -> tuple[Value, Value, Value]:
    """LFM2's attention on the normed input a (b, t, d). Returns (out (b, t, d), new rings). LFM3 adds:
    RoPE per layer type (`theta`, or the frequencies `inv_freq`), a sliding `window` (the ring is then the
    window long), a sigmoid gate per head (`gate`: o + "g", applied before the output projection), and
    q/k/v/o biases (o + "q_bias" ..., read where the weights hold them)."""
    H, Hkv, hd = c.attn_heads, c.kv_heads, c.head_dim
    q = rms_norm(b, linear(b, a, o + "q", o + "q_bias").reshape(0, 0, H, hd), o + "q_norm", c.norm_eps)
    k = rms_norm(b, linear(b, a, o + "k", o + "k_bias").reshape(0, 0, Hkv, hd), o + "k_norm", c.norm_eps)
    v = linear(b, a, o + "v", o + "v_bias").reshape(0, 0, Hkv, hd).transpose(0, 2, 1, 3)  # (b, Hkv, t, hd)
    theta = c.rope_theta if theta is None else theta
    q, k = (rope(b, x.transpose(0, 2, 1, 3), pos, hd, theta, inv_freq=inv_freq) for x in (q, k))
    # the prefill graphs read only the filled slots of a ring under a third full; the step graph has no
    # control flow (mobile runtimes)
    y, nk, nv = attention(b, q, k, v, ring_k, ring_v, position, H, Hkv, hd, hd ** -0.5, window=window,
                          early_exit=tokens != 1 and window is None)  # (b, H, t, hd)
    y = y.transpose(0, 2, 1, 3)  # (b, t, H, hd)
    if gate:
        y = y * linear(b, a, o + "g").sigmoid().unsqueeze(3)
    return linear(b, y.reshape(0, 0, H * hd), o + "o", o + "o_bias"), nk, nv


@register("Lfm2ForCausalLM")
class Lfm2(Family):
    name = "lfm2"
    Config = Lfm2Config
    gguf = Lfm2Gguf()  # llama.cpp runs it
    prefill_chunk = 128  # the attention scores grow with chunk x (ring + chunk)
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    @classmethod
    def read_config(cls, src) -> Lfm2Config:
        return read_lfm2_config(src)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        return hybrid_state((kind != CONV for kind in c.layer_types), c.mixer,
                            lambda i: self.attention_state(i, c.layer_types[i]))

    def attention_state(self, i: int, kind: str) -> list[StateTensor]:
        """Attention layer i's state (its key and value rings)."""
        c = self.config
        return ring_state(i, c.kv_heads, c.head_dim, "attention", "after QK-norm and RoPE")

    def tensors(self):
        c = self.config
        rows = [Row("embed", "model.embed_tokens.weight", gguf="token_embd.weight")]
        for i, kind in enumerate(c.layer_types):
            m, o, g = f"model.layers.{i}.", f"layers.{i}.", f"blk.{i}."
            rows.append(Row(o + "norm", m + "operator_norm.weight", gguf=g + "attn_norm.weight"))
            if kind == CONV:
                rows += c.mixer().tensors(m + "conv.", o, g + "shortconv.")
            else:
                rows += self.attention_rows(i, m + "self_attn.", o, g)
            rows += [Row(o + "ffn_norm", m + "ffn_norm.weight", gguf=g + "ffn_norm.weight"),
                     *self.ffn_rows(i, m + "feed_forward.", o, g), *self.layer_rows(i, m, o, g)]
        rows.append(Row("norm_f", "model.embedding_norm.weight", gguf="token_embd_norm.weight"))
        if not c.tie_embeddings:
            rows.append(Row("lm_head", "lm_head.weight", t, gguf="output.weight", codec=T))
        return rows

    def attention_rows(self, i: int, a: str, o: str, g: str) -> list[Row]:
        """Attention layer i's rows (checkpoint names under a, canonical under o, GGUF under g)."""
        return [*(Row(o + n, f"{a}{n}_proj.weight", t, gguf=f"{g}attn_{n}.weight", codec=T) for n in "qkv"),
                Row(o + "o", a + "out_proj.weight", t, gguf=g + "attn_output.weight", codec=T),
                Row(o + "q_norm", a + "q_layernorm.weight", gguf=g + "attn_q_norm.weight"),
                Row(o + "k_norm", a + "k_layernorm.weight", gguf=g + "attn_k_norm.weight")]

    def layer_rows(self, i: int, m: str, o: str, g: str) -> list[Row]:
        """Layer i's further rows (LFM3's sandwich norms); none in LFM2."""
        return []

    def ffn_rows(self, i: int, f: str, o: str, g: str) -> list[Row]:
        """Layer i's feed-forward rows (checkpoint names under f, canonical under o, GGUF under g)."""
        return [Row(o + "gate", f + "w1.weight", t, gguf=g + "ffn_gate.weight", codec=T),
                Row(o + "up", f + "w3.weight", t, gguf=g + "ffn_up.weight", codec=T),
                Row(o + "down", f + "w2.weight", t, gguf=g + "ffn_down.weight", codec=T)]

    def ffn(self, b: GraphBuilder, m: Value, o: str, i: int, fused: bool = False) -> Value:
        """Layer i's feed-forward on the normed m (b, t, d) (`fused`: the graph's flavour, for the experts)."""
        return linear(b, linear(b, m, o + "gate").silu() * linear(b, m, o + "up"), o + "down")

    def attention(self, b: GraphBuilder, a: Value, o: str, i: int, kind: str, ring_k: Value, ring_v: Value,
                  position: Value, pos: Value, tokens: int | None) -> tuple[Value, Value, Value]:
        """Attention layer i (of layer type `kind`) on the normed a (b, t, d): (out, new key ring, new value ring)."""
        return lfm2_attention(b, a, o, ring_k, ring_v, position, pos, self.config, tokens)

    def post_norm(self, b: GraphBuilder, y: Value, name: str) -> Value:
        """A block's output before it joins the residual stream (LFM3's sandwich norm); as is in LFM2."""
        return y

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        mixer = c.mixer()
        x = embed(b, ids)  # (b, t, d)
        pos = token_positions(b, state["position"], ids, 1)  # (b, t)
        out = {}
        for i, kind in enumerate(c.layer_types):
            o, p = f"layers.{i}.", f"past_key_values.{i}."
            with b.scope(f"layers.{i}"):
                a = rms_norm(b, x, o + "norm", c.norm_eps)
                if kind == CONV:
                    y, out[f"present.{i}.conv_state"] = mixer(b, a, o, state[p + "conv_state"], fused)
                else:
                    y, out[f"present.{i}.key"], out[f"present.{i}.value"] = self.attention(
                        b, a, o, i, kind, state[p + "key"], state[p + "value"], state["position"], pos, tokens)
                x = x + self.post_norm(b, y, o + "post_norm")
                m = rms_norm(b, x, o + "ffn_norm", c.norm_eps)
                x = x + self.post_norm(b, self.ffn(b, m, o, i, fused), o + "post_ffn_norm")
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)
