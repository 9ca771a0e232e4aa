"""LFM2-MoE (Liquid AI; transformers' Lfm2MoeForCausalLM): LFM2 (edgeseq.families.lfm2: short-conv and
attention layers, the same state) with a mixture-of-experts feed-forward after the first
`num_dense_layers` layers (edgeseq.mixers.moe: sigmoid router, expert_bias for the choice, top-k
renormalised, routed_scaling_factor). The dense layers' MLP is `intermediate_size` wide as given (no
block_auto_adjust_ff_dim rule here). GGUF: llama.cpp's lfm2moe where the routing is its own, the generic
edgeseq-lfm2_moe otherwise. int4/int8 bundles keep the routers f32 (quant_policy).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.lfm2 import Lfm2, Lfm2Config, Lfm2Gguf, config_key, config_number, read_lfm2_config
from edgeseq.gguf_names import u32
from edgeseq.graph import GraphBuilder, Value
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.tensor_table import Row


@dataclass
class Lfm2MoeConfig(Lfm2Config):
    n_dense: int = 2
    n_experts: int = 32
    top_k: int = 4
    expert_dim: int = 1792
    norm_topk: bool = True
    routed_scaling: float = 1.0
    expert_bias: bool = True

    def moe(self) -> MoeFeedForward:
        return MoeFeedForward(self.d_model, self.n_experts, self.top_k, self.expert_dim, self.norm_topk,
                              self.routed_scaling, self.expert_bias)


class Lfm2MoeGguf(Lfm2Gguf):
    """llama.cpp's lfm2moe: lfm2's keys and names, the experts stacked (E, out, in), the router as
    ffn_gate_inp, expert_bias as exp_probs_b; llama.cpp renormalises the top k and scales by 1."""

    arch = "lfm2moe"
    family = "lfm2_moe"

    def supports(self, fam):
        c = fam.config
        if c.conv_bias:
            return "llama.cpp's lfm2moe has no conv biases (conv_bias)"
        if not (c.norm_topk and c.routed_scaling == 1.0 and c.expert_bias):
            return "llama.cpp's lfm2moe needs norm_topk_prob, routed_scaling_factor 1 and use_expert_bias"
        return None

    def metadata(self, fam, shapes):
        c = fam.config
        base = {k: (k, v, kind) for k, v, kind in super().metadata(fam, shapes)}
        order = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                 "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon"]
        return [*(base[k] for k in order), u32("expert_count", c.n_experts), u32("expert_used_count", c.top_k),
                u32("expert_feed_forward_length", c.expert_dim), u32("leading_dense_block_count", c.n_dense),
                u32("expert_gating_func", 2), base["vocab_size"], base["shortconv.l_cache"]]  # 2: sigmoid

    def config(self, g):
        a = g.arch_key
        out = super().config(g)
        if int(g.get(a("expert_gating_func"), 2)) != 2:
            from edgeseq.errors import EdgeseqError

            raise EdgeseqError(f"{g.path}: expert_gating_func {g.get(a('expert_gating_func'))} is not sigmoid (2)")
        return dict(out, n_dense=g.need(a("leading_dense_block_count"), int), n_experts=g.need(a("expert_count"), int),
                    top_k=g.need(a("expert_used_count"), int), expert_dim=g.need(a("expert_feed_forward_length"), int),
                    expert_bias=any(n.endswith("exp_probs_b.bias") for n in g.tensors))


@register("Lfm2MoeForCausalLM")
class Lfm2Moe(Lfm2):
    name = "lfm2_moe"
    Config = Lfm2MoeConfig
    gguf = Lfm2MoeGguf()  # llama.cpp runs it

    @classmethod
    def read_config(cls, src) -> Lfm2MoeConfig:
        cfg, where = src.config, f"{src.path}/config.json"
        base = vars(read_lfm2_config(src))
        base["ffn_dim"] = config_key(cfg, ("intermediate_size",), where)
        E = config_key(cfg, ("num_experts",), where)
        k = config_key(cfg, ("num_experts_per_tok",), where)
        if not 0 < k <= E:
            raise UnsupportedError(f"{where}: num_experts_per_tok {k} must be 1 to num_experts ({E})")
        scaling = config_number(cfg.get("routed_scaling_factor") or 1.0, "routed_scaling_factor", where, float, None)
        return Lfm2MoeConfig(**base, n_dense=config_key(cfg, ("num_dense_layers",), where, 2, low=0), n_experts=E,
                             top_k=k, expert_dim=config_key(cfg, ("moe_intermediate_size",), where),
                             norm_topk=bool(cfg.get("norm_topk_prob", True)), routed_scaling=scaling,
                             expert_bias=bool(cfg.get("use_expert_bias", True)))

    def ffn_rows(self, i: int, f: str, o: str, g: str) -> list[Row]:
        return super().ffn_rows(i, f, o, g) if i < self.config.n_dense else self.config.moe().tensors(f, o, g)

    def ffn(self, b: GraphBuilder, m: Value, o: str, i: int, fused: bool = False) -> Value:
        return super().ffn(b, m, o, i) if i < self.config.n_dense else self.config.moe()(b, m, o, fused=fused)

    def quant_policy(self, name, shape):
        """The routers stay f32 under int4 and int8: E x d each, a few hundredths of a percent of the
        weights, and llama.cpp's converter keeps ffn_gate_inp f32 too. On a 16-expert test model an int4
        router alone (every other matrix f32) changed the chosen experts of 28 % of token-layer routes."""
        return "f32" if name.endswith(".router") else None
