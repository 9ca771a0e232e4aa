"""Qwen3.5 (dense): Gated DeltaNet layers and gated full-attention layers, three to one in the released
models (transformers' Qwen3_5ForCausalLM, and the language model of Qwen3_5ForConditionalGeneration).

Symbols: b batch · t tokens · d model width · L layers · H attention heads (Hkv key/value heads) ·
hd head dim · rd = hd · partial_rotary_factor rotated channels · f MLP width · R the KV ring length
(max_context, chosen per session).

    x = embed(ids)                                   (b, t, d)
    per layer i:
        a = rms_norm(x) · (1 + w)                    every Qwen3.5 norm but the mixer's gated one
        if layer_types[i] == "linear_attention":
            x = x + gated_deltanet_i(a)              edgeseq.mixers.gated_deltanet
        else:                                        full attention
            [q, gate] = a Wq per head                (b, t, H, hd) each: q_proj interleaves them per head
            q, k = rms_norm(q)·(1+wq), rms_norm(a Wk)·(1+wk)   per head (QK-norm)
            q, k = rope(q, k) on the first rd channels          rotate-half, positions of text tokens
            o = attention(q, k, a Wv over the ring) · sigmoid(gate)   scale hd^-1/2, causal, full
            x = x + o Wo
        m = rms_norm(x) · (1 + w)
        x = x + (silu(m Wg) · m Wu) Wd
    logits = head(rms_norm(x) · (1 + w))             tied or untied

The (1 + w) norm weights are stored as 1 + w (the load transform), so the graphs use a plain RMS
norm. Qwen3.5's multimodal RoPE (mrope_section) gives every channel the same angle when the three
position rows are equal, as they are for text: plain RoPE here. Left out of
Qwen3_5ForConditionalGeneration: the vision tower (`model.visual.*`) and the multi-token-prediction
head (`mtp.*`); the export is the text model, which reads token ids only.

State: per linear-attention layer `conv_state` (2K + V, k-1) and `recurrent_state` (Hv, dk, dv)
(the mixer's); per full-attention layer the ring `key` / `value` (Hkv, max_context, hd), keys after
RoPE and QK-norm (kernels/attention.py); `position`.
"""
from __future__ import annotations

import dataclasses
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
from edgeseq.mixers.gated_deltanet import GatedDeltaNetMixer
from edgeseq.tensor_table import T, Row, t

MAX_CONTEXT = 4096  # the default KV ring length recorded in the manifest; sessions may choose another
LINEAR, FULL = "linear_attention", "full_attention"


def one_plus(a: np.ndarray) -> np.ndarray:
    """Qwen3.5's zero-centred norm weight w as the 1 + w the norm multiplies by (float64, one rounding)."""
    return (1.0 + a.astype(np.float64)).astype(np.float32)


@dataclass
class Qwen35Config:
    vocab_size: int
    d_model: int
    n_layer: int
    layer_types: list[str]
    ffn_dim: int
    # full attention
    attn_heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    # Gated DeltaNet
    lin_k_heads: int
    lin_v_heads: int
    lin_k_dim: int
    lin_v_dim: int
    d_conv: int
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # only for llama.cpp's GGUF metadata (the graphs do not read them)
    context_length: int = 262144  # max_position_embeddings (never the KV ring: that is max_context)
    full_attention_interval: int = 4
    mrope_section: list[int] = dataclasses.field(default_factory=lambda: [11, 11, 10])

    def mixer(self) -> GatedDeltaNetMixer:
        return GatedDeltaNetMixer(self.lin_k_heads, self.lin_v_heads, self.lin_k_dim, self.lin_v_dim, self.d_conv,
                                  self.norm_eps)


