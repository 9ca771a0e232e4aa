"""Bamba and Granite-4.0-H cases of the conformance suite: tiny random BambaForCausalLM and
GraniteMoeHybridForCausalLM models, transformers in float64 as the reference. tests/families.py registers
CASES; tests/test_granite_hybrid.py holds what is special to the family."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import BambaConfig, BambaForCausalLM, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

from conftest import SEQ_LEN, Built, random_ids
import families
from families import B, F, FamilyCase, checks, not_degenerate

M, A = "mamba", "attention"
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_n_groups=1)
BAMBA = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, attn_layer_indices=[1, 3], rms_norm_eps=1e-5, max_position_embeddings=4096,
             tie_word_embeddings=False, **MAMBA)
GRANITE = dict(vocab_size=256, hidden_size=32, intermediate_size=16, shared_intermediate_size=40, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, layer_types=[M, A, M, M], num_local_experts=0,
               num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True,
               position_embedding_type=None, **MAMBA)
CONFIGS = {
    # Bamba: Mamba-2 (2 groups) and attention (GQA 2:1, RoPE on half of each head) alternating, a dense
    # SwiGLU MLP everywhere, untied head
    "bamba": ("bamba", dict(mamba_n_groups=2, seed=1)),
    # Granite-4.0-H Micro's shape: dense shared MLP (no experts), no RoPE, every multiplier away from 1,
    # attention first and last (MQA), tied head
    "dense-multipliers-nope": ("granite", dict(layer_types=[A, M, M, A], num_key_value_heads=1,
                                               embedding_multiplier=2.5, residual_multiplier=0.6,
                                               attention_multiplier=0.2, logits_scaling=1.7, seed=2)),
    # Granite-4.0-H Tiny's shape: top-2 of 4 softmax experts beside the shared MLP, RoPE, untied head
    "moe-top2-of-4-untied": ("granite", dict(num_local_experts=4, num_experts_per_tok=2, position_embedding_type="rope",
                                             tie_word_embeddings=False, embedding_multiplier=1.5,
                                             residual_multiplier=0.8, attention_multiplier=0.3, logits_scaling=1.3,
                                             seed=3)),
}
MARGIN = 1e-4  # the least gap between the k-th and (k+1)-th softmax router scores on the test ids (float64)


def add_granite_noise(model, seed):
    """conftest's recipe (randn * 1.5 / sqrt(fan_in) on every matrix, the experts' 3-D tensors included),
    a third of it on q/k (sharp scores make float32 rounding alone move the logits by 1e-4) and a fifth
    on the conv taps (fan-in = the conv width); noise on every norm weight, D and dt_bias so no tensor
    keeps its trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("A_log"):
                continue
            if p.ndim >= 2:
                scale = 0.3 if "conv1d" in name else 0.5 if ("q_proj" in name or "k_proj" in name) else 1.5
                p.add_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def make_granite(path, kind="granite", seed=0, dtype=torch.float32, shard=None, **cfg) -> Path:
    torch.manual_seed(seed)
    if kind == "bamba":
        model = BambaForCausalLM(BambaConfig(**{**BAMBA, **cfg}))
    else:
        model = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**{**GRANITE, **cfg}))
    model = add_granite_noise(model.eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def routing_margin(hf64, ids) -> float:
    """The least gap between the k-th and (k+1)-th softmax router scores over every MoE layer and token."""
    moes = (getattr(layer, "block_sparse_moe", None) for layer in hf64.model.layers)
    return families.routing_margin(hf64, ids, [moe.router for moe in moes if moe is not None])


def build_granite(name: str, d: Path, spec: tuple | None = None) -> Built:
    kind, cfg = CONFIGS[name] if spec is None else spec
    cfg = dict(cfg)
    c = Built(make_granite(d / "hf", kind, seed=cfg.pop("seed", 3), **cfg), d,
                     random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=10))
    c.name = name
    not_degenerate(c.ref)
    assert routing_margin(c.hf64, c.ids) > MARGIN  # float32 and float64 choose the same experts
    return c


def _build(name):
    return lambda d: build_granite(name, d)


def granite_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    di = hc.mamba_expand * hc.hidden_size
    cd, hd = di + 2 * hc.mamba_n_groups * hc.mamba_d_state, hc.hidden_size // hc.num_attention_heads
    for i, kind in enumerate(hc.layers_block_type):
        if kind in ("mamba", "linear_attention"):
            out[f"past_key_values.{i}.conv_state"] = (1, cd, hc.mamba_d_conv - 1)
            out[f"past_key_values.{i}.recurrent_state"] = (1, hc.mamba_n_heads, hc.mamba_d_state, hc.mamba_d_head)
        else:
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hd)
    return out


FUSED_OPS = {"CausalConvWithState": True, "LinearAttention": True}
PORTABLE_OPS = {"CausalConvWithState": False, "LinearAttention": False}


def _case(name: str, first: bool) -> FamilyCase:
    moe = {"MoE": "moe" in name}  # the experts: ONNX Runtime's com.microsoft MoE in the fused flavour only
    return FamilyCase(
        f"granite_hybrid/{name}", "granite_hybrid", _build(name),
        checks(step=B, prefill_all=B, prefill_then_steps=first and B or F, chunked=first and B,
               plain_ort=first and B, state_spec=F, state_constant=first and F, low_memory=first and F,
               save_load_fork=first and F, flavour_ops=first or "moe" in name, gguf=True),
        state=granite_state, position=True, prefill_at=(1, 2, 40),
        fused_ops={k: {**FUSED_OPS, **moe} for k in ("step", "prefill", "prefill_all")},
        portable_ops={k: {**PORTABLE_OPS, "MoE": False} for k in ("step", "prefill")},
        load={"max_context": 128}, fork_at=30)


CASES = [_case(name, first) for first, name in zip((True, False, False), CONFIGS)]
