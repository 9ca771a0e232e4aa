"""Nemotron-H (NVIDIA; transformers' NemotronHForCausalLM, llama.cpp's `nemotron_h` and `nemotron_h_moe`):
a stack of single-mixer blocks chosen by `hybrid_override_pattern` (or `layers_block_type`): Mamba-2
(M), attention (*), a squared-ReLU MLP (-) or a mixture of experts (E), each a residual of its own.

Symbols: b batch · t tokens · d model width · L layers · H attention heads (Hkv key/value heads) · hd
head dim (config head_dim, not d / H) · f MLP width · E experts, top K, fe expert width, fs shared
expert width · R the KV ring length (max_context, chosen per session).

    x = embed(ids)                                   (b, t, d)
    per layer i, kind pattern[i]:
        a = rms_norm(x) · w                          every block's `norm`
        M: y = mamba2_i(a)                           edgeseq.mixers.mamba2; its gated RMS norm is group-wise
                                                     (n_groups groups of di / n_groups), eps layer_norm_epsilon
        *: y = attention(a Wq, a Wk, a Wv over the ring) Wo    no RoPE, scale hd^-1/2, causal, full
        -: y = relu(a Wu)² Wd
        E: y = moe(a) + relu(a Wu_s)² Wd_s           sigmoid router, e_score_correction_bias picks (does not
                                                     weigh), top K renormalised (norm_topk_prob) and scaled
                                                     (routed_scaling_factor); ungated relu² experts
        x = x + y
    logits = head(rms_norm(x) · w)                   norm_f; lm_head

Checkpoints: the hub's releases and transformers' save_pretrained both write `backbone.` names and the
experts one by one (`mixer.experts.{e}.up_proj.weight`); the `model.` prefix and fused 3-D experts
(`mixer.experts.up_proj` (E, fe, d), `down_proj` (E, d, fe), transformers' in-memory layout) are read
too. transformers 5.25 never ties the head (an lm_head.weight is always stored): a head equal to the
embedding, or none, is the tied head. Supported: any pattern of M, *, -, E; GQA/MQA; conv bias on or
off; Mamba in/out projection biases (use_bias; ONNX only); time_step_limit clipping; n_group > 1 when
topk_group = n_group (every group chosen: plain top K). Refused with an error naming config.json's key:
group-limited routing (topk_group < n_group), moe_latent_size, mlp_bias, activations other than relu2
(MLP) and silu (Mamba). The multi-token-prediction head (mtp.*) is not read.

State: per Mamba layer `conv_state` (conv_dim, k-1) and `recurrent_state` (H_ssm, n, P) (the mixer's);
per attention layer the ring `key` / `value` (Hkv, max_context, hd); `position`. GGUF: llama.cpp's
`nemotron_h` for a model without E blocks, `nemotron_h_moe` for one with them and without dense MLP
blocks (llama.cpp's MoE graph takes every feed-forward block as MoE); a model mixing - and E blocks is
written as edgeseq-nemotron_h_moe. int4/int8 bundles keep the routers f32 (quant_policy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import Family, StateTensor
from edgeseq.families.common import (embed, gqa_attention, head_is_embedding, hybrid_state, norm_and_head,
                                     ring_state)
from edgeseq.families.lfm2 import config_key, config_number
from edgeseq.gguf_names import ArchMap, f32, u32
from edgeseq.graph import GraphBuilder

from edgeseq.kernels.ops import linear, rms_norm
from edgeseq.mixers.mamba2 import Mamba2Mixer
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.tensor_table import T, Codec, Derived, Row, t

MAX_CONTEXT = 4096  # the default KV ring length recorded in the manifest; sessions may choose another
FUSED = "fused-experts"  # the checkpoint layout with 3-D expert tensors
# every spelling of a block kind: the pattern characters, transformers' layers_block_type names and the
# older names llama.cpp's converter also accepts
KINDS = {"M": "M", "linear_attention": "M", "mamba": "M", "*": "*", "full_attention": "*", "attention": "*",
         "-": "-", "mlp": "-", "E": "E", "moe": "E"}


@dataclass
class NemotronHConfig:
    vocab_size: int
    d_model: int
    n_layer: int
    pattern: str  # one character per layer: M, *, - or E
    # Mamba-2
    ssm_heads: int = 8
    ssm_head_dim: int = 64
    n_groups: int = 8
    d_state: int = 128
    d_conv: int = 4
    dt_min: float = 0.0  # time_step_limit
    dt_max: float | None = None
    # attention
    attn_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    # MLP and experts
    ffn_dim: int = 0
    n_experts: int = 0
    top_k: int = 1
    expert_dim: int = 0
    shared_dim: int = 0
    n_shared: int = 1
    norm_topk: bool = True
    routed_scaling: float = 1.0
    n_group: int = 1
    norm_eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False
    tie_embeddings: bool = False

    def mixer(self) -> Mamba2Mixer:
        return Mamba2Mixer(self.ssm_heads * self.ssm_head_dim, self.ssm_heads, self.ssm_head_dim, self.n_groups,
                           self.d_state, self.d_conv, self.norm_eps, self.dt_min, self.dt_max)

    def moe(self) -> MoeFeedForward:
        return MoeFeedForward(self.d_model, self.n_experts, self.top_k, self.expert_dim, self.norm_topk,
                              self.routed_scaling, expert_bias=True, score="sigmoid", gated=False, act="relu2",
                              names=("gate_proj", "up_proj", "down_proj"), bias_name="gate.e_score_correction_bias")


def _pattern(cfg: dict, where: str) -> str:
    p = cfg.get("hybrid_override_pattern")
    key = "hybrid_override_pattern"
    if p is None:
        key = next((k for k in ("layers_block_type", "layer_types") if cfg.get(k) is not None), None)
        if key is None:
            raise EdgeseqError(f"{where}: missing key; expected one of hybrid_override_pattern, layers_block_type")
        p = cfg[key]
    if not isinstance(p, (str, list)) or not p or any(not isinstance(k, str) or k not in KINDS for k in p):
        raise UnsupportedError(f"{where}: {key} must be a non-empty string of M, *, - and E or a list of "
                               f"linear_attention, full_attention, mlp and moe; got {p!r}"[:300])
    return "".join(KINDS[k] for k in p)


def _limit(v, where: str) -> tuple[float, float | None]:
    """time_step_limit as (low, high or None): transformers writes infinity as {"__float__": "Infinity"}."""
    def num(x):
        if isinstance(x, dict) and isinstance(x.get("__float__"), str):
            x = x["__float__"]
        try:
            return float(x)
        except (TypeError, ValueError):
            raise UnsupportedError(f"{where}: time_step_limit must be two numbers; got {v!r}") from None
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise UnsupportedError(f"{where}: time_step_limit must be two numbers; got {v!r}")
    lo, hi = num(v[0]), num(v[1])
    if math.isnan(lo) or math.isnan(hi) or lo < 0 or hi <= lo:
        raise UnsupportedError(f"{where}: time_step_limit must be 0 <= low < high; got {v!r}")
    return lo, (None if math.isinf(hi) else hi)


def read_nemotron_h_config(src) -> NemotronHConfig:
    cfg, where = src.config, f"{src.path}/config.json"
    pattern = _pattern(cfg, where)
    p = next((q for q in ("backbone.", "model.") if src.has(q + "embeddings.weight")), None)
    if p is None:
        raise EdgeseqError(f"{src.path}: no embedding tensor (looked for backbone.embeddings.weight and "
                           "model.embeddings.weight); is this a NemotronH checkpoint?")
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        act = cfg.get(key, want)
        if act != want:
            raise UnsupportedError(f"{where}: {key} {act!r} is not supported (only {want})")
    if cfg.get("mlp_bias"):
        raise UnsupportedError(f"{where}: mlp_bias is not supported")
    if cfg.get("moe_latent_size") is not None and "E" in pattern:
        raise UnsupportedError(f"{where}: moe_latent_size (latent expert projections) is not supported")
    vocab, d = src.shape(p + "embeddings.weight")
    out = dict(vocab_size=int(vocab), d_model=int(d), n_layer=len(pattern), pattern=pattern,
               norm_eps=config_number(cfg.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", where, float, 0.0),
               tie_embeddings=head_is_embedding(src, p))
    for kind, first in (("M", "mixer.A_log"), ("*", "mixer.q_proj.weight"), ("-", "mixer.up_proj.weight"),
                        ("E", "mixer.gate.weight")):
        for i in (i for i, k in enumerate(pattern) if k == kind):  # the weights follow the declared pattern
            if not src.has(f"{p}layers.{i}.{first}"):
                raise EdgeseqError(f"{src.path}: config.json's pattern {pattern!r} makes layer {i} a {kind} block, "
                                   f"but the weights lack {p}layers.{i}.{first}")
    if "M" in pattern:
        m = f"{p}layers.{pattern.index('M')}.mixer."
        H = src.shape(m + "A_log")[0]
        di = src.shape(m + "norm.weight")[0]
        cd, _, k = src.shape(m + "conv1d.weight")
        G = config_key(cfg, ("n_groups", "mamba_n_groups"), where, 8)
        if di % H or di % G or H % G or (cd - di) % (2 * G):
            raise EdgeseqError(f"{src.path}: {m}A_log ({H} heads), norm.weight ({di}), conv1d.weight ({cd}) and "
                               f"config.json's n_groups {G} do not fit together")
        lo, hi = _limit(cfg.get("time_step_limit", cfg.get("mamba_dt_limit", (0.0, float("inf")))), where)
        out.update(ssm_heads=H, ssm_head_dim=di // H, n_groups=G, d_state=(cd - di) // (2 * G), d_conv=k,
                   dt_min=lo, dt_max=hi, conv_bias=src.has(m + "conv1d.bias"),
                   proj_bias=src.has(m + "in_proj.bias") or src.has(m + "out_proj.bias"))
    if "*" in pattern:
        a = f"{p}layers.{pattern.index('*')}.mixer."
        heads = config_key(cfg, ("num_attention_heads",), where)
        kv = config_key(cfg, ("num_key_value_heads",), where, heads)
        q_rows, k_rows = src.shape(a + "q_proj.weight")[0], src.shape(a + "k_proj.weight")[0]
        if q_rows % heads or heads % kv or q_rows // heads * kv != k_rows:
            raise EdgeseqError(f"{src.path}: {a}q_proj ({q_rows} rows) and k_proj ({k_rows}) do not fit "
                               f"num_attention_heads {heads} and num_key_value_heads {kv}")
        out.update(attn_heads=heads, kv_heads=kv, head_dim=q_rows // heads)
    if "-" in pattern:
        out["ffn_dim"] = int(src.shape(f"{p}layers.{pattern.index('-')}.mixer.up_proj.weight")[0])
    if "E" in pattern:
        e = f"{p}layers.{pattern.index('E')}.mixer."
        E = int(src.shape(e + "gate.weight")[0])
        k = config_key(cfg, ("num_experts_per_tok",), where)
        if k > E:
            raise UnsupportedError(f"{where}: num_experts_per_tok {k} must be 1 to n_routed_experts ({E})")
        n_group = config_key(cfg, ("n_group",), where, 1)
        topk_group = config_key(cfg, ("topk_group",), where, 1)
        if n_group > 1 and topk_group < n_group:
            raise UnsupportedError(f"{where}: group-limited routing (n_group {n_group}, topk_group {topk_group} < "
                                   "n_group) is not supported")
        up = e + "experts.0.up_proj.weight"
        fe = src.shape(up)[0] if src.has(up) else src.shape(e + "experts.up_proj")[1]
        out.update(n_experts=E, top_k=k, expert_dim=int(fe), n_group=n_group,
                   shared_dim=int(src.shape(e + "shared_experts.up_proj.weight")[0]),
                   n_shared=config_key(cfg, ("n_shared_experts",), where, 1),
                   norm_topk=bool(cfg.get("norm_topk_prob", True)),
                   routed_scaling=config_number(cfg.get("routed_scaling_factor", 1.0) or 1.0,
                                                "routed_scaling_factor", where, float, None))
    return NemotronHConfig(**out)


class NemotronHGguf(ArchMap):
    """llama.cpp's nemotron_h: the layer kinds as per-layer head_count_kv (attention) and
    feed_forward_length (MLP) arrays, both 0 for a Mamba layer; the Mamba-2 tensors as llama.cpp's mamba2."""

    arch = "nemotron_h"

    def supports(self, fam):
        c = fam.config
        if c.proj_bias:
            return "llama.cpp's nemotron_h has no Mamba in/out projection biases (use_bias)"
        if "E" in c.pattern and "-" in c.pattern:
            return "llama.cpp's nemotron_h_moe takes every feed-forward block as MoE (the pattern has both - and E)"
        return None

    def ffn_widths(self, c) -> list[int]:
        return [c.ffn_dim if k == "-" else 0 for k in c.pattern]

    def experts(self, c) -> list:
        return []

    def metadata(self, fam, shapes):
        """The converter's keys in its order: the base model's, the experts', llama's vocab_size and rope
        dimension (d / H, unused: no RoPE), the Mamba-2 keys, context_length 2^20 (no positional limit), the
        head dims."""
        c = fam.config
        head = [u32("block_count", c.n_layer), u32("context_length", 1 << 20), u32("embedding_length", c.d_model),
                ("feed_forward_length", self.ffn_widths(c), "i32s"), u32("attention.head_count", c.attn_heads),
                ("attention.head_count_kv", [c.kv_heads if k == "*" else 0 for k in c.pattern], "i32s"),
                f32("attention.layer_norm_epsilon", c.norm_eps)]
        n_ssm = c.ssm_heads * c.ssm_head_dim
        return [*head, *self.experts(c)[:4], u32("vocab_size", shapes["token_embd.weight"][0]),
                u32("rope.dimension_count", c.d_model // c.attn_heads), u32("ssm.conv_kernel", c.d_conv),
                u32("ssm.state_size", c.d_state), u32("ssm.group_count", c.n_groups), u32("ssm.inner_size", n_ssm),
                u32("ssm.time_step_rank", c.ssm_heads), ("rope.scaling.finetuned", False, "bool"),
                u32("attention.key_length", c.head_dim), u32("attention.value_length", c.head_dim),
                *self.experts(c)[4:]]

    def config(self, g):
        a = g.arch_key
        vocab, d = g.tensor("token_embd.weight").shape
        n = g.need(a("block_count"), int)

        def per_layer(key):
            v = g.need(a(key))
            v = [int(x) for x in (v if isinstance(v, (list, tuple, np.ndarray)) else [v] * n)]
            if len(v) != n:
                raise EdgeseqError(f"{g.path}: {a(key)} must give one value per layer ({n})")
            return v
        kv, ff = per_layer("attention.head_count_kv"), per_layer("feed_forward_length")
        moe = [f"blk.{i}.ffn_gate_inp.weight" in g.tensors for i in range(n)]
        pattern = "".join("*" if kv[i] else "E" if moe[i] else "-" if ff[i] else "M" for i in range(n))
        if len({x for x in kv if x}) > 1 or len({ff[i] for i in range(n) if pattern[i] == "-"}) > 1:
            raise EdgeseqError(f"{g.path}: every attention layer must have the same head_count_kv and every MLP "
                               "layer the same feed_forward_length")
        inner, heads = g.need(a("ssm.inner_size"), int), g.need(a("ssm.time_step_rank"), int)
        out = dict(vocab_size=vocab, d_model=d, n_layer=n, pattern=pattern, ssm_heads=heads,
                   ssm_head_dim=inner // heads, n_groups=g.need(a("ssm.group_count"), int),
                   d_state=g.need(a("ssm.state_size"), int), d_conv=g.need(a("ssm.conv_kernel"), int),
                   attn_heads=g.need(a("attention.head_count"), int), kv_heads=max(kv) or 1,
                   head_dim=int(g.get(a("attention.key_length"), d // g.need(a("attention.head_count"), int))),
                   ffn_dim=max([ff[i] for i in range(n) if pattern[i] == "-"], default=0),
                   norm_eps=float(g.get(a("attention.layer_norm_epsilon"), 1e-5)),
                   conv_bias=any(x.endswith("ssm_conv1d.bias") for x in g.tensors), proj_bias=False,
                   tie_embeddings="output.weight" not in g.tensors)
        if "E" in pattern:
            out.update(n_experts=g.need(a("expert_count"), int), top_k=g.need(a("expert_used_count"), int),
                       expert_dim=g.need(a("expert_feed_forward_length"), int),
                       shared_dim=g.need(a("expert_shared_feed_forward_length"), int),
                       n_shared=int(g.get(a("expert_shared_count"), 1)),
                       norm_topk=bool(g.get(a("expert_weights_norm"), True)),
                       routed_scaling=float(g.get(a("expert_weights_scale"), 1.0)),
                       n_group=int(g.get(a("expert_group_count"), 1)))
        return out


class NemotronHMoeGguf(NemotronHGguf):
    """llama.cpp's nemotron_h_moe: nemotron_h's keys, feed_forward_length the expert width on E layers,
    and the experts' (count, used, widths, shared count, weight norm and scale, groups)."""

    arch = "nemotron_h_moe"

    def ffn_widths(self, c) -> list[int]:
        return [c.expert_dim if k == "E" else 0 for k in c.pattern]

    def experts(self, c) -> list:
        return [u32("expert_count", c.n_experts), u32("expert_used_count", c.top_k),
                u32("expert_group_count", c.n_group), u32("expert_group_used_count", c.n_group),
                u32("expert_feed_forward_length", c.expert_dim), u32("expert_shared_feed_forward_length", c.shared_dim),
                u32("expert_shared_count", c.n_shared), ("expert_weights_norm", bool(c.norm_topk), "bool"),
                f32("expert_weights_scale", c.routed_scaling)]


def permute_rows(heads: int) -> Codec:
    """llama.cpp's converter writes q and k (canonical (d, heads·hd)) with each head's rows reordered from
    rotate-half pairs (j, j + hd/2) to adjacent ones (2j, 2j+1), as for llama's RoPE. Nemotron-H has no
    RoPE, and q and k move alike, so the scores are unchanged: done only to write the converter's file."""
    def enc(a):  # canonical (d, heads·hd) -> GGUF (heads·hd, d), rows permuted within each head
        w = a.T
        return np.ascontiguousarray(w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape))

    def dec(w):
        return np.ascontiguousarray(w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2)
                                    .reshape(w.shape).T)
    return Codec(enc, dec)


def _fused_up(a: np.ndarray) -> np.ndarray:
    """transformers' fused experts.up_proj (E, fe, d) -> the canonical (d, E·fe)."""
    E, f, d = a.shape
    return np.ascontiguousarray(a.transpose(2, 0, 1).reshape(d, E * f))


def _fused_down(a: np.ndarray) -> np.ndarray:
    """transformers' fused experts.down_proj (E, d, fe) -> the canonical (E·fe, d)."""
    E, d, f = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(E * f, d))


