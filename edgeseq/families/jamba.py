"""Jamba (AI21; transformers' JambaForCausalLM, llama.cpp's `jamba`): Mamba-1 layers with RMS norms on dt,
B and C, full-attention layers without positional encoding, and a mixture of experts in place of the MLP
every few layers.

Symbols: b batch · t tokens · d model width · L layers · H attention heads (Hkv key/value heads) ·
hd = d / H head dim · di = mamba_expand·d · n state size · r dt rank · k conv width · E experts, top K
· f MLP / expert width · R the KV ring length (max_context, chosen per session).

    x = embed(ids)                                   (b, t, d)
    per layer i:
        a = rms_norm(x) · w                          input_layernorm
        if i % attn_layer_period == attn_layer_offset:
            q, k, v = a Wq, a Wk, a Wv               (b, t, H|Hkv, hd): no RoPE, no QK-norm
            x = x + attention(q, k, v over the ring) Wo   scale hd^-1/2, causal, full
        else:
            x = x + mamba1_i(a)                      edgeseq.mixers.mamba1, dt / B / C each
                                                     rms_norm(·)·w (dt_layernorm, b_/c_layernorm)
        m = rms_norm(x) · w                          pre_ff_layernorm
        if i % expert_layer_period == expert_layer_offset and num_experts > 1:
            x = x + moe(m)                           softmax over E, top K weights not renormalised
        else:
            x = x + (silu(m Wg) · m Wu) Wd
    logits = head(rms_norm(x) · w)                   final_layernorm; tied or untied

Checkpoints: transformers' save_pretrained and the hub's releases both keep the experts per expert
(`feed_forward.experts.{e}.gate_proj.weight`, the router as `feed_forward.router.weight`); fused 3-D
experts (`experts.gate_up_proj` (E, 2f, d), `experts.down_proj` (E, d, f), transformers' in-memory
layout) are read too. Supported options: every layer period and offset, GQA/MQA, mamba_conv_bias on or
off, mamba_proj_bias (ONNX only: llama.cpp's jamba has no in/out projection biases), tied or untied
head. Left out: hidden_act other than silu, a head_dim other than d / H, Mini-Jamba's `.moe.` naming and
dense layers stored as `experts.0`.

State: per Mamba layer `conv_state` (di, k-1) and `recurrent_state` (di, n) (the mixer's); per attention
layer the ring `key` / `value` (Hkv, max_context, hd); `position`. GGUF: llama.cpp's jamba (the layer
pattern as head_count_kv per layer, 0 for a Mamba layer; MoE layers are those with ffn_gate_inp); models
llama.cpp cannot run (projection biases, no conv bias, no attention layer) get the generic edgeseq-jamba.
int4/int8 bundles keep the routers f32 and dt_proj 8-bit (quant_policy).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, gqa_attention, hybrid_state, norm_and_head, ring_state
from edgeseq.gguf_names import ArchMap, f32, u32
from edgeseq.graph import GraphBuilder

from edgeseq.kernels.ops import linear, rms_norm
from edgeseq.mixers.mamba1 import Mamba1Mixer
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.tensor_table import T, Row, t

MAX_CONTEXT = 4096  # the default KV ring length recorded in the manifest; sessions may choose another
FUSED = "fused-experts"  # the checkpoint layout with 3-D expert tensors


@dataclass
class JambaConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    attn_layers: list[int]
    moe_layers: list[int]
    ffn_dim: int
    attn_heads: int
    kv_heads: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    n_experts: int = 16
    top_k: int = 2
    norm_eps: float = 1e-6
    conv_bias: bool = True
    proj_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 262144  # GGUF's context_length only; the ring is max_context

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attn_heads

    def mixer(self) -> Mamba1Mixer:
        return Mamba1Mixer(self.d_inner, self.d_state, self.d_conv, self.dt_rank, rms_eps=self.norm_eps,
                           norm_weights=True)

    def moe(self) -> MoeFeedForward:
        return MoeFeedForward(self.d_model, self.n_experts, self.top_k, self.ffn_dim, norm_topk=False,
                              expert_bias=False, score="softmax", names=("gate_proj", "up_proj", "down_proj"))


def pattern(n: int, period: int, offset: int) -> list[int]:
    """transformers' layers_block_type / layers_num_experts rule: the layers i with i % period == offset."""
    return [i for i in range(n) if i % period == offset]


