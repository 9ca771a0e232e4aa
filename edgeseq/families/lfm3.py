"""LFM3 (Liquid AI; transformers' Lfm3ForCausalLM): LFM2 (edgeseq.families.lfm2: gated short-conv
layers, QK-normed attention, SwiGLU MLP) with three layer types, a sandwich norm and a gated attention.

Symbols as in lfm2.py; hd = head_dim (its own config key, default 128, not d / H) · W sliding_window.

    per layer i:
        a = rms_norm(x) · w                                  operator_norm
        y = shortconv_i(a)                                   layer_types[i] == "conv"
          | attention_i(a)                                   "full_attention" | "sliding_attention"
        x = x + rms_norm(y) · w                              post_operator_norm (use_sandwich_norm)
        m = rms_norm(x) · w                                  ffn_norm
        x = x + rms_norm((silu(m W1) · m W3) W2) · w         post_ffn_norm (use_sandwich_norm)
    attention_i(a): LFM2's (q, k per-head RMS norm, RoPE, GQA, scale hd^-1/2) with RoPE per layer type
        (rope_parameters["sliding_attention" | "full_attention"]: "default", or "proportional": the first
        partial_rotary_factor of the hd/2 frequency pairs rotated at base^(-2j/hd), the rest not rotated,
        all divided by `factor`), q/k/v/o biases (attention_bias), and the output of head h times
        sigmoid(a Wg)_h (use_attention_gate) before o_proj; sliding layers see the last W positions
        (position p attends to p-W+1 .. p), as transformers' sliding-window mask.
    logits = head(rms_norm(x) · w)                           embedding_norm; tied or untied

The MLP is intermediate_size wide as given (no block_auto_adjust_ff_dim rule).

State: per conv layer `conv_state` (d, k-1); per sliding layer `key` / `value` rings of W slots (constant
memory, RecurrentGemma's ring); per full-attention layer rings of max_context (default 4096: a model
with no full-attention layer has no max_context); keys after QK-norm and RoPE; `position`.

int4/int8 keep the attention gates f32 (quant_policy). Left out (a clear error): RoPE types other than
default / proportional, layer types other than the three. No MoE variant exists in transformers. GGUF:
llama.cpp has no LFM3, so the generic edgeseq-lfm3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import StateTensor
from edgeseq.families.lfm2 import (CONV, FULL, MAX_CONTEXT, Lfm2, Lfm2Config, config_key, config_number,
                                    lfm2_attention)
from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.ops import rms_norm
from edgeseq.tensor_table import Either, Row, t

SLIDING = "sliding_attention"
ROPE_DEFAULTS = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                 FULL: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5}}


@dataclass
class Lfm3Config(Lfm2Config):
    head_dim: int = 128  # a field here (LFM2 derives it)
    window: int = 256  # sliding_window
    sandwich_norm: bool = True
    attention_gate: bool = True
    attention_bias: bool = False
    # RoPE per attention layer type: theta, the share of frequency pairs rotated, the divisor of the frequencies
    full_rope: tuple = (1_000_000.0, 0.5, 1.0)
    sliding_rope: tuple = (10_000.0, 1.0, 1.0)

    def inv_freq(self, kind: str) -> np.ndarray:
        """The (hd/2,) float32 RoPE frequencies of layer type `kind`, as transformers computes them."""
        theta, share, factor = self.full_rope if kind == FULL else self.sliding_rope
        hd = self.head_dim
        n = int(share * hd // 2)
        rotated = 1.0 / (theta ** (np.arange(0, 2 * n, 2, dtype=np.int64).astype(np.float32) / hd))
        f = np.concatenate([rotated.astype(np.float32), np.zeros(hd // 2 - n, np.float32)])
        return (f / np.float32(factor)).astype(np.float32)


def _rope(rp: dict, kind: str, where: str) -> tuple:
    p = rp.get(kind, ROPE_DEFAULTS[kind]) if any(k in rp for k in (FULL, SLIDING)) else (rp or ROPE_DEFAULTS[kind])
    at = f"rope_parameters.{kind}"
    if not isinstance(p, dict):
        raise UnsupportedError(f"{where}: {at} must be an object; got {p!r}")
    kind_ = p.get("rope_type", p.get("type", "default"))
    theta = config_number(p.get("rope_theta", ROPE_DEFAULTS[kind]["rope_theta"]), at + ".rope_theta", where, float,
                          1e-9)
    if kind_ == "default":  # transformers' Lfm3 default RoPE rotates every channel (no partial factor)
        return theta, 1.0, 1.0
    if kind_ == "proportional":
        share = config_number(p.get("partial_rotary_factor", 1.0), at + ".partial_rotary_factor", where, float, 0.0)
        if share > 1.0:
            raise UnsupportedError(f"{where}: {at}.partial_rotary_factor {share} is not in [0, 1]")
        return theta, share, config_number(p.get("factor", 1.0), at + ".factor", where, float, 1e-9)
    raise UnsupportedError(f"{where}: {at}.rope_type {kind_!r} is not supported (default, proportional)")


def read_lfm3_config(src) -> Lfm3Config:
    cfg, where = src.config, f"{src.path}/config.json"
    n = config_key(cfg, ("num_hidden_layers",), where)
    types = cfg.get("layer_types")
    if types is None:  # transformers' default pattern
        types = [FULL if i % 4 == 2 else SLIDING if i % 4 == 0 and i > 0 else CONV for i in range(n)]
    if not isinstance(types, list) or len(types) != n or not all(x in (CONV, FULL, SLIDING) for x in types):
        bad = [x for x in types if x not in (CONV, FULL, SLIDING)] if isinstance(types, list) else []
        raise UnsupportedError(f"{where}: layer_types must list {n} of {CONV!r} / {SLIDING!r} / {FULL!r}; got "
                               + (f"{bad[0]!r}" if bad else f"{types!r}"))
    d = config_key(cfg, ("hidden_size",), where)
    heads = config_key(cfg, ("num_attention_heads",), where)
    kv = config_key(cfg, ("num_key_value_heads",), where, heads)
    if heads % kv:
        raise UnsupportedError(f"{where}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv}")
    hd = config_key(cfg, ("head_dim",), where, d // heads)
    if hd % 2:
        raise UnsupportedError(f"{where}: head_dim {hd} must be even (RoPE rotates pairs)")
    window = cfg.get("sliding_window")
    if SLIDING in types or window is not None:
        try:
            window = config_number(window, "sliding_window", where)
        except UnsupportedError:
            if SLIDING in types:
                raise UnsupportedError(f"{where}: sliding_window must be a positive number of tokens for the "
                                       f"{SLIDING} layers; got {window!r}") from None
            window = 256
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise UnsupportedError(f"{where}: rope_parameters must be an object; got {rp!r}")
    if "rope_theta" in cfg and not any(k in rp for k in (FULL, SLIDING)) and "rope_theta" not in rp:
        rp = {**rp, "rope_theta": cfg["rope_theta"]}
    tie = cfg.get("tie_embedding", cfg.get("tie_word_embeddings", True))
    full_rope = _rope(rp, FULL, where) if FULL in types else ROPE_DEFAULTS_T[FULL]
    sliding_rope = _rope(rp, SLIDING, where) if SLIDING in types else ROPE_DEFAULTS_T[SLIDING]
    return Lfm3Config(
        vocab_size=config_key(cfg, ("vocab_size",), where), d_model=d, n_layer=n, layer_types=list(types),
        ffn_dim=config_key(cfg, ("intermediate_size",), where), attn_heads=heads, kv_heads=kv,
        d_conv=config_key(cfg, ("conv_L_cache",), where, 7, low=2), rope_theta=full_rope[0],
        norm_eps=config_key(cfg, ("norm_eps", "rms_norm_eps"), where, 1e-5, float, 0.0),
        conv_bias=bool(cfg.get("conv_bias", False)), tie_embeddings=bool(tie) or not src.has("lm_head.weight"),
        max_position_embeddings=config_key(cfg, ("max_position_embeddings",), where, 128000), head_dim=hd,
        window=window if window is not None else 256,
        sandwich_norm=bool(cfg.get("use_sandwich_norm", True)),
        attention_gate=bool(cfg.get("use_attention_gate", True)),
        attention_bias=bool(cfg.get("attention_bias", False)), full_rope=full_rope, sliding_rope=sliding_rope)


ROPE_DEFAULTS_T = {k: _rope({}, k, "") for k in (FULL, SLIDING)}  # (theta, share, factor) of a type not in the model


@register("Lfm3ForCausalLM")
class Lfm3(Lfm2):
    name = "lfm3"
    Config = Lfm3Config
    gguf = None  # llama.cpp has no LFM3: the generic edgeseq-lfm3

    @classmethod
    def read_config(cls, src) -> Lfm3Config:
        return read_lfm3_config(src)

    @classmethod
    def from_json(cls, d: dict) -> "Lfm3":
        fam = super().from_json(d)
        c = fam.config
        c.full_rope, c.sliding_rope = tuple(c.full_rope), tuple(c.sliding_rope)  # JSON gives lists
        return fam

    @property
    def symbolic_dims(self) -> dict[str, int]:
        """max_context only where a full-attention layer keeps a ring of it."""
        return {"max_context": MAX_CONTEXT} if FULL in self.config.layer_types else {}

    def attention_state(self, i: int, kind: str) -> list[StateTensor]:
        c = self.config
        if kind == FULL:
            return super().attention_state(i, kind)
        return [StateTensor(i, n, (c.kv_heads, c.window, c.head_dim),
                            f"sliding-window attention {n}s, ring slot p % {c.window}"
                            + (" (after QK-norm and RoPE)" if n == "key" else "")) for n in ("key", "value")]

    def attention_rows(self, i: int, a: str, o: str, g: str) -> list[Row]:
        c = self.config
        rows = [*(Row(o + n, f"{a}{n}_proj.weight", t, gguf=None) for n in "qkvo"),
                Row(o + "q_norm", a + "q_norm.weight", gguf=None), Row(o + "k_norm", a + "k_norm.weight", gguf=None)]
        if c.attention_bias:
            rows += [Row(o + n + "_bias", f"{a}{n}_proj.bias", gguf=None) for n in "qkvo"]
        if c.attention_gate:
            # saved (and released) as gate_proj; transformers renames it g_proj when it loads
            rows.append(Row(o + "g", Either((a + "gate_proj.weight", t), (a + "g_proj.weight", t)), gguf=None))
        return rows

    def layer_rows(self, i: int, m: str, o: str, g: str) -> list[Row]:
        if not self.config.sandwich_norm:
            return []
        return [Row(o + "post_norm", m + "post_operator_norm.weight", gguf=None),
                Row(o + "post_ffn_norm", m + "post_ffn_norm.weight", gguf=None)]

    def attention(self, b: GraphBuilder, a: Value, o: str, i: int, kind: str, ring_k: Value, ring_v: Value,
                  position: Value, pos: Value, tokens: int | None) -> tuple[Value, Value, Value]:
        c = self.config
        return lfm2_attention(b, a, o, ring_k, ring_v, position, pos, c, tokens, inv_freq=c.inv_freq(kind),
                              window=c.window if kind == SLIDING else None, gate=c.attention_gate)

    def quant_policy(self, name, shape):
        """The attention gates stay f32 under int4 and int8: H x d each (0.8 % of q_proj), and each row scales
        a whole head (int4 gates alone, the rest f32, moved a 16-head test model's logits by up to 0.52,
        int4 q_proj alone, 16 times larger, by 0.93)."""
        return "f32" if name.endswith(".g") else None

    def post_norm(self, b: GraphBuilder, y: Value, name: str) -> Value:
        return rms_norm(b, y, name, self.config.norm_eps) if self.config.sandwich_norm else y