@register("NemotronHForCausalLM")
class NemotronH(Family):
    name = "nemotron_h"
    Config = NemotronHConfig
    gguf = NemotronHGguf()  # llama.cpp runs it
    prefill_chunk = 128  # attention scores grow with chunk x (ring + chunk)
    uses_position = True
    symbolic_dims = {"max_context": MAX_CONTEXT}

    def __new__(cls, config=None):
        # one HF architecture, two llama.cpp ones: a model with E blocks is a NemotronHMoe (its own name
        # in bundles, its own GGUF map); everything else is shared
        if cls is NemotronH and config is not None and "E" in config.pattern:
            cls = NemotronHMoe
        return super().__new__(cls)

    @classmethod
    def read_config(cls, src) -> NemotronHConfig:
        return read_nemotron_h_config(src)

    def state_spec(self) -> list[StateTensor]:
        c = self.config
        # M: Mamba-2 (its state), *: attention (its rings), - and E: MLP and MoE blocks (no state)
        return hybrid_state(({"M": False, "*": True}.get(k) for k in c.pattern), c.mixer,
                            lambda i: ring_state(i, c.kv_heads, c.head_dim, "attention", "no RoPE"))

    def layout(self, src):
        p = "model." if src.has("model.embeddings.weight") else "backbone."
        fused = any(k.endswith("mixer.experts.up_proj") for k in src.keys())
        return (FUSED if fused else None), p

    def moe_rows(self, m: str, o: str, g: str) -> list[Row]:
        import dataclasses

        fused = {"experts_up": ("experts.up_proj", _fused_up), "experts_down": ("experts.down_proj", _fused_down)}
        rows = []
        for r in self.config.moe().tensors(m, o, g):
            kind = r.name[len(o):]
            if kind in fused:
                name, load = fused[kind]
                r = dataclasses.replace(r, ckpt={"*": r.ckpt, FUSED: m + name}, load={"*": r.load, FUSED: load})
            rows.append(r)
        s = m + "shared_experts."
        return rows + [Row(o + "shared_up", s + "up_proj.weight", t, gguf=g + "ffn_up_shexp.weight", codec=T),
                       Row(o + "shared_down", s + "down_proj.weight", t, gguf=g + "ffn_down_shexp.weight", codec=T)]

    def tensors(self):
        c = self.config
        rows = [Row("embed", "{p}embeddings.weight", gguf="token_embd.weight")]
        for i, kind in enumerate(c.pattern):
            m, o, g = f"{{p}}layers.{i}.mixer.", f"layers.{i}.", f"blk.{i}."
            rows.append(Row(o + "norm", f"{{p}}layers.{i}.norm.weight", gguf=g + "attn_norm.weight"))
            if kind == "M":
                rows += c.mixer().tensors(m, o, g)
            elif kind == "*":
                rows += [Row(o + "q", m + "q_proj.weight", t, gguf=g + "attn_q.weight", codec=permute_rows(c.attn_heads)),
                         Row(o + "k", m + "k_proj.weight", t, gguf=g + "attn_k.weight", codec=permute_rows(c.kv_heads)),
                         Row(o + "v", m + "v_proj.weight", t, gguf=g + "attn_v.weight", codec=T)]
                rows.append(Row(o + "o", m + "o_proj.weight", t, gguf=g + "attn_output.weight", codec=T))
            elif kind == "-":
                rows += [Row(o + n, f"{m}{n}_proj.weight", t, gguf=f"{g}ffn_{n}.weight", codec=T)
                         for n in ("up", "down")]
            else:
                rows += self.moe_rows(m, o, g)
        if "M" in c.pattern:  # one per model: dt (b, t, H) @ head_expand spreads each head's step over its channels
            rows.append(Derived("head_expand", c.mixer().head_expand))
        rows.append(Row("norm_f", "{p}norm_f.weight", gguf="output_norm.weight"))
        if c.tie_embeddings:  # an lm_head.weight equal to the embedding is read as the tied head
            return rows
        return rows + [Row("lm_head", "lm_head.weight", t, gguf="output.weight", codec=T)]

    def body(self, b: GraphBuilder, ids, state, tokens, fused):
        c = self.config
        x = embed(b, ids)  # (b, t, d)
        out = {}
        for i, kind in enumerate(c.pattern):
            o, p = f"layers.{i}.", f"past_key_values.{i}."
            with b.scope(f"layers.{i}"):
                a = rms_norm(b, x, o + "norm", c.norm_eps)
                if kind == "M":
                    y, out[f"present.{i}.conv_state"], out[f"present.{i}.recurrent_state"] = c.mixer()(
                        b, a, o, state[p + "conv_state"], state[p + "recurrent_state"], tokens == 1, fused)
                elif kind == "*":
                    y, out[f"present.{i}.key"], out[f"present.{i}.value"] = gqa_attention(
                        b, a, o, state[p + "key"], state[p + "value"], state["position"], tokens, c.attn_heads,
                        c.kv_heads, c.head_dim)  # no positional encoding
                elif kind == "-":
                    u = linear(b, a, o + "up").relu()
                    y = linear(b, u * u, o + "down")
                else:
                    u = linear(b, a, o + "shared_up").relu()
                    y = c.moe()(b, a, o) + linear(b, u * u, o + "shared_down")
                x = x + y
        return x, out

    def head(self, b: GraphBuilder, hidden: str) -> str:
        return norm_and_head(b, hidden, self.config.norm_eps, self.config.vocab_size)

    def quant_policy(self, name, shape):
        """Routers stay f32 (E x d each; llama.cpp's converter keeps ffn_gate_inp f32 too); head_expand is
        an exact 0/1 expansion, not a learned matrix."""
        return "f32" if name.endswith(".router") or name == "head_expand" else None


@register()
class NemotronHMoe(NemotronH):
    """Nemotron-H with E blocks (NemotronH's constructor picks it): written as llama.cpp's nemotron_h_moe."""

    name = "nemotron_h_moe"
    gguf = NemotronHMoeGguf()
