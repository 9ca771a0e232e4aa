"""The registry of family cases: one `FamilyCase` per family variant, which tests/test_conformance.py runs
every common check over (reference agreement, prefill = steps, chunked prefill, the state contract, the
flavours' ops, the plain-onnxruntime driver, save/load/fork, the GGUF round trip). A family's own test
file keeps only what is special to it, and gets its built cases from the `family_case` fixture, so each
reference model is built once per session whichever file asks first.

Adding a family: its builder and reference below, one `FamilyCase` per variant in CASES, and its file of
special tests. Every reference is one edgeseq did not write: transformers in float64, the `rwkv` package
(in a subprocess, see rwkv_builders.py), rwkv.cpp's expected logits, or a float64 numpy model checked
against those.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from transformers import (RecurrentGemmaConfig, RecurrentGemmaForCausalLM, ZambaConfig, ZambaForCausalLM,
                          Zamba2Config, Zamba2ForCausalLM)

from conftest import SEQ_LEN, Built, make_falcon_mamba, make_mamba, make_mamba2, random_ids, write_state_spaces

B, F = (False, True), (False,)  # both flavours; the fused flavour only
CHECKS = ("step", "prefill_all", "prefill_then_steps", "chunked", "plain_ort", "low_memory", "state_spec",
          "state_constant", "save_load_fork", "flavour_ops", "gguf", "expected")
ONCE = ("flavour_ops", "gguf")  # checks that look at both flavours (or none) in one test


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    id: str  # "<family>/<variant>"
    family: str  # the manifest's "family"
    build: Callable  # workdir -> an Exported (checkpoint, ids, reference logits `ref`, `tol`, bundles)
    checks: dict  # check name -> the flavours it runs in (False fused, True portable); ONCE checks: (None,)
    state: Callable | None = None  # built -> {state name: shape, batch 1, "max_context" for a KV ring}
    init: dict = dataclasses.field(default_factory=dict)  # state kind -> initial value, when not 0
    tokenizer: str = "bytes"  # the manifest's tokenizer kind
    prefill_at: tuple = (1, 2, 40)  # prefill lengths then steps
    prefill_all_tol: float | None = None  # logits_all's tolerance when not the case's `tol` (see the case)
    fused_ops: dict = dataclasses.field(default_factory=dict)  # graph kind -> {op_type: present?}; None: standard ops
    portable_ops: dict = dataclasses.field(default_factory=dict)
    load: dict = dataclasses.field(default_factory=dict)  # edgeseq.load options of save/load/fork
    fork_at: int = 25
    position: bool = False  # the graphs take the position (families with attention)
    prefill_chunk: int | None = None  # the session option of the prefill-then-steps sessions
    expected: tuple | None = None  # rwkv.cpp's (prompt, expected logits file) for the fixture models
    group: Callable | None = None  # workdir -> {case id: built}: cases whose references are built together

    def flavours(self, check: str) -> tuple:
        return self.checks.get(check, ())


def checks(*parts: dict, **kw) -> dict:
    """{check: flavours} from dicts and keywords (name=B, F, or True for a check run once), () to leave
    one out."""
    out = {}
    for part in (*parts, kw):
        out.update(part)
    return {k: ((None,) if k in ONCE else v) for k, v in out.items() if v}


# ---------------------------------------------------------------------------------------------
# Mamba-1 and FalconMamba, Mamba-2 (transformers)
# ---------------------------------------------------------------------------------------------

MAMBA_CONFIGS = {  # name: (builder, config). Each varies what the others keep fixed.
    # expand 3, tied head, byte vocabulary, dt rank 5, conv width 4
    "expand3-tied": ("mamba", dict(hidden_size=32, expand=3, state_size=8, conv_kernel=4, time_step_rank=5)),
    # odd vocabulary with a tokenizer, untied head, biases on in/out proj, no conv bias, conv width 3
    "v301-untied-bias": ("mamba", dict(vocab_size=301, tokenizer_vocab=301, hidden_size=48, state_size=16,
                                       conv_kernel=3, time_step_rank=4, tie_word_embeddings=False,
                                       use_bias=True, use_conv_bias=False)),
    # FalconMamba: weightless RMS norms on dt, B, C
    "falcon": ("falcon", dict(hidden_size=32, state_size=12, conv_kernel=4, time_step_rank=3)),
    # the original state-spaces layout (backbone.embedding, pytorch_model.bin, no "architectures"),
    # conv width 2 (a state of one column), d_state 4
    "state-spaces": ("state-spaces", dict(hidden_size=32, state_size=4, conv_kernel=2, time_step_rank=3)),
}

MAMBA2_CONFIGS = {  # name: (layout, config). num_heads * head_dim = expand * hidden_size.
    # two groups of B/C shared by four heads each, untied head, conv width 4
    "groups2-untied": ("hf", dict(hidden_size=32, expand=2, num_heads=8, head_dim=8, n_groups=2, state_size=8,
                                  conv_kernel=4, tie_word_embeddings=False)),
    # odd vocabulary with a tokenizer, tied head, head dim 16, three groups, d_state 16, conv width 3,
    # biases on in/out proj, no conv bias, and dt clipped by time_step_limit
    "v301-tied-dtlimit": ("hf", dict(vocab_size=301, tokenizer_vocab=301, hidden_size=48, expand=2, num_heads=6,
                                     head_dim=16, n_groups=3, state_size=16, conv_kernel=3,
                                     tie_word_embeddings=True, use_bias=True, use_conv_bias=False,
                                     time_step_limit=(0.0, 0.05))),
    # expand 3, twelve heads in four groups, d_state 4, conv width 2 (a one-column conv state)
    "expand3-groups4": ("hf", dict(hidden_size=32, expand=3, num_heads=12, head_dim=8, n_groups=4, state_size=4,
                                   conv_kernel=2, tie_word_embeddings=False)),
    # the original state-spaces layout (ssm_cfg {"layer": "Mamba2", ...}, pytorch_model.bin)
    "state-spaces": ("state-spaces", dict(hidden_size=32, expand=2, num_heads=4, head_dim=16, n_groups=1,
                                          state_size=8, conv_kernel=4, tie_word_embeddings=True)),
}


def not_degenerate(ref) -> None:
    """The reference must vary, or agreement with it would prove little."""
    assert ref.std() > 0.5 and len(set(ref.argmax(-1).tolist())) > 8


def softmax_scores(router, inputs, out):
    """The routing scores of a softmax router: (tokens, experts) from the router logits out[0]."""
    return out[0].softmax(-1)


def routing_margin(hf64, ids, routers, scores=softmax_scores, around=None) -> float:
    """The least gap between the k-th and (k+1)-th routing scores over every router of `routers` (modules
    with a `top_k`) and every token of `ids`, in the float64 reference `hf64`; inf without routers. A case's
    MoE models keep it above a margin so that float32 and float64 choose the same experts.
    scores(router, inputs, out): the (tokens, experts) scores the top-k picks from; `around`: a context the
    forward runs in."""
    gaps = []

    def hook(mod, inputs, out):
        top = scores(mod, inputs, out).sort(-1, descending=True).values
        gaps.append(float((top[:, mod.top_k - 1] - top[:, mod.top_k]).min()))

    hooks = [r.register_forward_hook(hook) for r in routers]
    try:
        with around or contextlib.nullcontext(), torch.no_grad():
            hf64(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return min(gaps, default=float("inf"))


def _mamba(name):
    def build(d: Path) -> Built:
        kind, cfg = MAMBA_CONFIGS[name]
        hf_dir = (make_falcon_mamba if kind == "falcon" else make_mamba)(d / "hf", seed=3, **cfg)
        ckpt = write_state_spaces(hf_dir, d / "state-spaces") if kind == "state-spaces" else hf_dir
        c = Built(ckpt, d, random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=7), hf_source=hf_dir)
        c.name, c.kind = name, kind
        not_degenerate(c.ref)
        return c
    return build


def _mamba2(name):
    def build(d: Path) -> Built:
        layout, cfg = MAMBA2_CONFIGS[name]
        hf_dir = make_mamba2(d / "hf", seed=4, **cfg)
        ckpt = write_state_spaces(hf_dir, d / "state-spaces") if layout == "state-spaces" else hf_dir
        c = Built(ckpt, d, random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=8), hf_source=hf_dir)
        c.name, c.layout = name, layout
        not_degenerate(c.ref)
        return c
    return build


def mamba_state(c: Built) -> dict:
    """Mamba-1's state per layer: the conv's last K-1 inputs (d_inner, K-1), the SSM state (n, d_inner)."""
    hc, out = c.hf.config, {}
    for i in range(hc.num_hidden_layers):
        out[f"past_key_values.{i}.conv_state"] = (1, hc.intermediate_size, hc.conv_kernel - 1)
        out[f"past_key_values.{i}.recurrent_state"] = (1, hc.state_size, hc.intermediate_size)
    return out


def mamba2_state(c: Built) -> dict:
    """Mamba-2's state per layer: the conv's last K-1 inputs over x, B and C (d_inner + 2 G n, K-1),
    and the SSD state (H, n, P), the layout of ONNX Runtime's LinearAttention (d_k = n, d_v = P)."""
    hc, out = c.hf.config, {}
    di = int(hc.expand * hc.hidden_size)
    for i in range(hc.num_hidden_layers):
        out[f"past_key_values.{i}.conv_state"] = (1, di + 2 * hc.n_groups * hc.state_size, hc.conv_kernel - 1)
        out[f"past_key_values.{i}.recurrent_state"] = (1, hc.num_heads, hc.state_size, hc.head_dim)
    return out


