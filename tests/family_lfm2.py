"""LFM2 cases of the conformance suite: tiny random Lfm2ForCausalLM models, transformers in float64 as
the reference. tests/families.py registers CASES; tests/test_lfm2.py holds what is special to the family."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Lfm2Config, Lfm2ForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM

from conftest import SEQ_LEN, Built, random_ids
import families
from families import B, F, FamilyCase, checks, not_degenerate

C, A = "conv", "full_attention"
DEFAULTS = dict(vocab_size=256, hidden_size=32, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=4, layer_types=[C, C, A, C], conv_L_cache=3, block_auto_adjust_ff_dim=True,
                block_ffn_dim_multiplier=1.0, block_multiple_of=16, norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=4096,
                tie_word_embeddings=True)
CONFIGS = {
    # the released shape in small: conv layers around one attention layer, GQA 2:1, conv width 3 (the
    # released L_cache), the MLP width adjusted as released (2/3 of 96 rounded up to 16: 64), tied head
    "gqa2-tied": dict(),
    # attention first and last, MQA, conv width 4, head dim 16, the MLP width as given, untied head
    "mqa-untied-conv4": dict(layer_types=[A, C, C, A, C], num_hidden_layers=5, num_key_value_heads=1,
                             hidden_size=64, conv_L_cache=4, block_auto_adjust_ff_dim=False, intermediate_size=80,
                             tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # MHA (two heads of 24), conv biases, two attention layers in a row, bf16 weights
    "mha-bias-bf16": dict(layer_types=[C, A, A, C], hidden_size=48, num_attention_heads=2, num_key_value_heads=2,
                          conv_bias=True, intermediate_size=120, block_multiple_of=8, seed=2),
}
# LFM2-MoE: the first num_dense_layers layers dense, then sigmoid-routed experts
MOE_CONFIGS = {
    # top-2 of 4 experts, renormalised, expert bias, one dense layer
    "moe-top2-of-4": dict(layer_types=[C, A, C, C], moe=dict(num_experts=4, num_experts_per_tok=2,
                                                             moe_intermediate_size=16, num_dense_layers=1)),
    # top-3 of 6, no renormalisation, a routed scaling of 1.5, no expert bias, untied, two dense layers
    "moe-top3-of-6-untied": dict(layer_types=[A, C, C, A, C], num_hidden_layers=5, tie_word_embeddings=False,
                                 num_key_value_heads=1,
                                 moe=dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=12,
                                          num_dense_layers=2, norm_topk_prob=False, routed_scaling_factor=1.5,
                                          use_expert_bias=False)),
}
MARGIN = 1e-4  # the least gap between the k-th and (k+1)-th routing scores on the test ids (float64)
NOISE = dict(matrix=1.5, conv=0.5, vector=0.3)  # randn * scale / sqrt(fan_in); vectors randn * 0.3


def add_lfm2_noise(model, seed):
    """conftest's recipe (randn * 1.5 / sqrt(fan_in) on every matrix), a third of it on the conv taps
    (fan-in = the conv width, 3 or 4) and noise on the vectors (norm weights, biases) so no tensor keeps
    its trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                scale = NOISE["conv"] if name.endswith("conv.conv.weight") else NOISE["matrix"]
                p.add_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * NOISE["vector"])
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("expert_bias"):  # LFM2-MoE's routing bias (zeros at init)
                buf.add_(torch.randn(buf.shape, generator=g) * 0.2)
    return model


def make_lfm2(path, seed=0, dtype=torch.float32, moe=None, shard=None, **cfg) -> Path:
    torch.manual_seed(seed)
    if moe is None:
        model = Lfm2ForCausalLM(Lfm2Config(**{**DEFAULTS, **cfg}))
    else:
        cfg = {k: v for k, v in {**DEFAULTS, **cfg}.items() if not k.startswith("block_")}
        model = Lfm2MoeForCausalLM(Lfm2MoeConfig(**cfg, **moe))
    model = add_lfm2_noise(model.eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def _build(name):
    def build(d: Path) -> Built:
        cfg = dict(CONFIGS[name])
        seed = cfg.pop("seed", 3)
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        c = Built(make_lfm2(d / "hf", seed=seed, dtype=dtype, **cfg), d, random_ids(256, SEQ_LEN, seed=10))
        c.name = name
        not_degenerate(c.ref)
        return c
    return build


def routing_margin(c: Built) -> float:
    """The least gap between the k-th and (k+1)-th routing scores (sigmoid + expert_bias) over every MoE
    layer and token of the case's ids, in the float64 reference; an error without MoE layers."""

    def scores(gate, inputs, out):
        return out[0].sigmoid() + inputs[1] if gate.use_expert_bias else out[0].sigmoid()

    gates = [layer.feed_forward.gate for layer in c.hf64.model.layers if hasattr(layer.feed_forward, "gate")]
    assert gates, "no MoE layer in the reference"
    return families.routing_margin(c.hf64, c.ids, gates, scores)


def _build_moe(name):
    def build(d: Path) -> Built:
        cfg = dict(MOE_CONFIGS[name])
        c = Built(make_lfm2(d / "hf", seed=cfg.pop("seed", 3), **cfg), d, random_ids(256, SEQ_LEN, seed=10))
        c.name = name
        not_degenerate(c.ref)
        assert routing_margin(c) > MARGIN  # float32 and float64 choose the same experts
        return c
    return build


def lfm2_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    hd = hc.hidden_size // hc.num_attention_heads
    for i, kind in enumerate(hc.layer_types):
        if kind == C:
            out[f"past_key_values.{i}.conv_state"] = (1, hc.hidden_size, hc.conv_L_cache - 1)
        else:
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hd)
    return out


CONV_OP = {"CausalConvWithState": True}
CASES = [FamilyCase(
    f"lfm2/{name}", "lfm2", _build(name),
    checks(step=B, prefill_all=B, prefill_then_steps=first and B or F, chunked=first and B,
           plain_ort=first and B, state_spec=F, state_constant=first and F, low_memory=first and F,
           save_load_fork=first and F, flavour_ops=first, gguf=first),
    state=lfm2_state, position=True, prefill_at=(1, 2, 40),
    fused_ops={k: CONV_OP for k in ("step", "prefill", "prefill_all")},
    portable_ops={k: {"CausalConvWithState": False, "Conv": True} for k in ("step", "prefill")},
    load={"max_context": 128}, fork_at=30)
    for first, name in zip((True, False, False), CONFIGS)]
MOE_CASES = [FamilyCase(
    f"lfm2_moe/{name}", "lfm2_moe", _build_moe(name),
    checks(step=B, prefill_all=B, prefill_then_steps=first and B or F, plain_ort=first and B, state_spec=F,
           save_load_fork=first and F, flavour_ops=first, gguf=first),
    state=lfm2_state, position=True, prefill_at=(1, 2, 40),
    fused_ops={k: CONV_OP for k in ("step", "prefill", "prefill_all")},
    portable_ops={k: {"CausalConvWithState": False, "Conv": True} for k in ("step", "prefill")},
    load={"max_context": 128}, fork_at=30)
    for first, name in zip((True, False), MOE_CONFIGS)]
