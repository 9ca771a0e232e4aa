"""Zamba (v1): multi-head Mamba-1 layers and one shared attention block (Zyphra; transformers'
ZambaForCausalLM).

Symbols: b batch · t tokens · d model width · di = expand·d · nh Mamba heads of hd = di/nh channels
· n state size · r dt rank (per head) · H attention heads (Hkv key/value heads) · hd_a = 2d / H.

    e = embed(ids);  x = e
    per layer i:
        if i is hybrid:
            a = rms_norm(concat(x, e))                       (b, t, 2d)
            o = attention(a W_q, a W_k, a W_v over the ring) W_o    scale (hd_a/2)^-1/2, causal, no RoPE
            m = rms_norm(o);  s = ((gelu(m W_gate) * m W_up) W_down) W_linear_i
            x = x + mamba_i(rms_norm(x + s))                 the residual skips s
        else:
            x = x + mamba_i(rms_norm(x))
    mamba_i (per head h, channels c of the head):
        [x_in, z] = de-interleaved in_proj(h)                 transformers views in_proj's rows as (di, 2)
        u = silu(conv(x_in));  [dt_r, B_h, C_h] = u_h X_h    each head has its own x_proj, B and C (n)
        dt = softplus(dt_r DT_h + dt_bias)                   (b, t, di)
        h_t = exp(dt·A) ⊙ h_{t-1} + (dt·u) ⊗ B_h             (b, di, n)
        y = (h_t · C_h + D ⊙ u) * silu(z);  out_proj(y)

State per layer: Mamba-1's conv_state (di, k-1) and recurrent_state (di, n) (heads flattened into
channels); per hybrid layer the attention ring `key` / `value` (Hkv, max_context, hd_a).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor, cfg_get
from edgeseq.families.common import embed, norm_and_head, ring_state
from edgeseq.mixers.zyphra import GELU, MAX_CONTEXT, P, shared_attention, shared_blocks
from edgeseq.graph import GraphBuilder
from edgeseq.kernels.ops import linear, rms_norm
from edgeseq.mixers.mamba1 import Mamba1Mixer
from edgeseq.tensor_table import Row, t

BLOCK_TENSORS = ("input_layernorm.weight", "pre_ff_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                 "feed_forward.gate_proj.weight", "feed_forward.up_proj.weight", "feed_forward.down_proj.weight")


@dataclass
class ZambaConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    hybrid_layers: list[int]
    use_block: list[int]  # hybrid use u runs stored block use_block[u] (one block when tied)
    block_layer: list[int]  # stored block k: the checkpoint layer holding its weights
    d_inner: int
    n_heads: int  # Mamba heads
    d_state: int
    d_conv: int
    dt_rank: int
    attn_heads: int
    kv_heads: int
    attn_head_dim: int
    ffn_dim: int
    gelu: str
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def mixer(self) -> Mamba1Mixer:
        return Mamba1Mixer(self.d_inner, self.d_state, self.d_conv, self.dt_rank, n_heads=self.n_heads)


@register("ZambaForCausalLM")
class Zamba(Family):
    name = "zamba"
    Config = ZambaConfig
    prefill_chunk = 64  # the selective scan expands every token to (di, n), and attention grows with the ring
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    @classmethod
    def read_config(cls, src) -> ZambaConfig:
        cfg, where = src.config, f"{src.path}/config.json"
        vocab, d = src.shape(P + "embed_tokens.weight")
        types = cfg_get(cfg, ("layers_block_type", "layer_types"), where=where)
        hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
        if not hybrid:
            raise UnsupportedError(f"{where}: no hybrid layer in layers_block_type")
        m = f"{P}layers.0.{'mamba_decoder.' if 0 in hybrid else ''}mamba."
        nh, hd, n = src.shape(m + "A_log")
        r = src.shape(m + "dt_proj_weight")[2]
        heads = int(cfg_get(cfg, ("num_attention_heads",), where=where))
        kv = int(cfg_get(cfg, ("num_key_value_heads",), heads, where))
        act = cfg_get(cfg, ("hidden_act",), "gelu", where)
        if act not in GELU:
            raise UnsupportedError(f"{where}: hidden_act {act!r} is not supported ({', '.join(GELU)})")
        if cfg_get(cfg, ("hidden_mamba_act",), "silu", where) != "silu":
            raise UnsupportedError(f"{where}: hidden_mamba_act {cfg['hidden_mamba_act']!r} is not supported (silu)")
        use_block, block_layer, _ = shared_blocks(src, hybrid, 1, "shared_transf", BLOCK_TENSORS)
        att = f"{P}layers.{block_layer[0]}.shared_transf."
        return ZambaConfig(
            vocab_size=vocab, d_model=d, n_layer=len(types), hybrid_layers=hybrid, use_block=use_block,
            block_layer=block_layer, d_inner=nh * hd, n_heads=nh, d_state=n,
            d_conv=src.shape(m + "conv1d.weight")[2], dt_rank=r, attn_heads=heads, kv_heads=kv,
            attn_head_dim=src.shape(att + "self_attn.q_proj.weight")[0] // heads,
            ffn_dim=src.shape(att + "feed_forward.down_proj.weight")[1], gelu=GELU[act],
            norm_eps=float(cfg_get(cfg, ("rms_norm_eps",), 1e-5, where)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)) or not src.has("lm_head.weight"))

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        out, mixer = [], c.mixer()
        for i in range(c.n_layer):
            out += mixer.state_spec(i)
            if i in c.hybrid_layers:
                out += ring_state(i, c.kv_heads, c.attn_head_dim, "shared-attention")
        return out

    def tensors(self):
        c = self.config
        mixer = c.mixer()
        rows = [Row("embed", P + "embed_tokens.weight")]
        for i in range(c.n_layer):
            hyb = i in c.hybrid_layers
            pre, o = f"{P}layers.{i}.{'mamba_decoder.' if hyb else ''}", f"layers.{i}."
            rows += [Row(o + "norm", pre + "input_layernorm.weight"),
                     *mixer.tensors(pre + "mamba.", o, f"blk.{i}.", zamba=True)]
            if hyb:
                rows.append(Row(o + "linear", f"{P}layers.{i}.linear.weight", t))
        for k, i in enumerate(c.block_layer):
            s, o = f"{P}layers.{i}.shared_transf.", f"blocks.{k}."
            rows += [Row(o + "attn_norm", s + "input_layernorm.weight"),
                     *(Row(o + n, f"{s}self_attn.{n}_proj.weight", t) for n in "qkvo"),
                     Row(o + "ffn_norm", s + "pre_ff_layernorm.weight"),
                     *(Row(o + n, f"{s}feed_forward.{n}_proj.weight", t) for n in ("gate", "up", "down"))]
        rows.append(Row("norm_f", P + "final_layernorm.weight"))
        if not c.tie_embeddings:
            rows.append(Row("lm_head", "lm_head.weight", t))
        return rows

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        mixer = c.mixer()
        e = embed(b, ids)  # (b, t, d)
        scale = (c.attn_head_dim / 2) ** -0.5
        x, out = e, {}
        for i in range(c.n_layer):
            o, h = f"layers.{i}.", x
            if i in c.hybrid_layers:
                blk = f"blocks.{c.use_block[c.hybrid_layers.index(i)]}."
                a = rms_norm(b, b.concat(x, e, axis=-1), blk + "attn_norm", c.norm_eps)  # (b, t, 2d)
                att, out[f"present.{i}.key"], out[f"present.{i}.value"] = shared_attention(
                    b, a, blk, None, state[f"past_key_values.{i}.key"], state[f"past_key_values.{i}.value"],
                    state["position"], None, c.attn_heads, c.kv_heads, c.attn_head_dim, scale, 0.0, tokens)
                f = rms_norm(b, att, blk + "ffn_norm", c.norm_eps)
                g = linear(b, f, blk + "gate").gelu(c.gelu)
                s = linear(b, g * linear(b, f, blk + "up"), blk + "down")
                h = x + linear(b, s, o + "linear")
            y, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = mixer(
                b, rms_norm(b, h, o + "norm", c.norm_eps), o, state[f"past_key_values.{i}.conv_state"],
                state[f"past_key_values.{i}.recurrent_state"], tokens == 1, fused)
            x = x + y
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)