def _every_kind(ops: dict) -> dict:
    return {k: ops for k in ("step", "prefill", "prefill_all")}


# ---------------------------------------------------------------------------------------------
# Zamba, Zamba2, RecurrentGemma (transformers)
# ---------------------------------------------------------------------------------------------

M, H = "linear_attention", "hybrid"
ZAMBA_DEFAULTS = dict(vocab_size=256, hidden_size=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                      n_mamba_heads=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                      num_hidden_layers=4, use_associative_scan=False)
ZAMBA_CONFIGS = {
    # two Mamba heads, the shared block used twice
    "2heads": dict(layers_block_type=[M, H, M, H]),
    # four Mamba heads with dt rank 3 and conv width 3, GQA, the block used three times from layer 0,
    # untied head (transformers then keeps one block per hybrid layer), gelu tanh
    "4heads-gqa-untied": dict(layers_block_type=[H, M, H, H], n_mamba_heads=4, mamba_dt_rank=3, mamba_d_conv=3,
                              num_key_value_heads=2, tie_word_embeddings=False, hidden_act="gelu_pytorch_tanh"),
}


def add_zamba_noise(model, seed):
    """conftest's recipe (randn * 1.5 / sqrt(fan_in)) on every tensor of two or more dimensions,
    with a third of it on the query/key projections (sharper scores make float32 rounding alone move
    the logits past the tolerance) and a tenth on dt_proj (fan-in = the dt rank, as Mamba-1's tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2 and not name.endswith(("A_log", "D", "dt_proj_bias")):
                scale = 0.5 if ("q_proj" in name or "k_proj" in name) else 0.15 if "dt_proj" in name else 1.5
                p.add_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
    return model


def make_zamba(path, seed=0, **cfg) -> Path:
    torch.manual_seed(seed)
    model = add_zamba_noise(ZambaForCausalLM(ZambaConfig(**{**ZAMBA_DEFAULTS, **cfg})).eval(), seed)
    path = Path(path)
    model.save_pretrained(path)
    return path


ZAMBA2_DEFAULTS = dict(vocab_size=256, hidden_size=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                       n_mamba_heads=4, mamba_ngroups=1, num_attention_heads=4, intermediate_size=48,
                       adapter_rank=4, chunk_size=16, num_hidden_layers=4, max_position_embeddings=4096)
ZAMBA2_CONFIGS = {
    # one shared block used twice, LoRA adapters on q/k/v, RoPE, Mistral's SentencePiece vocabulary
    "1block-adapters-rope": dict(layers_block_type=[M, H, M, H], num_mem_blocks=1, use_shared_attention_adapter=True,
                                 use_mem_rope=True, vocab_size=32000),
    # two blocks tied cyclically over three uses, no q/k/v adapters, no RoPE, grouped-query attention,
    # two B/C groups, and a time_step_min high enough that the clamp changes the numbers
    "2blocks-gqa-dtmin": dict(layers_block_type=[H, M, H, H], num_mem_blocks=2, use_shared_attention_adapter=False,
                              use_mem_rope=False, num_key_value_heads=2, mamba_ngroups=2, time_step_min=0.05),
    # two blocks over four uses with adapters and RoPE, untied head, gelu with the tanh approximation
    "2blocks-adapters-rope-untied": dict(layers_block_type=[H, H, M, H, H], num_hidden_layers=5, num_mem_blocks=2,
                                         use_shared_attention_adapter=True, use_mem_rope=True,
                                         tie_word_embeddings=False, hidden_act="gelu_pytorch_tanh"),
}


def mistral_v1() -> str | None:
    spec = importlib.util.find_spec("mistral_common")
    return os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1") if spec else None


def add_zamba2_noise(model, seed):
    """conftest's recipe (randn * 1.5 / sqrt(fan_in) on every matrix), with a third of it on the query
    and key projections and their adapters: at full noise the attention scores are so sharp that
    float32 rounding alone (HF's own float32 forward) moves the logits by 1.4e-4, past the tolerance;
    at a third, by 4e-5, and the logits stay varied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                qk = any(t in name for t in ("q_proj", "k_proj", "linear_q_adapter", "linear_k_adapter"))
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if qk else 1.5) / p.shape[-1] ** 0.5)
    return model