def read_jamba_config(src) -> JambaConfig:
    cfg, where = src.config, f"{src.path}/config.json"
    n = int(cfg_get(cfg, ("num_hidden_layers",), where=where))
    periods = {}
    for key, default in (("attn_layer_period", 8), ("attn_layer_offset", 4), ("expert_layer_period", 2),
                         ("expert_layer_offset", 1)):
        periods[key] = int(cfg_get(cfg, (key,), default, where))
    for kind in ("attn", "expert"):
        p, o = periods[f"{kind}_layer_period"], periods[f"{kind}_layer_offset"]
        if not 0 <= o < p:
            raise UnsupportedError(f"{where}: {kind}_layer_offset {o} must be at least 0 and below "
                                   f"{kind}_layer_period {p}")
    act = cfg_get(cfg, ("hidden_act",), "silu", where)
    if act not in ("silu", "swish"):
        raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    d = int(cfg_get(cfg, ("hidden_size",), where=where))
    heads = int(cfg_get(cfg, ("num_attention_heads",), where=where))
    kv = int(cfg_get(cfg, ("num_key_value_heads",), heads, where))
    if d % heads or heads % kv:
        raise UnsupportedError(f"{where}: hidden_size {d}, num_attention_heads {heads} and num_key_value_heads {kv} "
                               "must divide evenly")
    hd = cfg.get("head_dim")
    if hd is not None and int(hd) != d // heads:
        raise UnsupportedError(f"{where}: head_dim {hd} other than hidden_size / num_attention_heads is not supported")
    if any(".moe." in k for k in src.keys()):
        raise UnsupportedError(f"{src.path}: Mini-Jamba's `.moe.` tensor names are not supported")
    E = int(cfg_get(cfg, ("num_experts", "num_local_experts"), 16, where))
    k = int(cfg_get(cfg, ("num_experts_per_tok",), 2, where))
    attn = pattern(n, periods["attn_layer_period"], periods["attn_layer_offset"])
    moe = pattern(n, periods["expert_layer_period"], periods["expert_layer_offset"]) if E > 1 else []
    if moe and not 0 < k <= E:
        raise UnsupportedError(f"{where}: num_experts_per_tok {k} must be 1 to num_experts ({E})")
    if not moe:  # no expert layer: k is unused, and llama.cpp aborts on a GGUF whose expert_used_count
        k = max(1, min(k, E))  # exceeds expert_count (as the converter writes transformers' default k = 2, E = 1)
    mamba = next((i for i in range(n) if i not in attn), None)
    if mamba is None:
        raise UnsupportedError(f"{where}: attn_layer_period {periods['attn_layer_period']} leaves no Mamba layer")
    m = f"model.layers.{mamba}.mamba."
    for i in (attn[0] if attn else None, mamba):  # the weights follow the declared pattern
        want = f"model.layers.{i}.self_attn.q_proj.weight" if i in attn else m + "A_log"
        if i is not None and not src.has(want):
            raise EdgeseqError(f"{src.path}: config.json's attn_layer_period/offset put layer {i} as "
                               f"{'attention' if i in attn else 'Mamba'}, but the weights lack {want}")
    di, n_state = src.shape(m + "A_log")
    expand = cfg.get("mamba_expand")
    if expand is not None and int(expand) * d != di:
        raise EdgeseqError(f"{src.path}: mamba_expand {expand} x hidden_size {d} != {m}A_log's {di} rows")
    return JambaConfig(
        vocab_size=int(src.shape("model.embed_tokens.weight")[0]), d_model=d, n_layer=n, attn_layers=attn,
        moe_layers=moe, ffn_dim=int(cfg_get(cfg, ("intermediate_size",), where=where)), attn_heads=heads,
        kv_heads=kv, d_inner=di, d_state=n_state, d_conv=int(src.shape(m + "conv1d.weight")[-1]),
        dt_rank=int(src.shape(m + "dt_proj.weight")[1]), n_experts=E, top_k=k,
        norm_eps=float(cfg_get(cfg, ("rms_norm_eps",), 1e-6, where)), conv_bias=src.has(m + "conv1d.bias"),
        proj_bias=src.has(m + "in_proj.bias") or src.has(m + "out_proj.bias"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) or not src.has("lm_head.weight"),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 262144))


