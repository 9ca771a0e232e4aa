"""Falcon-H1 (TII; transformers' FalconH1ForCausalLM, llama.cpp's `falcon-h1`): attention and a Mamba-2
mixer side by side in every layer, both reading the same normed input, then a gated MLP; μP multipliers
on nearly every projection.

Symbols: b batch · t tokens · d model width · L layers · H attention heads (Hkv key/value heads) ·
hd attention head dim · di = mamba_d_ssm the mixer width · Hm Mamba heads · P = di / Hm · G groups ·
n state size · k conv width · f MLP width · R the KV ring length (max_context, chosen per session).

As transformers computes it (m_* the config's multipliers, μ = ssm_multipliers, one per part of the
in-projection: z, x, B, C, dt):

    x = embed(ids) · m_emb                                  (b, t, d)
    per layer i:
        a = rms_norm(x) · w                                 input_layernorm
        [z, xBC, dt] = ((a · m_ssm_in) W_in + b_in) · μ     (b, t, 2di + 2Gn + Hm), μ per channel
        s = mamba2(z, xBC, dt) · m_ssm_out                  edgeseq.mixers.mamba2; its gated norm is
                                                            optional (mamba_rms_norm) and before or after
                                                            the gate (mamba_norm_before_gate)
        q, k, v = (a · m_attn_in) Wq, ·Wk · m_key, ·Wv      (b, t, H|Hkv, hd), biases when attention_bias
        q, k = rope(q, k)                                   rotate-half, every channel, rope_theta
        o = attention(q, k, v over the ring) Wo · m_attn_out   scale hd^-1/2, causal, full
        x = x + s + o
        m = rms_norm(x) · w                                 pre_ff_layernorm
        x = x + ((silu(m Wg · m_gate) · m Wu) Wd) · m_down  mlp_multipliers = [m_gate, m_down]
    logits = head(rms_norm(x) · w) · m_lm_head              final_layernorm; lm_head (or the embedding)

Every multiplier multiplies a linear map's input or output, so conversion folds it into that map's
weights (and bias, where the multiplier is on the output) and the graphs do no extra work: embed · m_emb,
W_in's columns · m_ssm_in · μ (b_in · μ), W_out (and its bias) · m_ssm_out, Wq · m_attn_in,
Wk · m_attn_in · m_key (bk · m_key), Wv · m_attn_in, Wo (bo) · m_attn_out, Wg (bg) · m_gate,
Wd (bd) · m_down, lm_head · m_lm_head. llama.cpp's converter folds the same way, so the canonical weights
are its GGUF tensors as they are (plain transposes). A tied head whose m_lm_head differs from m_emb is
stored as its own `lm_head` (the embedding · m_lm_head): the converter writes such a model with no
output.weight and llama.cpp then scales the logits by m_emb (4.2 off on a tiny model); edgeseq's GGUF
writes output.weight, which llama.cpp uses.

Checkpoints: transformers' save_pretrained and the hub's releases use the same names
(`model.layers.{i}.mamba.*`, `self_attn.*`, `feed_forward.*`); the μP vector is computed from
config.json (transformers keeps it as a buffer it does not save). Supported: every multiplier, GQA/MQA,
head_dim other than d / H, mamba_d_ssm other than mamba_expand·d, groups, mamba_rms_norm on or off,
mamba_norm_before_gate, mamba_conv_bias, mamba_proj_bias, projectors_bias, attention_bias, mlp_bias,
time_step_limit, tied or untied head. Left out (clear errors): hidden_act other than silu, RoPE scaling,
mamba_use_mlp false (transformers always has the MLP).

State: per layer the mixer's `conv_state` (di + 2Gn, k-1) and `recurrent_state` (Hm, n, P) and the ring
`key` / `value` (Hkv, max_context, hd), keys after RoPE; `position`. GGUF: llama.cpp's falcon-h1, for
what it runs (no projection, attention or MLP biases, the conv bias present, the norm after the gate, no
dt clipping); the rest is edgeseq's generic GGUF, saying why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, gqa_attention, norm_and_head, ring_state
from edgeseq.gguf_names import ArchMap, f32, u32
from edgeseq.graph import GraphBuilder
from edgeseq.kernels.attention import token_positions
from edgeseq.kernels.ops import linear, rms_norm
from edgeseq.mixers.mamba2 import Mamba2Mixer
from edgeseq.tensor_table import T, Derived, Row, t

MAX_CONTEXT = 4096  # the default KV ring length recorded in the manifest; sessions may choose another
M = "model."


@dataclass
class FalconH1Config:
    vocab_size: int
    d_model: int
    n_layer: int
    ffn_dim: int
    attn_heads: int
    kv_heads: int
    head_dim: int
    d_ssm: int
    ssm_heads: int
    n_groups: int
    d_state: int
    d_conv: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dt_min: float = 0.0  # time_step_limit; (0, None) means no clipping
    dt_max: float | None = None
    mamba_norm: bool = True  # mamba_rms_norm
    norm_before_gate: bool = False  # mamba_norm_before_gate
    tie_embeddings: bool = False  # the head is the (folded) embedding itself
    conv_bias: bool = True  # mamba_conv_bias
    biases: bool = False  # any projection, attention or MLP bias (llama.cpp's falcon-h1 has none)
    max_position_embeddings: int = 16384  # GGUF's context_length only; the ring is max_context
    # the μP multipliers, folded into the weights when a checkpoint is converted (1 when read from a
    # GGUF, whose weights hold them already)
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: list[float] = field(default_factory=lambda: [1.0] * 5)  # z, x, B, C, dt
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    mlp_multipliers: list[float] = field(default_factory=lambda: [1.0, 1.0])  # gate, down

    @property
    def ssm_head_dim(self) -> int:
        return self.d_ssm // self.ssm_heads

    def mixer(self) -> Mamba2Mixer:
        return Mamba2Mixer(self.d_ssm, self.ssm_heads, self.ssm_head_dim, self.n_groups, self.d_state, self.d_conv,
                           self.norm_eps, self.dt_min, self.dt_max, norm=self.mamba_norm,
                           norm_before_gate=self.norm_before_gate)

    def mup(self) -> np.ndarray:
        """(2di + 2Gn + Hm,) float32: each in-projection output channel's multiplier, ssm_in included."""
        z, xs, B, C, dt = self.ssm_multipliers
        gn = self.n_groups * self.d_state
        parts = [(z, self.d_ssm), (xs, self.d_ssm), (B, gn), (C, gn), (dt, self.ssm_heads)]
        return np.concatenate([np.full(n, m, np.float32) for m, n in parts]) * np.float32(self.ssm_in_multiplier)


