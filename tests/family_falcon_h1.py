"""Falcon-H1 cases of the conformance suite: tiny random FalconH1ForCausalLM models with every μP
multiplier different from 1, transformers in float64 as the reference. tests/families.py registers CASES;
tests/test_falcon_h1.py holds what is special to the family."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import FalconH1Config, FalconH1ForCausalLM

from conftest import SEQ_LEN, Built, random_ids
from families import B, F, FamilyCase, checks, not_degenerate

# every multiplier != 1, and none equal to another, so a multiplier applied in the wrong place shows
MULTIPLIERS = dict(embedding_multiplier=1.3, lm_head_multiplier=0.7, mlp_multipliers=[1.2, 0.8], key_multiplier=0.9,
                   attention_in_multiplier=1.1, attention_out_multiplier=0.85,
                   ssm_multipliers=[1.1, 0.9, 1.25, 0.75, 1.05], ssm_in_multiplier=1.15, ssm_out_multiplier=0.95)
DEFAULTS = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, mamba_d_ssm=48, mamba_n_heads=6, mamba_d_head=8, mamba_n_groups=2,
                mamba_d_state=8, mamba_d_conv=4, mamba_rms_norm=True, mamba_norm_before_gate=False,
                tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                max_position_embeddings=4096, **MULTIPLIERS)
CONFIGS = {
    # what llama.cpp's falcon-h1 runs: GQA 2:1, 2 groups, the gated norm after the gate, conv bias, untied
    "mup-gqa-groups2": dict(seed=1),
    # the rest: the norm before the gate (transformers' default), MQA, head_dim 12 (not d / H), mamba_d_ssm
    # 64 (not mamba_expand · d), one group, conv width 3, every bias (mamba_proj_bias, projectors_bias,
    # attention_bias, mlp_bias), a dt clip (time_step_limit), a tied head whose multiplier differs from
    # the embedding's (so the head is its own tensor)
    "norm-before-gate-mqa-biases-tied": dict(
        mamba_norm_before_gate=True, num_key_value_heads=1, head_dim=12, mamba_d_ssm=64, mamba_n_heads=8,
        mamba_d_head=8, mamba_n_groups=1, mamba_d_conv=3, mamba_proj_bias=True, projectors_bias=True,
        attention_bias=True, mlp_bias=True, time_step_limit=(0.05, 2.0), tie_word_embeddings=True, seed=2),
}


def add_falcon_h1_noise(model, seed):
    """randn · 1.5 / sqrt(fan_in) on every matrix (conftest's recipe), a fifth of it on the conv taps
    (fan-in = the conv width), a third on q/k (sharp scores), and noise on every norm weight, bias, D and
    dt_bias, so no tensor keeps its trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("A_log"):
                continue
            if p.ndim >= 2:
                scale = 0.3 if "conv1d" in name else 0.5 if ("q_proj" in name or "k_proj" in name) else 1.5
                p.add_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if name.endswith(("weight", ".D")) else 0.1))
    return model


def make_falcon_h1(path, seed=0, dtype=torch.float32, shard=None, **cfg) -> Path:
    torch.manual_seed(seed)
    model = add_falcon_h1_noise(FalconH1ForCausalLM(FalconH1Config(**{**DEFAULTS, **cfg})).eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def build_falcon_h1(name: str, d: Path, cfg: dict | None = None, seed: int = 3) -> Built:
    cfg = dict(CONFIGS[name] if cfg is None else cfg)
    c = Built(make_falcon_h1(d / "hf", seed=cfg.pop("seed", seed), **cfg), d,
              random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=10))
    c.name = name
    not_degenerate(c.ref)
    return c


def _build(name):
    return lambda d: build_falcon_h1(name, d)


def falcon_h1_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    di, g, n = hc.mamba_d_ssm, hc.mamba_n_groups, hc.mamba_d_state
    for i in range(hc.num_hidden_layers):
        out[f"past_key_values.{i}.conv_state"] = (1, di + 2 * g * n, hc.mamba_d_conv - 1)
        out[f"past_key_values.{i}.recurrent_state"] = (1, hc.mamba_n_heads, n, di // hc.mamba_n_heads)
        for k in ("key", "value"):
            out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hc.head_dim)
    return out


CONV_OP = {"CausalConvWithState": True}
CASES = [FamilyCase(
    f"falcon_h1/{name}", "falcon_h1", _build(name),
    checks(step=B, prefill_all=B, prefill_then_steps=first and B or F, chunked=first and B,
           plain_ort=first and B, state_spec=F, state_constant=first and F, low_memory=first and F,
           save_load_fork=first and F, flavour_ops=first, gguf=first),
    state=falcon_h1_state, position=True, prefill_at=(1, 2, 40),
    fused_ops={"step": CONV_OP, "prefill": {**CONV_OP, "LinearAttention": True}, "prefill_all": CONV_OP},
    portable_ops={k: {"CausalConvWithState": False, "LinearAttention": False} for k in ("step", "prefill")},
    load={"max_context": 128}, fork_at=30)
    for first, name in zip((True, False), CONFIGS)]
