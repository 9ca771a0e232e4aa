"""Zamba2: Mamba-2 layers, and `num_mem_blocks` shared transformer blocks tied cyclically over the
hybrid layers (Zyphra; transformers' Zamba2ForCausalLM).

Symbols: b batch · t tokens · d model width · L layers · U hybrid layers ("uses" of a shared block;
use u runs block u % num_mem_blocks) · H attention heads (Hkv key/value heads) · hd = 2d / H ·
f MLP width · r adapter (LoRA) rank · R the KV ring length (max_context, chosen per session).

    e = embed(ids)                                   (b, t, d)   kept: every shared block reads it
    x = e
    per layer i:
        if i is hybrid (use u, block k):
            a = rms_norm(concat(x, e))               (b, t, 2d)
            q/k/v = a W_k + a A_u B_u                 per-use LoRA on q, k, v when use_shared_attention_adapter
            q, k = rope(q, k) when use_mem_rope
            o = attention(q, k, v over the ring) W_o  (b, t, d)   scale (hd/2)^-1/2, causal, full
            m = rms_norm(o);  [g, up] = m W_gu + m A_u B_u   (per-use LoRA on the MLP, always)
            s = (gelu(g) * up W_down) W_linear_i      (b, t, d)
            x = x + mamba2_i(rms_norm(x + s))        the residual skips s
        else:
            x = x + mamba2_i(rms_norm(x))
    logits = head(rms_norm(x))

The Mamba-2 mixer is edgeseq.mixers.mamba2, with the dt clamp at time_step_min on every
token (transformers' full forward applies it; its cached one-token decode does not, and drifts).
Attention state: one ring per hybrid layer, `past_key_values.{i}.key` / `.value`
(b, Hkv, max_context, hd), keys stored after RoPE (kernels/attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, norm_and_head, ring_state
from edgeseq.graph import GraphBuilder
from edgeseq.kernels.attention import token_positions
from edgeseq.kernels.ops import linear, rms_norm, split
from edgeseq.mixers.mamba2 import Mamba2Mixer
from edgeseq.mixers.zyphra import GELU, MAX_CONTEXT, P, lora, shared_attention, shared_blocks
from edgeseq.tensor_table import Derived, Row, t



@dataclass
class Zamba2Config:
    vocab_size: int
    d_model: int
    n_layer: int
    hybrid_layers: list[int]
    num_mem_blocks: int
    use_block: list[int]  # use u (the u-th hybrid layer) runs stored block use_block[u]
    block_layer: list[int]  # stored block k: the checkpoint layer whose shared_transformer holds it
    adapter_layer: list[int]  # use u: the checkpoint layer whose module holds its adapters (index u)
    # Mamba-2 mixer
    d_inner: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int
    dt_min: float
    # shared transformer blocks
    attn_heads: int
    kv_heads: int
    attn_head_dim: int
    ffn_dim: int
    adapter_rank: int
    attn_adapters: bool
    mem_rope: bool
    rope_theta: float
    gelu: str  # ONNX Gelu approximate: none | tanh
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def mixer(self) -> Mamba2Mixer:
        # the gated group norm inside the mixer uses eps 1e-5 whatever rms_norm_eps says (as transformers)
        return Mamba2Mixer(self.d_inner, self.n_heads, self.head_dim, self.n_groups, self.d_state, self.d_conv,
                           1e-5, self.dt_min, None)


def read_zamba2_config(src) -> Zamba2Config:
    cfg, where = src.config, f"{src.path}/config.json"
    d = src.shape(P + "embed_tokens.weight")[1]
    vocab = src.shape(P + "embed_tokens.weight")[0]
    types = cfg_get(cfg, ("layers_block_type", "layer_types"), where=where)
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    if not hybrid:
        raise UnsupportedError(f"{where}: no hybrid layer in layers_block_type; that is a plain Mamba-2 model")
    m = f"{P}layers.0.{'mamba_decoder.' if 0 in hybrid else ''}mamba."
    n_heads = src.shape(m + "A_log")[0]
    d_inner = src.shape(m + "norm.weight")[0]
    conv_dim, _, d_conv = src.shape(m + "conv1d.weight")
    groups = int(cfg_get(cfg, ("mamba_ngroups",), 1, where))
    heads = int(cfg_get(cfg, ("num_attention_heads",), where=where))
    kv = int(cfg_get(cfg, ("num_key_value_heads",), heads, where))
    att = f"{P}layers.{hybrid[0]}.shared_transformer."
    q_rows = src.shape(att + "self_attn.q_proj.weight")[0]
    rope_p = cfg.get("rope_parameters") or {}
    if rope_p.get("rope_type", "default") != "default" or cfg.get("use_long_context"):
        raise UnsupportedError(f"{where}: only the default RoPE is supported (use_long_context / rope scaling is not)")
    act = cfg_get(cfg, ("hidden_act",), "gelu", where)
    if act not in GELU:
        raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported ({', '.join(GELU)})")
    nmb = int(cfg_get(cfg, ("num_mem_blocks",), 1, where))
    use_block, block_layer, adapter_layer = shared_blocks(src, hybrid, nmb)
    return Zamba2Config(
        vocab_size=vocab, d_model=d, n_layer=len(types), hybrid_layers=hybrid, num_mem_blocks=nmb,
        use_block=use_block, block_layer=block_layer, adapter_layer=adapter_layer,
        d_inner=d_inner, n_heads=n_heads, head_dim=d_inner // n_heads, n_groups=groups,
        d_state=(conv_dim - d_inner) // (2 * groups), d_conv=d_conv,
        dt_min=float(cfg_get(cfg, ("time_step_min",), 0.001, where)),
        attn_heads=heads, kv_heads=kv, attn_head_dim=q_rows // heads,
        ffn_dim=src.shape(att + "feed_forward.down_proj.weight")[1],
        adapter_rank=int(cfg_get(cfg, ("adapter_rank",), 128, where)),
        attn_adapters=bool(cfg.get("use_shared_attention_adapter", False)),
        mem_rope=bool(cfg.get("use_mem_rope", False)),
        rope_theta=float(rope_p.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        gelu=GELU[act], norm_eps=float(cfg_get(cfg, ("rms_norm_eps",), 1e-5, where)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)) or not src.has("lm_head.weight"))


@register("Zamba2ForCausalLM")
class Zamba2(Family):
    name = "zamba2"
    Config = Zamba2Config
    prefill_chunk = 128  # the attention scores grow with chunk x (ring + chunk)
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    @classmethod
    def read_config(cls, src) -> Zamba2Config:
        return read_zamba2_config(src)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        out = []
        mixer = c.mixer()
        for i in range(c.n_layer):
            out += mixer.state_spec(i)
            if i in c.hybrid_layers:
                out += ring_state(i, c.kv_heads, c.attn_head_dim, "shared-attention", "after RoPE" if c.mem_rope else "")
        return out

    def tensors(self):
        c = self.config
        mixer = c.mixer()
        rows = [Row("embed", P + "embed_tokens.weight")]
        for i in range(c.n_layer):
            hyb = i in c.hybrid_layers
            m, o = f"{P}layers.{i}.{'mamba_decoder.' if hyb else ''}", f"layers.{i}."
            rows += [Row(o + "norm", m + "input_layernorm.weight"), *mixer.tensors(m + "mamba.", o, f"blk.{i}.")]
            if hyb:
                rows.append(Row(o + "linear", f"{P}layers.{i}.linear.weight", t))
        for k, i in enumerate(c.block_layer):
            s, o = f"{P}layers.{i}.shared_transformer.", f"blocks.{k}."
            rows += [Row(o + "attn_norm", s + "input_layernorm.weight"),
                     *(Row(o + n, f"{s}self_attn.{n}_proj.weight", t) for n in "qkvo"),
                     Row(o + "ffn_norm", s + "pre_ff_layernorm.weight"),
                     Row(o + "gate_up", s + "feed_forward.gate_up_proj.weight", t),
                     Row(o + "down", s + "feed_forward.down_proj.weight", t)]
        # per-use adapters live in the module of the use's block, at the use's index
        for u in range(len(c.hybrid_layers)):
            s = f"{P}layers.{c.adapter_layer[u]}.shared_transformer."
            lists = [("mlp", f"feed_forward.gate_up_proj_adapter_list.{u}.")]
            if c.attn_adapters:
                lists += [(n, f"self_attn.linear_{n}_adapter_list.{u}.") for n in "qkv"]
            for n, a in lists:
                rows += [Row(f"uses.{u}.{n}_a", s + a + "0.weight", t), Row(f"uses.{u}.{n}_b", s + a + "1.weight", t)]
        rows += [Derived("head_expand", mixer.head_expand), Row("norm_f", P + "final_layernorm.weight")]
        if not c.tie_embeddings:
            rows.append(Row("lm_head", "lm_head.weight", t))
        return rows

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        mixer = c.mixer()
        e = embed(b, ids)  # (b, t, d)
        pos = token_positions(b, state["position"], ids, 1) if c.mem_rope else None
        scale = (c.attn_head_dim / 2) ** -0.5  # Zamba2's: the block input is two streams wide
        x, out = e, {}
        for i in range(c.n_layer):
            h = x
            if i in c.hybrid_layers:
                u = c.hybrid_layers.index(i)
                blk, use = f"blocks.{c.use_block[u]}.", f"uses.{u}."
                a = rms_norm(b, b.concat(x, e, axis=-1), blk + "attn_norm", c.norm_eps)  # (b, t, 2d)
                o, out[f"present.{i}.key"], out[f"present.{i}.value"] = shared_attention(
                    b, a, blk, use, state[f"past_key_values.{i}.key"], state[f"past_key_values.{i}.value"],
                    state["position"], pos, c.attn_heads, c.kv_heads, c.attn_head_dim, scale, c.rope_theta, tokens)
                f = rms_norm(b, o, blk + "ffn_norm", c.norm_eps)
                g, up = split(b, lora(b, f, linear(b, f, blk + "gate_up"), use + "mlp"), [c.ffn_dim, c.ffn_dim])
                s = linear(b, g.gelu(c.gelu) * up, blk + "down")
                h = x + linear(b, s, f"layers.{i}.linear")
            y, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = mixer(
                b, rms_norm(b, h, f"layers.{i}.norm", c.norm_eps), f"layers.{i}.",
                state[f"past_key_values.{i}.conv_state"], state[f"past_key_values.{i}.recurrent_state"], tokens == 1,
                fused)
            x = x + y
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)

    def quant_policy(self, name, shape):
        return "f32" if name == "head_expand" else None  # an exact 0/1 expansion, not a learned matrix