def read_qwen35_config(src, dense: bool = True) -> Qwen35Config:
    """The config of the dense model (`dense`: intermediate_size required) or of the MoE families'
    shared part (intermediate_size 0 where absent)."""
    where = f"{src.path}/config.json"
    top = src.config
    cfg = top.get("text_config") or top  # Qwen3_5ForConditionalGeneration nests the language model's
    if "text_config" in top:
        where += " text_config"
    n = int(cfg_get(cfg, ("num_hidden_layers",), where=where))
    types = cfg.get("layer_types")
    if types is None:  # transformers' default: every `full_attention_interval`-th layer is full attention
        every = int(cfg_get(cfg, ("full_attention_interval",), 4, where))
        types = [FULL if (i + 1) % every == 0 else LINEAR for i in range(n)]
    bad = sorted({x for x in types if x not in (LINEAR, FULL)})
    if bad or len(types) != n:
        raise UnsupportedError(f"{where}: layer_types must list {n} of {LINEAR!r} / {FULL!r}; got "
                               + (f"{bad[0]!r}" if bad else f"{len(types)} entries"))
    act = cfg_get(cfg, ("hidden_act",), "silu", where)
    if act != "silu":
        raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (silu)")
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        raise UnsupportedError(f"{where}: rope_parameters.rope_type {rp.get('rope_type')!r} is not supported (default)")
    theta = rp.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise UnsupportedError(f"{where}: missing key; expected rope_parameters.rope_theta or rope_theta")
    heads = int(cfg_get(cfg, ("num_attention_heads",), where=where))
    d = int(cfg_get(cfg, ("hidden_size",), where=where))
    hd = int(cfg_get(cfg, ("head_dim",), d // heads, where))
    prf = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25)))
    lk, lv = int(cfg_get(cfg, ("linear_num_key_heads",), where=where)), int(cfg_get(cfg, ("linear_num_value_heads",),
                                                                                   where=where))
    if LINEAR in types and lv % lk:
        raise UnsupportedError(f"{where}: linear_num_value_heads {lv} is not a multiple of linear_num_key_heads {lk}")
    tie = top.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    return Qwen35Config(
        vocab_size=int(cfg_get(cfg, ("vocab_size",), where=where)), d_model=d, n_layer=n, layer_types=list(types),
        ffn_dim=int(cfg_get(cfg, ("intermediate_size",), *(() if dense else (0,)), where=where)),
        attn_heads=heads, kv_heads=int(cfg_get(cfg, ("num_key_value_heads",), heads, where)), head_dim=hd,
        rotary_dim=int(hd * prf), rope_theta=float(theta),
        lin_k_heads=lk, lin_v_heads=lv, lin_k_dim=int(cfg_get(cfg, ("linear_key_head_dim",), where=where)),
        lin_v_dim=int(cfg_get(cfg, ("linear_value_head_dim",), where=where)),
        d_conv=int(cfg_get(cfg, ("linear_conv_kernel_dim",), 4, where)),
        norm_eps=float(cfg_get(cfg, ("rms_norm_eps",), 1e-6, where)),
        tie_embeddings=bool(tie) or not src.has("lm_head.weight"),
        context_length=int(cfg_get(cfg, ("max_position_embeddings",), 262144, where)),
        full_attention_interval=int(cfg_get(cfg, ("full_attention_interval",), 4, where)),
        mrope_section=[int(x) for x in rp.get("mrope_section", [11, 11, 10])])


def gated_attention(b: GraphBuilder, a: Value, o: str, ring_k: Value, ring_v: Value, position: Value, pos: Value,
                    c: Qwen35Config, tokens: int | None) -> tuple[Value, Value, Value]:
    """Qwen3.5's full attention on the normed input a (b, t, d). Returns (out (b, t, d), new rings)."""
    H, Hkv, hd = c.attn_heads, c.kv_heads, c.head_dim
    q, gate = linear(b, a, o + "q", o + "q_bias").reshape(0, 0, H, 2 * hd).split([hd, hd])  # (b, t, H, hd) each
    k = linear(b, a, o + "k", o + "k_bias").reshape(0, 0, Hkv, hd)
    v = linear(b, a, o + "v", o + "v_bias").reshape(0, 0, Hkv, hd).transpose(0, 2, 1, 3)  # (b, Hkv, t, hd)
    q = rms_norm(b, q, o + "q_norm", c.norm_eps).transpose(0, 2, 1, 3)  # (b, H, t, hd)
    k = rms_norm(b, k, o + "k_norm", c.norm_eps).transpose(0, 2, 1, 3)
    q, k = (rope(b, x, pos, hd, c.rope_theta, c.rotary_dim) for x in (q, k))
    # the prefill graphs (which also decode) read only the filled slots of a ring under a third full;
    # the step graph stays free of control flow (mobile runtimes)
    y, nk, nv = attention(b, q, k, v, ring_k, ring_v, position, H, Hkv, hd, hd ** -0.5, early_exit=tokens != 1)
    y = y.transpose(0, 2, 1, 3).reshape(0, 0, H * hd) * gate.reshape(0, 0, H * hd).sigmoid()
    return linear(b, y, o + "o", o + "o_bias"), nk, nv