def make_zamba2(path, seed=0, **cfg) -> Path:
    torch.manual_seed(seed)
    model = add_zamba2_noise(Zamba2ForCausalLM(Zamba2Config(**{**ZAMBA2_DEFAULTS, **cfg})).eval(), seed)
    path = Path(path)
    model.save_pretrained(path)
    if cfg.get("vocab_size") == 32000 and mistral_v1():
        shutil.copyfile(mistral_v1(), path / "tokenizer.model")  # converted to tokenizer.json at export
    return path


def _hf(make, configs, seed, ids_seed, name):
    def build(d: Path) -> Built:
        cfg = configs[name]
        c = Built(make(d / "hf", seed=seed, **cfg), d, random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=ids_seed))
        c.name = name
        not_degenerate(c.ref)
        return c
    return build


def zamba_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    di = hc.mamba_expand * hc.hidden_size
    for i, t in enumerate(hc.layers_block_type):
        out[f"past_key_values.{i}.conv_state"] = (1, di, hc.mamba_d_conv - 1)
        out[f"past_key_values.{i}.recurrent_state"] = (1, hc.mamba_d_state, di)
        if t == "hybrid":
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hc.attention_head_dim)
    return out


def zamba2_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    di = hc.mamba_expand * hc.hidden_size
    for i, t in enumerate(hc.layers_block_type):
        out[f"past_key_values.{i}.conv_state"] = (1, di + 2 * hc.mamba_ngroups * hc.mamba_d_state, 3)
        out[f"past_key_values.{i}.recurrent_state"] = (1, hc.n_mamba_heads, hc.mamba_d_state, di // hc.n_mamba_heads)
        if t == "hybrid":
            for k in ("key", "value"):
                out[f"past_key_values.{i}.{k}"] = (1, hc.num_key_value_heads, "max_context", hc.attention_head_dim)
    return out


RG_WINDOW = 8
RG_CONFIGS = {
    # six layers: (rec, rec, attn) twice; MQA; head dim 12 with RoPE on 6 channels; sqrt(48) = 6.928
    # becomes 6.9375 in bfloat16 (the embedding scale HF applies)
    "mqa": dict(hidden_size=48, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=1),
    # two key/value heads (GQA), an RG-LRU wider than the model, a block pattern of its own, conv width 3,
    # and a soft-cap of 4 that bends most logits
    "gqa-cap4": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, lru_width=64, conv1d_width=3, logits_soft_cap=4.0,
                     block_types=["recurrent", "attention"]),
}


