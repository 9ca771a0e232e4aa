"""LFM3 cases of the conformance suite: tiny random Lfm3ForCausalLM models, transformers in float64 as
the reference. tests/families.py registers CASES; tests/test_lfm3.py holds what is special to the family.
Every window is shorter than the suite's 64 ids and than its 40-token prefill, so the sliding rings wrap
(several times) in every check."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Lfm3Config, Lfm3ForCausalLM

from conftest import SEQ_LEN, Built, random_ids
from families import B, F, FamilyCase, checks, not_degenerate
from family_lfm2 import add_lfm2_noise

C, S, A = "conv", "sliding_attention", "full_attention"
DEFAULTS = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                head_dim=12, num_hidden_layers=5, layer_types=[C, S, A, C, S], conv_L_cache=3, sliding_window=7,
                norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # the released pattern in small: conv, sliding and full layers; head dim 12 (not d / H), GQA 2:1, window 7,
    # transformers' default RoPE per type (sliding: every pair at 1e4; full: proportional, half the pairs at
    # 1e6), sandwich norms and the attention gate (the defaults), tied head
    "swa7-gqa2-tied": dict(),
    # MQA, sliding window 16 with proportional RoPE (a quarter of the pairs, factor 2), full attention with
    # default RoPE, no gate, no sandwich norms, q/k/v/o and conv biases, untied head, two sliding layers in a
    # row, bf16 weights
    "swa16-mqa-bias-bf16": dict(layer_types=[S, C, S, S, A, C], num_hidden_layers=6, num_key_value_heads=1,
                                hidden_size=48, head_dim=8, sliding_window=16, use_attention_gate=False,
                                use_sandwich_norm=False, attention_bias=True, conv_bias=True, conv_L_cache=4,
                                tie_word_embeddings=False, intermediate_size=40,
                                rope_parameters={S: {"rope_type": "proportional", "rope_theta": 5e3,
                                                     "partial_rotary_factor": 0.5, "factor": 2.0},
                                                 A: {"rope_type": "default", "rope_theta": 1e6}}),
}


def make_lfm3(path, seed=0, dtype=torch.float32, **cfg) -> Path:
    torch.manual_seed(seed)
    model = add_lfm2_noise(Lfm3ForCausalLM(Lfm3Config(**{**DEFAULTS, **cfg})).eval(), seed).to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    return path


def built_lfm3(d: Path, name: str = "", seed: int = 3, **cfg) -> Built:
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    c = Built(make_lfm3(d / "hf", seed=seed, dtype=dtype, **cfg), d, random_ids(256, SEQ_LEN, seed=10))
    c.name = name
    not_degenerate(c.ref)
    return c


def _build(name):
    return lambda d: built_lfm3(d, name, **CONFIGS[name])


def lfm3_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    for i, kind in enumerate(hc.layer_types):
        if kind == C:
            out[f"past_key_values.{i}.conv_state"] = (1, hc.hidden_size, hc.conv_L_cache - 1)
        else:
            ring = hc.sliding_window if kind == S else "max_context"
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, ring, hc.head_dim)
    return out


CONV_OP = {"CausalConvWithState": True}
CASES = [FamilyCase(
    f"lfm3/{name}", "lfm3", _build(name),
    checks(step=B, prefill_all=B, prefill_then_steps=B, chunked=first and B, plain_ort=first and B, state_spec=F,
           state_constant=first and F, low_memory=first and F, save_load_fork=first and F, flavour_ops=first,
           gguf=first),
    state=lfm3_state, position=True, prefill_at=(1, 2, 9, 40),
    fused_ops={k: CONV_OP for k in ("step", "prefill", "prefill_all")},
    portable_ops={k: {"CausalConvWithState": False, "Conv": True} for k in ("step", "prefill")},
    load={"max_context": 128}, fork_at=30)
    for first, name in zip((True, False), CONFIGS)]