class JambaGguf(ArchMap):
    """llama.cpp's jamba: the attention layers as head_count_kv per layer (0 for a Mamba layer), the
    experts stacked (E, out, in), the router as ffn_gate_inp; softmax routing, top k not renormalised."""

    arch = "jamba"
    family = "jamba"

    def supports(self, fam):
        c = fam.config
        if c.proj_bias:
            return "llama.cpp's jamba has no Mamba in/out projection biases (mamba_proj_bias)"
        if not c.conv_bias:
            return "llama.cpp's jamba needs the Mamba conv bias (mamba_conv_bias)"
        if not c.attn_layers:  # measured: GGML_ASSERT(buffer) in ggml-backend.cpp (an empty KV cache)
            return "llama.cpp's jamba aborts on a model without attention layers (attn_layer_offset)"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        kv = [c.kv_heads if i in c.attn_layers else 0 for i in range(c.n_layer)]
        return [u32("block_count", c.n_layer), u32("context_length", c.max_position_embeddings),
                u32("embedding_length", c.d_model), u32("feed_forward_length", c.ffn_dim),
                u32("attention.head_count", c.attn_heads), ("attention.head_count_kv", kv, "i32s"),
                u32("ssm.conv_kernel", c.d_conv), u32("ssm.inner_size", c.d_inner),
                u32("ssm.state_size", c.d_state), u32("ssm.time_step_rank", c.dt_rank),
                f32("attention.layer_norm_rms_epsilon", c.norm_eps), u32("expert_count", c.n_experts),
                u32("expert_used_count", c.top_k)]

    def config(self, g):
        a = g.arch_key
        vocab, d = g.tensor("token_embd.weight").shape
        n = g.need(a("block_count"), int)
        kv = g.need(a("attention.head_count_kv"))
        kv = [int(x) for x in (kv if isinstance(kv, (list, tuple, np.ndarray)) else [kv] * n)]
        if len(kv) != n or len({x for x in kv if x}) > 1:
            raise EdgeseqError(f"{g.path}: attention.head_count_kv must give one count per layer (0 for a Mamba "
                               "layer), the same for every attention layer")
        heads = g.need(a("attention.head_count"), int)
        return dict(vocab_size=vocab, d_model=d, n_layer=n, attn_layers=[i for i in range(n) if kv[i]],
                    moe_layers=[i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" in g.tensors],
                    ffn_dim=g.need(a("feed_forward_length"), int), attn_heads=heads, kv_heads=max(kv) or heads,
                    d_inner=g.need(a("ssm.inner_size"), int), d_state=g.need(a("ssm.state_size"), int),
                    d_conv=g.need(a("ssm.conv_kernel"), int), dt_rank=g.need(a("ssm.time_step_rank"), int),
                    n_experts=int(g.get(a("expert_count"), 1)), top_k=int(g.get(a("expert_used_count"), 1)),
                    norm_eps=float(g.get(a("attention.layer_norm_rms_epsilon"), 1e-6)),
                    conv_bias=any(x.endswith("ssm_conv1d.bias") for x in g.tensors), proj_bias=False,
                    tie_embeddings="output.weight" not in g.tensors,
                    max_position_embeddings=int(g.get(a("context_length"), 262144)))


def _fused_in(part: int, f: int):
    """transformers' fused gate_up_proj (E, 2f, d) -> the gate (part 0) or up (part 1) half as the
    canonical (d, E·f) (expert e's columns e·f..(e+1)·f, as moe.cat_in lays them)."""
    def load(a: np.ndarray) -> np.ndarray:
        E, _, d = a.shape
        return np.ascontiguousarray(a[:, part * f:(part + 1) * f, :].transpose(2, 0, 1).reshape(d, E * f))
    return load


def _fused_out(a: np.ndarray) -> np.ndarray:
    """transformers' fused down_proj (E, d, f) -> the canonical (E·f, d)."""
    E, d, f = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(E * f, d))