def add_rg_noise(model, seed: int):
    """conftest's noise recipe (randn · 1.5/sqrt(fan_in)), except the conv taps (fan-in 4) and the
    RG-LRU gate blocks get a fifth and a third of it. With the full recipe the a-gate saturates, a → 1,
    and 1 - a² (the input normaliser) cancels so badly that HF's own float32 forward moves the logits
    by 1.2e-4 to 2.8e-4 from its float64 forward, past the 1e-4 the tests assert; with these scales
    it moves them by ~1e-5 and the logits stay as varied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                scale = 0.3 if "conv_1d" in name else 0.5 if "gate_weight" in name else 1.5
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32) * scale / p.shape[-1] ** 0.5)
    return model


def make_recurrent_gemma(path, seed: int = 0, **cfg):
    """A tiny random RecurrentGemmaForCausalLM (vocab 256: byte-level) saved into `path`."""
    torch.manual_seed(seed)
    config = RecurrentGemmaConfig(**{"vocab_size": 256, "attention_window_size": RG_WINDOW, **cfg})
    model = add_rg_noise(RecurrentGemmaForCausalLM(config).eval(), seed)
    model.save_pretrained(path)
    return path


def rg_state(c: Built) -> dict:
    hc, out = c.hf.config, {}
    for i in range(hc.num_hidden_layers):
        if hc.block_types[i % len(hc.block_types)] == "recurrent":
            out[f"past_key_values.{i}.conv_state"] = (1, hc.lru_width, hc.conv1d_width - 1)
            out[f"past_key_values.{i}.recurrent_state"] = (1, hc.lru_width)
        else:
            out[f"past_key_values.{i}.key"] = (1, hc.num_key_value_heads, hc.attention_window_size, hc.head_dim)
            out[f"past_key_values.{i}.value"] = (1, hc.num_key_value_heads, hc.attention_window_size, hc.head_dim)
    return out


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------

CONV = {"CausalConvWithState": True}

CASES: dict[str, FamilyCase] = {}


def register(*cases: FamilyCase) -> None:
    for c in cases:
        assert c.id not in CASES, c.id
        CASES[c.id] = c


# The checks each family's own file ran before this suite are kept where they were (the same cases, the
# same flavours); a check no family file had runs on the family's first case, in the fused flavour.

ONE_TOKEN_FAMILIES = dict(step=B, prefill_all=B, prefill_then_steps=B, chunked=B, plain_ort=B, low_memory=B,
                          state_spec=B, state_constant=B, flavour_ops=True)

register(*(FamilyCase(
    f"mamba/{name}", "mamba", _mamba(name),
    checks(ONE_TOKEN_FAMILIES, save_load_fork=first and F, gguf=first),
    state=mamba_state, tokenizer="hf" if cfg.get("tokenizer_vocab") else "bytes",
    # Mamba-1's scan stays a Scan in the fused flavour too (one-head-per-channel LinearAttention was slower)
    fused_ops=_every_kind({**CONV, "LinearAttention": False}))
    for first, (name, (_, cfg)) in zip((True, False, False, False), MAMBA_CONFIGS.items())))

register(*(FamilyCase(
    f"mamba2/{name}", "mamba2", _mamba2(name),
    checks(ONE_TOKEN_FAMILIES, save_load_fork=first and F, gguf=first),
    state=mamba2_state, tokenizer="hf" if cfg.get("tokenizer_vocab") else "bytes",
    fused_ops=_every_kind({**CONV, "LinearAttention": True}))
    for first, (name, (_, cfg)) in zip((True, False, False, False), MAMBA2_CONFIGS.items())))

# The hybrids: their files ran most checks in the fused flavour only (the flavours share the Mamba mixers
# and the attention ring that Mamba, Mamba-2 and RecurrentGemma check in both)
register(*(FamilyCase(
    f"zamba/{name}", "zamba", _hf(make_zamba, ZAMBA_CONFIGS, 5, 4, name),
    checks(step=B, prefill_all=F, prefill_then_steps=B, chunked=F, state_spec=F, save_load_fork=F,
           plain_ort=first and F, state_constant=first and F, low_memory=first and F, flavour_ops=first,
           gguf=first),
    state=zamba_state, position=True, prefill_at=(2, 40),
    # 4heads-gqa-untied is ill-conditioned (dt rank 3): HF's own float32 forward is 1.6e-3 from its float64
    # one over 64 random tokens (transformers 5.25), edgeseq's 48-token Scan 1.1e-4 from the float64 logits
    prefill_all_tol=2e-4 if name == "4heads-gqa-untied" else None,
    fused_ops={"prefill": CONV}, load={"max_context": 96}, fork_at=25)
    for first, name in zip((True, False), ZAMBA_CONFIGS)))

register(*(FamilyCase(
    f"zamba2/{name}", "zamba2", _hf(make_zamba2, ZAMBA2_CONFIGS, 7, 3, name),
    checks(step=B, prefill_all=F, prefill_then_steps=B, chunked=F, plain_ort=F, state_spec=F, save_load_fork=F,
           flavour_ops=True, state_constant=first and F, low_memory=first and F, gguf=first),
    state=zamba2_state, position=True,
    tokenizer="hf" if ZAMBA2_CONFIGS[name].get("vocab_size") == 32000 and mistral_v1() else "bytes",
    fused_ops={"prefill": {**CONV, "LinearAttention": True}}, load={"max_context": 128}, fork_at=30)
    for first, name in zip((True, False, False), ZAMBA2_CONFIGS)))

register(*(FamilyCase(
    f"recurrent_gemma/{name}", "recurrent_gemma", _hf(make_recurrent_gemma, RG_CONFIGS, 3, 8, name),
    checks(step=B, prefill_all=B, prefill_then_steps=B, chunked=B, plain_ort=first and F, state_spec=first and F,
           state_constant=first and B, save_load_fork=first and B, flavour_ops=first, gguf=first,
           low_memory=first and F),
    state=rg_state, position=True,
    # prefills shorter than, equal to and longer than the window of 8 (50: the ring wraps six times in one call)
    prefill_at=(3, RG_WINDOW, 2 * RG_WINDOW + 3, 50),
    fused_ops=_every_kind(CONV), fork_at=29)
    for first, name in zip((True, False), RG_CONFIGS)))

from family_rwkv import CASES as RWKV_CASES  # noqa: E402  (it imports this module's helpers)
register(*RWKV_CASES)
# (tests/test_rwkv4..7.py import these from here)
from family_rwkv import (FIXTURES, PROMPT, RWKV4_CPP, RWKV5_CPP, RWKV5_SHAPE, RWKV5_TEXT,  # noqa: E402, F401
                         RWKV6_CONFIGS, RWKV7_CONFIGS, make_hf_rwkv4, numpy_rwkv5)


from family_qwen35 import CASES as QWEN35_CASES  # noqa: E402  (it imports this module's helpers)
register(*QWEN35_CASES)
from family_lfm2 import CASES as LFM2_CASES, MOE_CASES as LFM2_MOE_CASES  # noqa: E402
register(*LFM2_CASES, *LFM2_MOE_CASES)
from family_lfm3 import CASES as LFM3_CASES  # noqa: E402
register(*LFM3_CASES)
from family_jamba import CASES as JAMBA_CASES  # noqa: E402
register(*JAMBA_CASES)
from family_nemotron_h import CASES as NEMOTRON_H_CASES  # noqa: E402
register(*NEMOTRON_H_CASES)
from family_granite_hybrid import CASES as GRANITE_HYBRID_CASES  # noqa: E402
register(*GRANITE_HYBRID_CASES)
from family_falcon_h1 import CASES as FALCON_H1_CASES  # noqa: E402
register(*FALCON_H1_CASES)
from family_qwen35_moe import CASES as QWEN35_MOE_CASES  # noqa: E402
register(*QWEN35_MOE_CASES)

def cases(*families: str) -> list[FamilyCase]:
    return [c for c in CASES.values() if c.family in families] if families else list(CASES.values())


# ---------------------------------------------------------------------------------------------
# building, once per session
# ---------------------------------------------------------------------------------------------

_BUILT: dict = {}


def built(case_id: str, tmp_path_factory):
    """The registered case `case_id` built (cached for the session); a group builds all its cases at once."""
    if case_id not in _BUILT:
        case = CASES[case_id]
        d = tmp_path_factory.mktemp(case_id.replace("/", "-"))
        if case.group:
            _BUILT.update(case.group(d))
        else:
            _BUILT[case_id] = case.build(d)
    return _BUILT[case_id]
