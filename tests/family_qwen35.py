"""Qwen3.5 (dense) cases of the conformance suite: tiny random Qwen3_5ForCausalLM models (and one
Qwen3_5ForConditionalGeneration, the layout Qwen3.5 ships in), transformers in float64 as the reference.
tests/families.py registers CASES (import `families` before this module: it imports this one at its end);
tests/test_qwen35.py holds what is special to the family."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import transformers.models.qwen3_5.modeling_qwen3_5 as modeling
from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

from conftest import SEQ_LEN, Built, random_ids
from edgeseq.kernels.gdn import gdn_ref
from families import B, F, FamilyCase, checks, not_degenerate

L, A = "linear_attention", "full_attention"
DEFAULTS = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                linear_value_head_dim=6, linear_conv_kernel_dim=4, num_hidden_layers=4, layer_types=[L, L, L, A],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                max_position_embeddings=4096, tie_word_embeddings=False)
CONFIGS = {
    # the released pattern (three Gated DeltaNet layers, then full attention), two value heads per key
    # head, GQA 2:1 in attention, RoPE on half the head, untied head
    "3to1-gva2-untied": dict(),
    # attention first, Hv = Hk (no repeat), MQA, head dim 16 with a quarter rotated (the released
    # factor), conv width 3, tied head, two full-attention layers
    "mqa-tied-conv3": dict(layer_types=[A, L, A, L, L], num_hidden_layers=5, num_key_value_heads=1, head_dim=16,
                           linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=4,
                           linear_value_head_dim=8, linear_conv_kernel_dim=3, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}),
    # the released layout: Qwen3_5ForConditionalGeneration (text_config nested, language model under
    # model.language_model., a vision tower left out), four value heads per key head, bf16 weights
    "conditional-gva4-bf16": dict(conditional=True, linear_num_key_heads=1, linear_num_value_heads=4,
                                  layer_types=[L, A, L, L], seed=1),
}


NOISE = dict(matrix=1.5, qk=0.5, conv=0.3, vector=0.3)  # randn * scale / sqrt(fan_in); vectors randn * 0.3


def add_qwen35_noise(model, seed):
    """conftest's recipe (randn * 1.5 / sqrt(fan_in) on every matrix) and noise on the vectors (the
    zero-centred (1 + w) norms, the gated norm, A_log, dt_bias) so no tensor keeps its trivial init; a
    third of it on the attention's q/k projections and a fifth on the conv taps (fan-in = the conv width,
    4): with the full recipe there, transformers' own float32 forward is 5.9e-4 from its float64 one and
    edgeseq's 1.6e-4 from the float64 reference (3to1-gva2-untied); with these, 6e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "visual" in name:
                continue
            if p.ndim >= 2:
                kind = ("qk" if "self_attn.q_proj" in name or "self_attn.k_proj" in name
                        else "conv" if "conv1d" in name else "matrix")
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * NOISE[kind] / p.shape[-1] ** 0.5)
            else:
                p.add_((torch.randn(p.shape, generator=g) * NOISE["vector"]).to(p.dtype))
    return model


@contextlib.contextmanager
def float64_delta_rule(module=modeling):
    """transformers runs the gated delta rule in float32 whatever the model's dtype (its torch functions
    cast their inputs); for the float64 reference, its chunked function is swapped for the same rule in
    float64: kernels/gdn.gdn_ref fed transformers' normalisation, scaling and head repeat, which
    tests/test_gdn_kernel.py checks against transformers' own recurrent function."""
    def rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, **_):
        q, k, v, g, beta = (x.double().numpy() for x in (query, key, value, g, beta))
        if use_qk_l2norm_in_kernel:
            q, k = (x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6) for x in (q, k))
        r = v.shape[2] // q.shape[2]
        q, k = np.repeat(q, r, 2) * q.shape[-1] ** -0.5, np.repeat(k, r, 2)
        S0 = (np.zeros((q.shape[0], v.shape[2], q.shape[3], v.shape[3])) if initial_state is None
              else initial_state.double().numpy())
        y, S = gdn_ref(S0, q, k, v, g, beta)
        return torch.tensor(y, dtype=value.dtype), (torch.tensor(S) if output_final_state else None)

    saved = module.torch_chunk_gated_delta_rule  # `module`: the modeling module to patch (qwen3_5's by default)
    module.torch_chunk_gated_delta_rule = rule
    try:
        yield
    finally:
        module.torch_chunk_gated_delta_rule = saved


def make_qwen35(path, seed=0, conditional=False, dtype=torch.float32, **cfg) -> Path:
    torch.manual_seed(seed)
    text = {**DEFAULTS, **cfg}
    if conditional:
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                      patch_size=4, temporal_patch_size=2, num_position_embeddings=16)
        config = Qwen3_5Config(text_config=text, vision_config=vision,
                               tie_word_embeddings=text.pop("tie_word_embeddings"))
        model = Qwen3_5ForConditionalGeneration(config)
    else:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
    model = add_qwen35_noise(model.eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    return path


def _build(name):
    def build(d: Path) -> Built:
        cfg = dict(CONFIGS[name])
        # noise seeds: this family's tiny models vary in conditioning; transformers' own float32 forward is
        # 3e-4 to 6e-4 from its float64 one on conditional-gva4-bf16 whatever the seed, and edgeseq's
        # float32 logits 3.4e-5 (seed 1) to 4.5e-4 (seed 9) from the float64 reference
        seed = cfg.pop("seed", 9)
        dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
        with float64_delta_rule():
            c = Built(make_qwen35(d / "hf", seed=seed, dtype=dtype, **cfg), d, random_ids(256, SEQ_LEN, seed=10))
        c.name = name
        not_degenerate(c.ref)
        return c
    return build


def qwen35_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    hc = getattr(hc, "text_config", hc)
    conv = 2 * hc.linear_num_key_heads * hc.linear_key_head_dim + hc.linear_num_value_heads * hc.linear_value_head_dim
    for i, kind in enumerate(hc.layer_types):
        if kind == L:
            out[f"past_key_values.{i}.conv_state"] = (1, conv, hc.linear_conv_kernel_dim - 1)
            out[f"past_key_values.{i}.recurrent_state"] = (1, hc.linear_num_value_heads, hc.linear_key_head_dim,
                                                           hc.linear_value_head_dim)
        else:
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hc.head_dim)
    return out


CONV_LA = {"CausalConvWithState": True, "LinearAttention": True}
CASES = [FamilyCase(
    f"qwen35/{name}", "qwen35", _build(name),
    checks(step=B, prefill_all=B, prefill_then_steps=first and B or F, chunked=first and B,
           plain_ort=first and B, state_spec=F, state_constant=first and F, low_memory=first and F,
           save_load_fork=first and F, flavour_ops=first, gguf=first),
    state=qwen35_state, position=True, prefill_at=(1, 2, 40),
    fused_ops={k: CONV_LA for k in ("step", "prefill", "prefill_all")},
    portable_ops={"prefill": {"Scan": True, "LinearAttention": False}}, load={"max_context": 128}, fork_at=30)
    for first, name in zip((True, False, False), CONFIGS)]