def _number(cfg: dict, key: str, where: str, default: float = 1.0) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, dict) and "__float__" in v:  # transformers writes infinity as {"__float__": "Infinity"}
        v = v["__float__"]
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise EdgeseqError(f"{where}: {key} must be a number; got {v!r}") from None
    if math.isnan(x):
        raise EdgeseqError(f"{where}: {key} must be a number; got {v!r}")
    return x


def _numbers(cfg: dict, key: str, n: int, where: str) -> list[float]:
    v = cfg.get(key)
    if v is None:
        return [1.0] * n
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise EdgeseqError(f"{where}: {key} must be a list of {n} numbers; got {v!r}")
    return [_number({key: x}, key, where) for x in v]


def _int(cfg: dict, key: str, where: str, default=None) -> int:
    v = cfg.get(key)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise EdgeseqError(f"{where}: {key} must be a positive integer; got {v!r}")
    return v


def read_falcon_h1_config(src) -> FalconH1Config:
    cfg, where = src.config, f"{src.path}/config.json"
    act = cfg_get(cfg, ("hidden_act",), "silu", where)
    if act not in ("silu", "swish"):
        raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("mamba_use_mlp", True) is False:
        raise UnsupportedError(f"{where}: mamba_use_mlp false is not supported (transformers' Falcon-H1 always "
                               "has the MLP)")
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise EdgeseqError(f"{where}: rope_parameters must be an object; got {rp!r}")
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        raise UnsupportedError(f"{where}: rope_parameters.rope_type {rp.get('rope_type', rp.get('type'))!r} is "
                               "not supported (default)")
    n = _int(cfg, "num_hidden_layers", where)
    heads = _int(cfg, "num_attention_heads", where)
    kv = _int(cfg, "num_key_value_heads", where, heads)
    if heads % kv:
        raise UnsupportedError(f"{where}: num_attention_heads {heads} must be a multiple of num_key_value_heads {kv}")
    if not src.has(M + "embed_tokens.weight"):
        raise EdgeseqError(f"{src.path}: missing {M}embed_tokens.weight; is this a Falcon-H1 checkpoint?")
    vocab, d = src.shape(M + "embed_tokens.weight")
    hd = cfg.get("head_dim") or d // heads
    mx = M + "layers.0.mamba."
    for name in ("A_log", "out_proj.weight", "conv1d.weight", "in_proj.weight"):
        if not src.has(mx + name):
            raise EdgeseqError(f"{src.path}: missing {mx}{name}; is this a Falcon-H1 checkpoint?")
    hm = src.shape(mx + "A_log")[0]
    di = src.shape(mx + "out_proj.weight")[1]
    conv_dim, _, k = src.shape(mx + "conv1d.weight")
    g = _int(cfg, "mamba_n_groups", where, 1)
    if di % hm or di % g or hm % g or (conv_dim - di) % (2 * g):
        raise EdgeseqError(f"{src.path}: the Mamba widths do not fit: {di} channels, {hm} heads, mamba_n_groups {g}, "
                           f"conv width {conv_dim}")
    n_state = (conv_dim - di) // (2 * g)
    ds = cfg.get("mamba_d_ssm")
    if ds is not None and ds != di:
        raise EdgeseqError(f"{src.path}: config.json's mamba_d_ssm {ds} != {mx}out_proj.weight's {di} columns")
    if src.shape(mx + "in_proj.weight")[0] != 2 * di + 2 * g * n_state + hm:
        raise EdgeseqError(f"{src.path}: {mx}in_proj.weight has {src.shape(mx + 'in_proj.weight')[0]} rows, not "
                           f"2·{di} + 2·{g}·{n_state} + {hm}")
    if src.shape(M + "layers.0.self_attn.q_proj.weight")[0] != heads * hd:
        raise EdgeseqError(f"{src.path}: q_proj has {src.shape(M + 'layers.0.self_attn.q_proj.weight')[0]} rows, not "
                           f"num_attention_heads {heads} x head_dim {hd}")
    lo, hi = (cfg.get("time_step_limit") or (0.0, float("inf")))[:2]
    lo, hi = _number({"t": lo}, "t", where, 0.0), _number({"t": hi}, "t", where, float("inf"))
    emb, lm = _number(cfg, "embedding_multiplier", where), _number(cfg, "lm_head_multiplier", where)
    tied = bool(cfg.get("tie_word_embeddings", False)) or not src.has("lm_head.weight")
    return FalconH1Config(
        vocab_size=vocab, d_model=d, n_layer=n, ffn_dim=src.shape(M + "layers.0.feed_forward.up_proj.weight")[0],
        attn_heads=heads, kv_heads=kv, head_dim=hd, d_ssm=di, ssm_heads=hm, n_groups=g, d_state=n_state, d_conv=k,
        rope_theta=_number(rp, "rope_theta", where, _number(cfg, "rope_theta", where, 10000.0)),
        norm_eps=_number(cfg, "rms_norm_eps", where, 1e-5), dt_min=lo, dt_max=None if hi == float("inf") else hi,
        mamba_norm=bool(cfg.get("mamba_rms_norm", False)), conv_bias=src.has(mx + "conv1d.bias"),
        biases=any(k.endswith(".bias") and ".conv1d." not in k for k in src.keys()),
        norm_before_gate=bool(cfg.get("mamba_norm_before_gate", True)),
        tie_embeddings=tied and emb == lm,
        max_position_embeddings=_int(cfg, "max_position_embeddings", where, 16384),
        embedding_multiplier=emb, lm_head_multiplier=lm,
        ssm_in_multiplier=_number(cfg, "ssm_in_multiplier", where),
        ssm_out_multiplier=_number(cfg, "ssm_out_multiplier", where),
        ssm_multipliers=_numbers(cfg, "ssm_multipliers", 5, where),
        attention_in_multiplier=_number(cfg, "attention_in_multiplier", where),
        attention_out_multiplier=_number(cfg, "attention_out_multiplier", where),
        key_multiplier=_number(cfg, "key_multiplier", where),
        mlp_multipliers=_numbers(cfg, "mlp_multipliers", 2, where))


