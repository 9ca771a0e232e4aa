"""Nemotron-H cases of the conformance suite: tiny random NemotronHForCausalLM models, transformers in
float64 as the reference. tests/families.py registers CASES; tests/test_nemotron_h.py holds what is
special to the family."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from conftest import SEQ_LEN, Built, random_ids
import families
from families import B, F, FamilyCase, checks, not_degenerate

DEFAULTS = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=48, ssm_state_size=8, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
                conv_kernel=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                moe_shared_expert_intermediate_size=24, layer_norm_epsilon=1e-5, max_position_embeddings=4096)
CONFIGS = {
    # the dense release's shape in small: Mamba-2 (two groups of B/C over 8 heads) and squared-ReLU
    # MLPs around one attention layer (GQA 2:1, head dim 8 = d / H); the head stored equal to the
    # embedding (transformers 5.25 never ties it): read as tied
    "M-M*-M-tied": dict(hybrid_override_pattern="M-M*-M-", tie=True),
    # Nemotron-3-Nano's shape in small: Mamba, MoE (top 2 of 4, sigmoid, correction bias, renormalised,
    # routed scaling 1.5, a shared expert) and attention (MQA, head dim 12 != d / H), one group of
    # B/C, conv width 3, d_state 16, untied head
    "ME*EME-moe-untied": dict(hybrid_override_pattern="ME*EME", num_key_value_heads=1, head_dim=12, n_groups=1,
                             conv_kernel=3, ssm_state_size=16, routed_scaling_factor=1.5, seed=2),
}
MARGIN = 1e-4  # the least gap between the k-th and (k+1)-th routing scores (with the bias) on the test ids


def add_nemotron_h_noise(model, seed):
    """conftest's recipe (randn * 1.5 / sqrt(fan_in) on every matrix, the experts' 3-D tensors included),
    a fifth of it on the conv taps (fan-in = the conv width), a third on q/k (sharp scores: float32
    rounding alone would move the logits past 1e-4), noise on the norm weights and the routing bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("A_log", ".D", "dt_bias")):
                continue
            if p.ndim >= 2:
                scale = 0.3 if "conv1d" in name else 0.5 if ("q_proj" in name or "k_proj" in name) else 1.5
                p.add_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):  # zeros at init
                buf.add_(torch.randn(buf.shape, generator=g) * 0.2)
    return model


def make_nemotron_h(path, seed=0, dtype=torch.float32, tie=False, shard=None, **cfg) -> Path:
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**{**DEFAULTS, "tie_word_embeddings": tie, **cfg})).eval()
    model = add_nemotron_h_noise(model, seed)
    if tie:  # what a tied checkpoint holds: transformers keeps (and saves) a head of its own
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    model = model.to(dtype)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def routing_margin(hf64, ids) -> float:
    """The least gap between the k-th and (k+1)-th choice scores (sigmoid + correction bias) over every
    MoE layer and token of `ids`, in the float64 reference; inf without experts."""
    gates = [layer.mixer.gate for layer in hf64.model.layers
             if hasattr(layer.mixer, "gate") and hasattr(layer.mixer.gate, "e_score_correction_bias")]
    return families.routing_margin(hf64, ids, gates,
                                   lambda gate, inputs, out: out[0].sigmoid() + gate.e_score_correction_bias)


def build_nemotron_h(name: str, d: Path, cfg: dict | None = None, seed: int = 3) -> Built:
    cfg = dict(CONFIGS[name] if cfg is None else cfg)
    c = Built(make_nemotron_h(d / "hf", seed=cfg.pop("seed", seed), **cfg), d,
                       random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=10))
    c.name = name
    not_degenerate(c.ref)
    assert routing_margin(c.hf64, c.ids) > MARGIN  # float32 and float64 choose the same experts
    return c


def _build(name):
    return lambda d: build_nemotron_h(name, d)


def nemotron_h_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    di = hc.mamba_num_heads * hc.mamba_head_dim
    for i, kind in enumerate(hc.layers_block_type):
        if kind == "linear_attention":
            out[f"past_key_values.{i}.conv_state"] = (1, di + 2 * hc.n_groups * hc.ssm_state_size, hc.conv_kernel - 1)
            out[f"past_key_values.{i}.recurrent_state"] = (1, hc.mamba_num_heads, hc.ssm_state_size, hc.mamba_head_dim)
        elif kind == "full_attention":
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hc.head_dim)
    return out


FUSED_OPS = {"CausalConvWithState": True, "LinearAttention": True}
CASES = [FamilyCase(
    f"nemotron_h/{name}", family, _build(name),
    checks(step=B, prefill_all=B, prefill_then_steps=first and B or F, chunked=first and B,
           plain_ort=first and B, state_spec=F, state_constant=first and F, low_memory=first and F,
           save_load_fork=first and F, flavour_ops=first),
    state=nemotron_h_state, position=True, prefill_at=(1, 2, 40),
    fused_ops={"prefill": FUSED_OPS}, portable_ops={"prefill": {k: False for k in FUSED_OPS}},
    load={"max_context": 128}, fork_at=30)
    for first, (name, family) in zip((True, False), zip(CONFIGS, ("nemotron_h", "nemotron_h_moe")))]
