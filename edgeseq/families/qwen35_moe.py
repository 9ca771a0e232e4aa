"""Qwen3.5-MoE (transformers' Qwen3_5MoeForCausalLM, and the language model of
Qwen3_5MoeForConditionalGeneration): Qwen3.5's layers (edgeseq.families.qwen35: Gated DeltaNet and gated
full attention, the same state) with a sparse mixture-of-experts feed-forward in every layer.

Symbols: d model width · E experts · k experts per token · f expert width · fs shared expert width.

    m = rms_norm(x) · (1 + w)
    y = moe(m)                                       edgeseq.mixers.moe: softmax router, top k renormalised
    y = y + sigmoid(m · w_sg) · (silu(m Wg) · m Wu) Wd    the shared expert (fs wide) and its gate (d -> 1)
    x = x + y

Checkpoints: transformers' save_pretrained writes the experts per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`); fused 3-D experts (`mlp.experts.gate_up_proj` (E, 2f, d),
`mlp.experts.down_proj` (E, d, f): transformers' in-memory layout, which llama.cpp's converter also
accepts) are read too. Left out of Qwen3_5MoeForConditionalGeneration as for Qwen3.5: the vision tower and the MTP head.
The fused flavour runs the experts on ONNX Runtime's com.microsoft MoE (QMoE under int8/int4 where
mixers.moe can), the portable one in standard ops. GGUF: llama.cpp's qwen35moe (the converter run with --no-mtp). int4/int8 bundles keep the routers and
the shared-expert gates f32 (quant_policy).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeseq.errors import UnsupportedError
from edgeseq.families import register
from edgeseq.families.base import cfg_get
from edgeseq.families.qwen35 import Qwen35, Qwen35Config, Qwen35Gguf, read_qwen35_config
from edgeseq.gguf_names import u32
from edgeseq.graph import GraphBuilder, Value
from edgeseq.kernels.ops import linear
from edgeseq.mixers.moe import MoeFeedForward
from edgeseq.tensor_table import T, Row, t

FUSED = "fused-experts"  # the checkpoint layout with 3-D expert tensors


@dataclass
class Qwen35MoeConfig(Qwen35Config):
    n_experts: int = 256
    top_k: int = 8
    expert_dim: int = 512
    shared_dim: int = 512

    def moe(self) -> MoeFeedForward:
        return MoeFeedForward(self.d_model, self.n_experts, self.top_k, self.expert_dim, norm_topk=True,
                              expert_bias=False, score="softmax", names=("gate_proj", "up_proj", "down_proj"))


def moe_config_keys(cfg: dict, where: str) -> dict:
    """The experts' config keys (Qwen3.5-MoE's and Qwen3-Next's) as Qwen35MoeConfig fields."""
    E = int(cfg_get(cfg, ("num_experts",), where=where))
    k = int(cfg_get(cfg, ("num_experts_per_tok",), where=where))
    if not 0 < k <= E:
        raise UnsupportedError(f"{where}: num_experts_per_tok {k} must be 1 to num_experts ({E})")
    if cfg.get("norm_topk_prob", True) is not True:
        raise UnsupportedError(f"{where}: norm_topk_prob false is not supported (the top k are renormalised)")
    return dict(n_experts=E, top_k=k, expert_dim=int(cfg_get(cfg, ("moe_intermediate_size",), where=where)),
                shared_dim=int(cfg_get(cfg, ("shared_expert_intermediate_size",), where=where)))


def fused_in(part: int, f: int):
    """transformers' fused gate_up_proj (E, 2f, d) -> the gate (part 0) or up (part 1) half as the
    canonical (d, E·f) (expert e's columns e·f..(e+1)·f, as moe.cat_in lays them)."""
    def load(a: np.ndarray) -> np.ndarray:
        E, _, d = a.shape
        return np.ascontiguousarray(a[:, part * f:(part + 1) * f, :].transpose(2, 0, 1).reshape(d, E * f))
    return load


def fused_out(a: np.ndarray) -> np.ndarray:
    """transformers' fused down_proj (E, d, f) -> the canonical (E·f, d)."""
    E, d, f = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(E * f, d))


