"""Qwen3.5-MoE conformance cases: tiny random Qwen3_5MoeForCausalLM models, transformers in float64 as
the reference (its eager experts, the delta rule in float64). tests/families.py registers CASES;
tests/test_qwen35_moe.py holds what is special to the family."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers.models.qwen3_5_moe.modeling_qwen3_5_moe as modeling
import transformers.models.qwen3_next.modeling_qwen3_next as next_modeling
from transformers import (Qwen3_5MoeConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration,
                          Qwen3_5MoeTextConfig, Qwen3NextConfig, Qwen3NextForCausalLM)

from conftest import SEQ_LEN, Built, hf_logits64, random_ids
import families
from families import B, F, FamilyCase, checks, not_degenerate
from family_qwen35 import CONV_LA, DEFAULTS, add_qwen35_noise, float64_delta_rule, qwen35_state

L, A = "linear_attention", "full_attention"
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
CONFIGS = {
    # the released pattern (three Gated DeltaNet layers, then attention), top-2 of 4 experts with a
    # shared expert in every layer, two value heads per key head, tied head
    "top2-of-4-tied": dict(tie_word_embeddings=True),
}
# Qwen3-Next: fused in_proj_qkvz / in_proj_ba; decoder_sparse_step / mlp_only_layers pick the sparse layers
NEXT_CONFIGS = {
    # top-2 of 6 experts, layer 1 a dense MLP (mlp_only_layers), untied, attention second
    "top2-of-6-untied-dense1": dict(num_experts=6, mlp_only_layers=[1], layer_types=[L, A, L, L],
                                    tie_word_embeddings=False),
}
# seed 0: edgeseq's float32 logits 7e-5 from the float64 reference (transformers' own float32 forward 5e-5);
# over seeds 0-9 this tiny model's conditioning puts either 4e-5 to 4e-4 from it
MARGIN = 1e-4  # the least gap between the k-th and (k+1)-th routing scores on the test ids (float64)


def make_qwen35_moe(path, seed=0, conditional=False, dtype=torch.float32, shard=None, **cfg) -> Path:
    torch.manual_seed(seed)
    text = {k: v for k, v in {**DEFAULTS, **MOE, **cfg}.items() if k != "intermediate_size"}
    if conditional:
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                      patch_size=4, temporal_patch_size=2, num_position_embeddings=16)
        config = Qwen3_5MoeConfig(text_config=text, vision_config=vision,
                                  tie_word_embeddings=text.pop("tie_word_embeddings"))
        model = Qwen3_5MoeForConditionalGeneration(config)
    else:
        model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text))
    model = add_qwen35_noise(model.eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def make_qwen3_next(path, seed=0, dtype=torch.float32, shard=None, **cfg) -> Path:
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**{**DEFAULTS, **MOE, **cfg}))
    model = add_qwen35_noise(model.eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


class MoeBuilt(Built):
    """Built with the delta rule in float64."""

    def __init__(self, ckpt: Path, workdir: Path, ids: list[int], module=modeling):
        self.module = module
        super().__init__(ckpt, workdir, ids)

    def reference(self, ids) -> np.ndarray:
        with float64_delta_rule(self.module):
            return hf_logits64(self.hf64, ids)


def routing_margin(hf64, ids, module=modeling) -> float:
    """The least gap between the k-th and (k+1)-th routing scores (softmax) over every MoE layer and token
    of `ids`, in the float64 reference (the delta rule in float64 too)."""
    routers = [mod for mod in hf64.modules() if type(mod).__name__.endswith("TopKRouter")]
    return families.routing_margin(hf64, ids, routers, around=float64_delta_rule(module))


def build_qwen35_moe(name: str, d: Path, cfg: dict | None = None, seed: int = 0) -> MoeBuilt:
    cfg = dict(CONFIGS[name] if cfg is None else cfg)
    seed = cfg.pop("seed", seed)
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    c = MoeBuilt(make_qwen35_moe(d / "hf", seed=seed, dtype=dtype, **cfg), d, random_ids(256, SEQ_LEN, seed=10))
    c.name = name
    not_degenerate(c.ref)
    assert routing_margin(c.hf64, c.ids) > MARGIN  # float32 and float64 choose the same experts
    return c


def build_qwen3_next(name: str, d: Path, cfg: dict | None = None, seed: int = 3) -> MoeBuilt:
    cfg = dict(NEXT_CONFIGS[name] if cfg is None else cfg)
    seed = cfg.pop("seed", seed)
    c = MoeBuilt(make_qwen3_next(d / "hf", seed=seed, **cfg), d, random_ids(256, SEQ_LEN, seed=10), next_modeling)
    c.name = name
    not_degenerate(c.ref)
    assert routing_margin(c.hf64, c.ids, next_modeling) > MARGIN  # float32 and float64 choose the same experts
    return c


CASES = [FamilyCase(
    f"qwen35_moe/{name}", "qwen35_moe", (lambda n: lambda d: build_qwen35_moe(n, d))(name),
    checks(step=B, prefill_all=B, prefill_then_steps=B, plain_ort=B, state_spec=F, save_load_fork=F,
           flavour_ops=True, gguf=True),
    state=qwen35_state, position=True, prefill_at=(1, 2, 40),
    fused_ops={k: {**CONV_LA, "MoE": True} for k in ("step", "prefill", "prefill_all")},
    portable_ops={"prefill": {"Scan": True, "LinearAttention": False, "MoE": False}}, load={"max_context": 128},
    fork_at=30)
    for name in CONFIGS]
CASES += [FamilyCase(
    f"qwen3_next/{name}", "qwen3_next", (lambda n: lambda d: build_qwen3_next(n, d))(name),
    checks(step=B, prefill_all=B, prefill_then_steps=F, plain_ort=B, state_spec=F, save_load_fork=F,
           flavour_ops=True, gguf=True),
    state=qwen35_state, position=True, prefill_at=(1, 2, 40),
    fused_ops={k: {**CONV_LA, "MoE": True} for k in ("step", "prefill", "prefill_all")},
    portable_ops={"prefill": {"Scan": True, "LinearAttention": False, "MoE": False}}, load={"max_context": 128},
    fork_at=30)
    for name in NEXT_CONFIGS]
