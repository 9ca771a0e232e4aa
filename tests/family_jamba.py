"""Jamba cases of the conformance suite: tiny random JambaForCausalLM models, transformers in float64 as
the reference. tests/families.py registers CASES; tests/test_jamba.py holds what is special to the family."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import JambaConfig, JambaForCausalLM

from conftest import SEQ_LEN, Built, random_ids
import families
from families import B, F, FamilyCase, checks, not_degenerate

DEFAULTS = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                num_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                tie_word_embeddings=True, use_associative_scan=False)
CONFIGS = {
    # Mamba, attention (GQA 2:1), Mamba, attention; the experts (top 2 of 4) on the attention layers, a
    # dense MLP on the Mamba layers; tied head
    "moe-top2-of-4-tied": dict(seed=1),
    # MoE off (one expert: every layer a dense MLP; num_experts_per_tok left at transformers' 2, which
    # the GGUF must not write as is: llama.cpp aborts on 2 of 1), attention every third layer from layer 2
    # (MQA), conv width 3, d_state 16, dt rank 3, untied head (seed 5: at seed 3 transformers' own float32 forward is
    # 6.9e-5 from its float64 one, at 5 2.5e-5)
    "dense-untied-period3": dict(num_hidden_layers=5, attn_layer_period=3, attn_layer_offset=2, num_experts=1,
                                 num_key_value_heads=1, mamba_d_conv=3, mamba_d_state=16,
                                 mamba_dt_rank=3, hidden_size=48, intermediate_size=64, tie_word_embeddings=False,
                                 seed=5),
}
MARGIN = 1e-4  # the least gap between the k-th and (k+1)-th softmax router scores on the test ids (float64)


def add_jamba_noise(model, seed):
    """conftest's recipe (randn * 1.5 / sqrt(fan_in) on every matrix, experts' 3-D tensors included),
    a tenth of it on dt_proj (fan-in = the dt rank, as Mamba-1's tests: the full recipe makes the scan
    so ill-conditioned that float32 rounding alone moves the logits by 1e-4), a fifth on the conv taps
    (fan-in = the conv width), a third on q/k (sharp scores: the same), and noise on every norm weight
    (the dt/B/C norms included) so no tensor keeps its trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("A_log", ".D", "dt_proj.bias")):
                continue
            if p.ndim >= 2:
                scale = (0.15 if "dt_proj" in name else 0.3 if "conv1d" in name
                         else 0.5 if ("q_proj" in name or "k_proj" in name) else 1.5)
                p.add_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
            elif name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def make_jamba(path, seed=0, dtype=torch.float32, shard=None, **cfg) -> Path:
    torch.manual_seed(seed)
    model = add_jamba_noise(JambaForCausalLM(JambaConfig(**{**DEFAULTS, **cfg})).eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def routing_margin(hf64, ids) -> float:
    """The least gap between the k-th and (k+1)-th routing scores (softmax) over every MoE layer and token
    of `ids`, in the float64 reference; inf without experts."""
    return families.routing_margin(hf64, ids, [layer.feed_forward.router for layer in hf64.model.layers
                                               if hasattr(layer.feed_forward, "router")])


def build_jamba(name: str, d: Path, cfg: dict | None = None, seed: int = 3) -> Built:
    cfg = dict(CONFIGS[name] if cfg is None else cfg)
    c = Built(make_jamba(d / "hf", seed=cfg.pop("seed", seed), **cfg), d,
                   random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=10))
    c.name = name
    not_degenerate(c.ref)
    assert routing_margin(c.hf64, c.ids) > MARGIN  # float32 and float64 choose the same experts
    return c


def _build(name):
    return lambda d: build_jamba(name, d)


def jamba_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    di, hd = hc.mamba_expand * hc.hidden_size, hc.hidden_size // hc.num_attention_heads
    for i, kind in enumerate(hc.layers_block_type):
        if kind == "mamba":
            out[f"past_key_values.{i}.conv_state"] = (1, di, hc.mamba_d_conv - 1)
            out[f"past_key_values.{i}.recurrent_state"] = (1, hc.mamba_d_state, di)
        else:
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hd)
    return out


CONV_OP = {"CausalConvWithState": True}
CASES = [FamilyCase(
    f"jamba/{name}", "jamba", _build(name),
    checks(step=B, prefill_all=B, prefill_then_steps=first and B or F, chunked=first and B,
           plain_ort=first and B, state_spec=F, state_constant=first and F, low_memory=first and F,
           save_load_fork=first and F, flavour_ops=first, gguf=first),
    state=jamba_state, position=True, prefill_at=(1, 2, 40),
    # the fused flavour's experts: ONNX Runtime's MoE (softmax routing, not renormalised: exact)
    fused_ops={k: {**CONV_OP, "MoE": first} for k in ("step", "prefill", "prefill_all")},
    portable_ops={k: {"CausalConvWithState": False, "MoE": False} for k in ("step", "prefill")},
    load={"max_context": 128}, fork_at=30)
    for first, name in zip((True, False), CONFIGS)]