def moe_rows(c, f: str, o: str, g: str) -> list[Row]:
    """The routed experts (mixers.moe, both checkpoint layouts), the shared expert and its gate."""
    fused = {"experts_gate": (f + "experts.gate_up_proj", fused_in(0, c.expert_dim)),
             "experts_up": (f + "experts.gate_up_proj", fused_in(1, c.expert_dim)),
             "experts_down": (f + "experts.down_proj", fused_out)}
    rows = []
    for r in c.moe().tensors(f, o, g):
        kind = r.name[len(o):]
        if kind in fused:
            name, load = fused[kind]
            r = dataclasses.replace(r, ckpt={"*": r.ckpt, FUSED: name}, load={"*": r.load, FUSED: load})
        rows.append(r)
    s = f + "shared_expert."
    rows += [Row(f"{o}shexp_{n}", f"{s}{n}_proj.weight", t, gguf=f"{g}ffn_{n}_shexp.weight", codec=T)
             for n in ("gate", "up", "down")]
    rows.append(Row(o + "shexp_router", f + "shared_expert_gate.weight", t, gguf=g + "ffn_gate_inp_shexp.weight",
                    codec=T))  # canonical (d, 1)
    return rows


def moe_ffn(c, b: GraphBuilder, m: Value, o: str, fused: bool = False) -> Value:
    """The routed experts plus the gated shared expert on the normed input m (b, t, d); the fused flavour
    runs the experts on ONNX Runtime's com.microsoft MoE / QMoE (mixers.moe: exact for softmax routing)."""
    shared = linear(b, linear(b, m, o + "shexp_gate").silu() * linear(b, m, o + "shexp_up"), o + "shexp_down")
    return c.moe()(b, m, o, fused) + linear(b, m, o + "shexp_router").sigmoid() * shared


def moe_metadata(c) -> list:
    return [u32("expert_count", c.n_experts), u32("expert_used_count", c.top_k),
            u32("expert_feed_forward_length", c.expert_dim), u32("expert_shared_feed_forward_length", c.shared_dim)]


def moe_gguf_config(g) -> dict:
    a = g.arch_key
    return dict(n_experts=g.need(a("expert_count"), int), top_k=g.need(a("expert_used_count"), int),
                expert_dim=g.need(a("expert_feed_forward_length"), int),
                shared_dim=g.need(a("expert_shared_feed_forward_length"), int))


class Qwen35MoeGguf(Qwen35Gguf):
    """llama.cpp's `qwen35moe`: qwen35's keys and names, the experts stacked (E, out, in), the router
    ffn_gate_inp, the shared expert *_shexp and its gate ffn_gate_inp_shexp."""

    arch = "qwen35moe"
    family = "qwen35_moe"

    def metadata(self, fam, shapes):
        c = fam.config
        base = [m for m in super().metadata(fam, shapes) if m[0] != "feed_forward_length" or c.ffn_dim]
        return base + moe_metadata(c)

    def config(self, g):
        return dict(super().config(g), **moe_gguf_config(g))


@register("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
class Qwen35Moe(Qwen35):
    name = "qwen35_moe"
    Config = Qwen35MoeConfig
    gguf = Qwen35MoeGguf()  # llama.cpp runs it

    @classmethod
    def read_config(cls, src) -> Qwen35MoeConfig:
        top = src.config
        cfg, where = top.get("text_config") or top, f"{src.path}/config.json" + (" text_config" if "text_config"
                                                                                     in top else "")
        return Qwen35MoeConfig(**vars(read_qwen35_config(src, dense=False)), **moe_config_keys(cfg, where))

    def layout(self, src):
        _, prefix = super().layout(src)
        fused = any(k.endswith("mlp.experts.gate_up_proj") for k in src.keys())
        return (FUSED if fused else None), prefix

    def ffn_rows(self, i: int, f: str, o: str, g: str) -> list[Row]:
        return moe_rows(self.config, f, o, g)

    def ffn(self, b: GraphBuilder, m: Value, o: str, i: int, fused: bool = False) -> Value:
        return moe_ffn(self.config, b, m, o, fused)

    def quant_policy(self, name, shape):
        """The routers and the shared-expert gates stay f32 under int4 and int8 (E x d and 1 x d: a few
        hundredths of a percent of the weights; llama.cpp's converter keeps ffn_gate_inp f32 too): a
        quantized router changes which experts run."""
        return "f32" if name.endswith((".router", ".shexp_router")) else None