class Qwen35Gguf(ArchMap):
    """llama.cpp's `qwen35`, metadata as its converter writes it (run with --no-mtp: edgeseq leaves the
    MTP head out). Tensors: the table's gguf column (value heads in llama.cpp's tiled order)."""

    arch = "qwen35"

    def supports(self, fam):
        c = fam.config
        if c.lin_k_dim != c.lin_v_dim:
            return "llama.cpp's qwen35 needs linear_key_head_dim = linear_value_head_dim"
        if sum(c.mrope_section) > c.rotary_dim // 2:
            return "llama.cpp's qwen35 needs the mrope sections within half the rotated channels"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        return [u32("block_count", c.n_layer), u32("context_length", c.context_length),
                u32("embedding_length", c.d_model), u32("feed_forward_length", c.ffn_dim),
                u32("attention.head_count", c.attn_heads), u32("attention.head_count_kv", c.kv_heads),
                f32("rope.freq_base", c.rope_theta), f32("attention.layer_norm_rms_epsilon", c.norm_eps),
                u32("attention.key_length", c.head_dim), u32("attention.value_length", c.head_dim),
                u32("ssm.conv_kernel", c.d_conv), u32("ssm.state_size", c.lin_k_dim),
                u32("ssm.group_count", c.lin_k_heads), u32("ssm.time_step_rank", c.lin_v_heads),
                u32("ssm.inner_size", c.lin_v_heads * c.lin_v_dim),
                ("attention.recurrent_layers", [t == LINEAR for t in c.layer_types], "bools"),
                u32("full_attention_interval", c.full_attention_interval),
                u32("rope.dimension_count", c.rotary_dim),
                ("rope.dimension_sections", (list(c.mrope_section) + [0, 0, 0, 0])[:4], "i32s")]

    def config(self, g):
        a = g.arch_key
        vocab, d = g.tensor("token_embd.weight").shape
        rec, n = [bool(x) for x in g.need(a("attention.recurrent_layers"))], g.need(a("block_count"), int)
        if len(rec) != n:
            raise EdgeseqError(f"{g.path}: attention.recurrent_layers has {len(rec)} entries, block_count is {n}")
        hv, inner = g.need(a("ssm.time_step_rank"), int), g.need(a("ssm.inner_size"), int)
        if hv <= 0 or inner % hv:
            raise EdgeseqError(f"{g.path}: ssm.time_step_rank {hv} does not divide ssm.inner_size {inner}")
        return dict(vocab_size=vocab, d_model=d, n_layer=n,
                    layer_types=[LINEAR if r else FULL for r in rec],
                    ffn_dim=int(g.get(a("feed_forward_length"), 0)), attn_heads=g.need(a("attention.head_count"), int),
                    kv_heads=g.need(a("attention.head_count_kv"), int), head_dim=g.need(a("attention.key_length"), int),
                    rotary_dim=g.need(a("rope.dimension_count"), int), rope_theta=float(g.need(a("rope.freq_base"))),
                    lin_k_heads=g.need(a("ssm.group_count"), int), lin_v_heads=hv,
                    lin_k_dim=g.need(a("ssm.state_size"), int), lin_v_dim=inner // hv,
                    d_conv=g.need(a("ssm.conv_kernel"), int), norm_eps=float(g.need(a("attention.layer_norm_rms_epsilon"))),
                    tie_embeddings="output.weight" not in g.tensors,
                    context_length=g.need(a("context_length"), int),
                    full_attention_interval=int(g.get(a("full_attention_interval"), 4)),
                    mrope_section=[int(x) for x in g.get(a("rope.dimension_sections"), [11, 11, 10, 0])][:3])


