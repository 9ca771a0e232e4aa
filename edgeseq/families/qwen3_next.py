"""Qwen3-Next (transformers' Qwen3NextForCausalLM): Qwen3.5's layers (edgeseq.families.qwen35: Gated
DeltaNet and gated full attention, the (1 + w) norms, the same state) with Qwen3-Next's fused Gated
DeltaNet projections and Qwen3.5-MoE's feed-forward (edgeseq.families.qwen35_moe: softmax top-k experts
and the sigmoid-gated shared expert) in the sparse layers, a dense MLP (intermediate_size) elsewhere.

    sparse layer i:  i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0

The Gated DeltaNet's in_proj_qkvz and in_proj_ba hold q, k, v, z and b, a interleaved per key head
(transformers' fix_query_key_value_ordering): they are split on loading into the mixer's in_qkv, in_z,
in_b, in_a (edgeseq.mixers.gated_deltanet, `qkvz`), so the graphs are Qwen3.5's. RoPE is plain (no
multimodal sections) on partial_rotary_factor of each head. norm_topk_prob false is supported (the top k
weighed by their softmax scores as they are).

Checkpoints: per-expert (transformers' save_pretrained, the hub's releases) and fused 3-D experts.
Left out: the multi-token-prediction head (`mtp.*`). GGUF: llama.cpp's qwen3next (the converter run with
--no-mtp) where llama.cpp's routing is the model's (norm_topk_prob), the generic edgeseq-qwen3_next
otherwise. int4/int8 bundles keep the routers and shared-expert gates f32.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import cfg_get
from edgeseq.families.qwen35 import Qwen35, Qwen35Gguf, read_qwen35_config
from edgeseq.families.qwen35_moe import (Qwen35Moe, Qwen35MoeConfig, moe_config_keys, moe_ffn, moe_gguf_config,
                                         moe_metadata, moe_rows)
from edgeseq.graph import GraphBuilder, Value
from edgeseq.mixers.gated_deltanet import GatedDeltaNetMixer
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.tensor_table import Row


@dataclass
class Qwen3NextConfig(Qwen35MoeConfig):
    moe_layers: list[int] = field(default_factory=list)  # the sparse layers; the others are dense MLPs
    norm_topk: bool = True

    def mixer(self) -> GatedDeltaNetMixer:
        return GatedDeltaNetMixer(self.lin_k_heads, self.lin_v_heads, self.lin_k_dim, self.lin_v_dim, self.d_conv,
                                  self.norm_eps, qkvz=True)

    def moe(self) -> MoeFeedForward:
        return MoeFeedForward(self.d_model, self.n_experts, self.top_k, self.expert_dim, norm_topk=self.norm_topk,
                              expert_bias=False, score="softmax", names=("gate_proj", "up_proj", "down_proj"))


def read_qwen3_next_config(src) -> Qwen3NextConfig:
    cfg, where = src.config, f"{src.path}/config.json"
    base = vars(read_qwen35_config(src))
    E = int(cfg_get(cfg, ("num_experts",), 0, where))
    step = int(cfg_get(cfg, ("decoder_sparse_step",), 1, where))
    only = cfg.get("mlp_only_layers") or []
    if step < 1:
        raise UnsupportedError(f"{where}: decoder_sparse_step {step} must be at least 1")
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise UnsupportedError(f"{where}: mlp_only_layers must be a list of layer indices; got {only!r}")
    sparse = [i for i in range(base["n_layer"]) if i not in only and E > 0 and (i + 1) % step == 0]
    moe = moe_config_keys(dict(cfg, norm_topk_prob=True), where) if sparse else dict(n_experts=0, top_k=0,
                                                                                      expert_dim=0, shared_dim=0)
    return Qwen3NextConfig(**base, **moe, moe_layers=sparse, norm_topk=bool(cfg.get("norm_topk_prob", True)))


class Qwen3NextGguf(Qwen35Gguf):
    """llama.cpp's `qwen3next`, metadata as its converter writes it (run with --no-mtp). Tensors: the
    table's gguf column (value heads grouped, b and a fused as ssm_ba)."""

    arch = "qwen3next"

    def supports(self, fam):
        c = fam.config
        if c.moe_layers != list(range(c.n_layer)):
            return "llama.cpp's qwen3next needs experts in every layer (no mlp_only_layers, decoder_sparse_step 1)"
        if c.lin_k_dim != c.lin_v_dim:
            return "llama.cpp's qwen3next needs linear_key_head_dim = linear_value_head_dim"
        if not c.norm_topk:
            return "llama.cpp's qwen3next renormalises the top k (norm_topk_prob)"
        return None

    def metadata(self, fam, shapes):
        """qwen35's keys, the experts' after attention.value_length (the converter's order), no rope sections."""
        keys = [m for m in super().metadata(fam, shapes) if m[0] != "rope.dimension_sections"]
        at = next(i for i, m in enumerate(keys) if m[0] == "attention.value_length") + 1
        return keys[:at] + moe_metadata(fam.config) + keys[at:]

    def config(self, g):
        n = g.need(g.arch_key("block_count"), int)
        return dict(super().config(g), moe_layers=list(range(n)), **moe_gguf_config(g))


@register("Qwen3NextForCausalLM")
class Qwen3Next(Qwen35Moe):
    name = "qwen3_next"
    Config = Qwen3NextConfig
    gguf = Qwen3NextGguf()  # llama.cpp runs it

    @classmethod
    def read_config(cls, src) -> Qwen3NextConfig:
        return read_qwen3_next_config(src)

    def ffn_rows(self, i: int, f: str, o: str, g: str) -> list[Row]:
        if i in self.config.moe_layers:
            return moe_rows(self.config, f, o, g)
        return Qwen35.ffn_rows(self, i, f, o, g)  # the dense MLP

    def ffn(self, b: GraphBuilder, m: Value, o: str, i: int, fused: bool = False) -> Value:
        if i in self.config.moe_layers:
            return moe_ffn(self.config, b, m, o, fused)
        return Qwen35.ffn(self, b, m, o, i, fused)