class FalconH1Gguf(ArchMap):
    """llama.cpp's falcon-h1: the multipliers folded into the weights (as its converter does), the
    Mamba-2 tensors as llama.cpp's mamba2, `blk.{i}.ffn_norm` without `.weight` (as the converter names it)."""

    arch = "falcon-h1"
    family = "falcon_h1"

    def supports(self, fam):
        c = fam.config
        if c.biases:
            return ("llama.cpp's falcon-h1 has no projection, attention or MLP biases (mamba_proj_bias, "
                    "projectors_bias, attention_bias, mlp_bias)")
        if not c.conv_bias:
            return "llama.cpp's falcon-h1 needs the Mamba conv bias (mamba_conv_bias; without it llama.cpp crashes)"
        if c.mamba_norm and c.norm_before_gate:
            return "llama.cpp's falcon-h1 applies the Mamba norm after the gate (mamba_norm_before_gate)"
        if c.dt_min > 0 or c.dt_max is not None:
            return "llama.cpp's falcon-h1 has no time_step_limit clipping"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        return [u32("context_length", c.max_position_embeddings), u32("embedding_length", c.d_model),
                u32("feed_forward_length", c.ffn_dim), u32("attention.head_count", c.attn_heads),
                u32("block_count", c.n_layer), u32("ssm.conv_kernel", c.d_conv), u32("ssm.inner_size", c.d_ssm),
                u32("ssm.state_size", c.d_state), u32("ssm.time_step_rank", c.ssm_heads),  # llama.cpp: the heads
                u32("ssm.group_count", c.n_groups), f32("attention.layer_norm_rms_epsilon", c.norm_eps),
                u32("vocab_size", c.vocab_size), u32("attention.head_count_kv", c.kv_heads),
                u32("attention.key_length", c.head_dim), u32("attention.value_length", c.head_dim),
                f32("rope.freq_base", c.rope_theta)]

    def config(self, g):
        a = g.arch_key
        vocab, d = g.tensor("token_embd.weight").shape
        di, hm = g.need(a("ssm.inner_size"), int), g.need(a("ssm.time_step_rank"), int)
        groups = g.need(a("ssm.group_count"), int)
        heads = g.need(a("attention.head_count"), int)
        if hm <= 0 or di % hm or groups <= 0 or di % groups or heads <= 0:
            raise EdgeseqError(f"{g.path}: ssm.inner_size {di}, ssm.time_step_rank {hm}, ssm.group_count {groups} "
                               f"and attention.head_count {heads} do not fit")
        return dict(vocab_size=vocab, d_model=d, n_layer=g.need(a("block_count"), int),
                    ffn_dim=g.need(a("feed_forward_length"), int), attn_heads=heads,
                    kv_heads=int(g.get(a("attention.head_count_kv"), heads)),
                    head_dim=int(g.get(a("attention.key_length"), d // heads)), d_ssm=di, ssm_heads=hm,
                    n_groups=groups, d_state=g.need(a("ssm.state_size"), int), d_conv=g.need(a("ssm.conv_kernel"), int),
                    rope_theta=float(g.get(a("rope.freq_base"), 10000.0)),
                    norm_eps=float(g.get(a("attention.layer_norm_rms_epsilon"), 1e-5)),
                    mamba_norm="blk.0.ssm_norm.weight" in g.tensors, norm_before_gate=False,
                    tie_embeddings="output.weight" not in g.tensors,
                    conv_bias="blk.0.ssm_conv1d.bias" in g.tensors, biases=False,
                    max_position_embeddings=int(g.get(a("context_length"), 16384)))


def _scaled(m):
    """A load that transposes a torch Linear weight (out, in) to (in, out) and multiplies each output
    channel by m (a number or one per channel): the multiplier folded into the matrix."""
    return lambda a: np.ascontiguousarray(t(a) * np.asarray(m, np.float32))


def _times(m):
    """A load that multiplies a bias (or the embedding) by m."""
    return lambda a: np.ascontiguousarray(a * np.asarray(m, np.float32))


@register("FalconH1ForCausalLM")
class FalconH1(Family):
    name = "falcon_h1"
    Config = FalconH1Config
    gguf = FalconH1Gguf()  # llama.cpp runs it
    prefill_chunk = 64  # the SSD scan and the attention scores both grow with the chunk
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    @classmethod
    def read_config(cls, src) -> FalconH1Config:
        return read_falcon_h1_config(src)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        out = []
        for i in range(c.n_layer):
            out += c.mixer().state_spec(i) + ring_state(i, c.kv_heads, c.head_dim, "attention", "after RoPE")
        return out

    def mixer_rows(self, m: str, o: str, g: str) -> list[Row]:
        """The shared Mamba-2 rows with the multipliers folded into the in- and out-projections."""
        import dataclasses

        c = self.config
        mup = c.mup()
        mup_bias = mup / np.float32(c.ssm_in_multiplier)  # ssm_in multiplies the input, not the bias
        fold = {"in_proj": _scaled(mup), "in_proj_bias": _times(mup_bias),
                "out_proj": _scaled(c.ssm_out_multiplier), "out_proj_bias": _times(c.ssm_out_multiplier)}
        rows = []
        for r in c.mixer().tensors(m, o, g):
            kind = r.name[len(o):]
            rows.append(dataclasses.replace(r, load=fold[kind]) if kind in fold else r)
        return rows

    def tensors(self):
        c = self.config
        a_in, k_m, a_out = c.attention_in_multiplier, c.key_multiplier, c.attention_out_multiplier
        gate_m, down_m = c.mlp_multipliers
        rows = [Row("embed", M + "embed_tokens.weight", _times(c.embedding_multiplier), gguf="token_embd.weight")]
        for i in range(c.n_layer):
            m, o, g = f"{M}layers.{i}.", f"layers.{i}.", f"blk.{i}."
            s, f = m + "self_attn.", m + "feed_forward."
            rows += [Row(o + "norm", m + "input_layernorm.weight", gguf=g + "attn_norm.weight"),
                     *self.mixer_rows(m + "mamba.", o, g),
                     Row(o + "q", s + "q_proj.weight", _scaled(a_in), gguf=g + "attn_q.weight", codec=T),
                     Row(o + "k", s + "k_proj.weight", _scaled(a_in * k_m), gguf=g + "attn_k.weight", codec=T),
                     Row(o + "v", s + "v_proj.weight", _scaled(a_in), gguf=g + "attn_v.weight", codec=T),
                     Row(o + "o", s + "o_proj.weight", _scaled(a_out), gguf=g + "attn_output.weight", codec=T),
                     Row(o + "q_bias", s + "q_proj.bias", optional=True),
                     Row(o + "k_bias", s + "k_proj.bias", _times(k_m), optional=True),
                     Row(o + "v_bias", s + "v_proj.bias", optional=True),
                     Row(o + "o_bias", s + "o_proj.bias", _times(a_out), optional=True),
                     # the converter names it without `.weight`
                     Row(o + "ffn_norm", m + "pre_ff_layernorm.weight", gguf=g + "ffn_norm"),
                     Row(o + "gate", f + "gate_proj.weight", _scaled(gate_m), gguf=g + "ffn_gate.weight", codec=T),
                     Row(o + "up", f + "up_proj.weight", t, gguf=g + "ffn_up.weight", codec=T),
                     Row(o + "down", f + "down_proj.weight", _scaled(down_m), gguf=g + "ffn_down.weight", codec=T),
                     Row(o + "gate_bias", f + "gate_proj.bias", _times(gate_m), optional=True),
                     Row(o + "up_bias", f + "up_proj.bias", optional=True),
                     Row(o + "down_bias", f + "down_proj.bias", _times(down_m), optional=True)]
        rows += [Derived("head_expand", c.mixer().head_expand),
                 Row("norm_f", M + "final_layernorm.weight", gguf="output_norm.weight")]
        if not c.tie_embeddings:
            # a tied checkpoint whose head multiplier differs from the embedding's gets its own head
            rows.append(Row("lm_head", {"*": "lm_head.weight", "tied": M + "embed_tokens.weight"},
                            _scaled(c.lm_head_multiplier), gguf="output.weight", codec=T))
        return rows

    def layout(self, src):
        return ("tied" if not src.has("lm_head.weight") and not self.config.tie_embeddings else None), ""

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        mixer = c.mixer()
        x = embed(b, ids)  # (b, t, d), embedding_multiplier folded in
        pos = token_positions(b, state["position"], ids, 1)  # (b, t)
        out = {}
        for i in range(c.n_layer):
            o, p = f"layers.{i}.", f"past_key_values.{i}."
            with b.scope(f"layers.{i}"):
                a = rms_norm(b, x, o + "norm", c.norm_eps)
                s, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = mixer(
                    b, a, o, state[p + "conv_state"], state[p + "recurrent_state"], tokens == 1, fused)
                y, out[f"present.{i}.key"], out[f"present.{i}.value"] = gqa_attention(  # its multipliers folded into q/k/v/o
                    b, a, o, state[p + "key"], state[p + "value"], state["position"], tokens, c.attn_heads,
                    c.kv_heads, c.head_dim, pos=pos, theta=c.rope_theta)
                x = x + (s + y)
                m = rms_norm(b, x, o + "ffn_norm", c.norm_eps)
                h = linear(b, m, o + "gate", o + "gate_bias").silu() * linear(b, m, o + "up", o + "up_bias")
                x = x + linear(b, h, o + "down", o + "down_bias")
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)

    def quant_policy(self, name, shape):
        return "f32" if name == "head_expand" else None  # an exact 0/1 expansion, not a learned matrix