@register("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
class Qwen35(Family):
    name = "qwen35"
    gguf = Qwen35Gguf()  # llama.cpp runs it
    Config = Qwen35Config
    prefill_chunk = 128  # the attention scores grow with chunk x (ring + chunk)
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    @classmethod
    def read_config(cls, src) -> Qwen35Config:
        return read_qwen35_config(src)

    def layout(self, src):
        # Qwen3_5ForConditionalGeneration keeps the language model under model.language_model.
        return None, ("model.language_model." if src.has("model.language_model.embed_tokens.weight") else "model.")

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        return hybrid_state((kind != LINEAR for kind in c.layer_types), c.mixer,
                            lambda i: ring_state(i, c.kv_heads, c.head_dim, "full-attention", "after QK-norm and RoPE"))

    def tensors(self):
        c = self.config
        rows = [Row("embed", "{p}embed_tokens.weight", gguf="token_embd.weight")]
        for i, kind in enumerate(c.layer_types):
            m, o, g = f"{{p}}layers.{i}.", f"layers.{i}.", f"blk.{i}."
            rows += [Row(o + "norm", m + "input_layernorm.weight", one_plus, gguf=g + "attn_norm.weight")]
            if kind == LINEAR:
                rows += c.mixer().tensors(m + "linear_attn.", o, g)
            else:
                a = m + "self_attn."
                gg = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output"}
                rows += [*(Row(f"{o}{n}", f"{a}{n}_proj.weight", t, gguf=f"{g}{gg[n]}.weight", codec=T) for n in "qkvo"),
                         *(Row(f"{o}{n}_bias", f"{a}{n}_proj.bias", optional=True, gguf=f"{g}{gg[n]}.bias")
                           for n in "qkvo"),
                         Row(o + "q_norm", a + "q_norm.weight", one_plus, gguf=g + "attn_q_norm.weight"),
                         Row(o + "k_norm", a + "k_norm.weight", one_plus, gguf=g + "attn_k_norm.weight")]
            rows += [Row(o + "ffn_norm", m + "post_attention_layernorm.weight", one_plus,
                         gguf=g + "post_attention_norm.weight"), *self.ffn_rows(i, m + "mlp.", o, g)]
        rows.append(Row("norm_f", "{p}norm.weight", one_plus, gguf="output_norm.weight"))
        if not c.tie_embeddings:
            rows.append(Row("lm_head", "lm_head.weight", t, gguf="output.weight", codec=T))
        return rows

    def ffn_rows(self, i: int, f: str, o: str, g: str) -> list[Row]:
        """Layer i's feed-forward rows (checkpoint names under `f`, `…mlp.`): the dense MLP; the MoE
        families override it with `ffn`."""
        return [Row(f"{o}{n}", f"{f}{n}_proj.weight", t, gguf=f"{g}ffn_{n}.weight", codec=T)
                for n in ("gate", "up", "down")]

    def ffn(self, b: GraphBuilder, m: Value, o: str, i: int, fused: bool = False) -> Value:
        """Layer i's feed-forward on the normed input m (b, t, d); `fused`: the fused flavour's graph."""
        return linear(b, linear(b, m, o + "gate").silu() * linear(b, m, o + "up"), o + "down")

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
                if kind == LINEAR:
                    y, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = mixer(
                        b, a, o, state[p + "conv_state"], state[p + "recurrent_state"], tokens == 1, fused)
                else:
                    y, out[f"present.{i}.key"], out[f"present.{i}.value"] = gated_attention(
                        b, a, o, state[p + "key"], state[p + "value"], state["position"], pos, c, tokens)
                x = x + y
                m = rms_norm(b, x, o + "ffn_norm", c.norm_eps)
                x = x + self.ffn(b, m, o, i, fused)
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)