@register("JambaForCausalLM")
class Jamba(Family):
    name = "jamba"
    Config = JambaConfig
    gguf = JambaGguf()  # llama.cpp runs it
    prefill_chunk = 64  # attention grows with chunk x (ring + chunk)
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    @classmethod
    def read_config(cls, src) -> JambaConfig:
        return read_jamba_config(src)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        return hybrid_state((i in c.attn_layers for i in range(c.n_layer)), c.mixer,
                            lambda i: ring_state(i, c.kv_heads, c.head_dim, "attention", "no RoPE"))

    def layout(self, src):
        fused = any(k.endswith("feed_forward.experts.gate_up_proj") for k in src.keys())
        return (FUSED if fused else None), ""

    def moe_rows(self, f: str, o: str, g: str) -> list[Row]:
        """The shared MoE block's rows with Jamba's checkpoint names: the router is `router`, and the
        fused layout keeps the experts as two 3-D tensors."""
        c = self.config
        fused = {"experts_gate": (f + "experts.gate_up_proj", _fused_in(0, c.ffn_dim)),
                 "experts_up": (f + "experts.gate_up_proj", _fused_in(1, c.ffn_dim)),
                 "experts_down": (f + "experts.down_proj", _fused_out)}
        rows = []
        for r in c.moe().tensors(f, o, g):
            kind = r.name[len(o):]
            if kind == "router":
                r = dataclasses.replace(r, ckpt=f + "router.weight")
            elif kind in fused:
                name, load = fused[kind]
                r = dataclasses.replace(r, ckpt={"*": r.ckpt, FUSED: name}, load={"*": r.load, FUSED: load})
            rows.append(r)
        return rows

    def tensors(self):
        c = self.config
        rows = [Row("embed", "model.embed_tokens.weight", gguf="token_embd.weight")]
        for i in range(c.n_layer):
            m, o, g = f"model.layers.{i}.", f"layers.{i}.", f"blk.{i}."
            rows.append(Row(o + "norm", m + "input_layernorm.weight", gguf=g + "attn_norm.weight"))
            if i in c.attn_layers:
                a = m + "self_attn."
                rows += [Row(o + n, f"{a}{n}_proj.weight", t, gguf=f"{g}attn_{n}.weight", codec=T) for n in "qkv"]
                rows.append(Row(o + "o", a + "o_proj.weight", t, gguf=g + "attn_output.weight", codec=T))
            else:
                rows += c.mixer().tensors(m + "mamba.", o, g)
            rows.append(Row(o + "ffn_norm", m + "pre_ff_layernorm.weight", gguf=g + "ffn_norm.weight"))
            f = m + "feed_forward."
            if i in c.moe_layers:
                rows += self.moe_rows(f, o, g)
            else:
                rows += [Row(o + n, f"{f}{n}_proj.weight", t, gguf=f"{g}ffn_{n}.weight", codec=T)
                         for n in ("gate", "up", "down")]
        rows.append(Row("norm_f", "model.final_layernorm.weight", gguf="output_norm.weight"))
        if not c.tie_embeddings:
            rows.append(Row("lm_head", "lm_head.weight", t, gguf="output.weight", codec=T))
        return rows

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        mixer, moe = c.mixer(), c.moe()
        x = embed(b, ids)  # (b, t, d)
        out = {}
        for i in range(c.n_layer):
            o, p = f"layers.{i}.", f"past_key_values.{i}."
            with b.scope(f"layers.{i}"):
                a = rms_norm(b, x, o + "norm", c.norm_eps)
                if i in c.attn_layers:
                    y, out[f"present.{i}.key"], out[f"present.{i}.value"] = gqa_attention(
                        b, a, o, state[p + "key"], state[p + "value"], state["position"], tokens, c.attn_heads,
                        c.kv_heads, c.head_dim)  # no positional encoding
                else:
                    y, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = mixer(
                        b, a, o, state[p + "conv_state"], state[p + "recurrent_state"], tokens == 1, fused)
                x = x + y
                m = rms_norm(b, x, o + "ffn_norm", c.norm_eps)
                if i in c.moe_layers:
                    x = x + moe(b, m, o, fused=fused)  # fused: ONNX Runtime's MoE / QMoE where exact
                else:
                    x = x + linear(b, linear(b, m, o + "gate").silu() * linear(b, m, o + "up"), o + "down")
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)

    def quant_policy(self, name, shape):
        """Routers stay f32 (E x d each; llama.cpp's converter keeps ffn_gate_inp f32 too); dt_proj keeps
        8 bits under int4 (fan-in = the dt rank, and its error scales the whole state's decay, as Mamba)."""
        if name.endswith(".router"):
            return "f32"
        return "int8" if name.endswith(".dt_proj") else None
