"""Zamba2: exported bundles against transformers' Zamba2ForCausalLM (float64, full forward without
cache: HF's cached decode skips the time_step_min clamp), the KV ring with its run-time length
(max_context) and position, and the SentencePiece tokenizer converted at export."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Zamba2Config, Zamba2ForCausalLM

import edgeseq
from conftest import (
    SEQ_LEN,
    TOL,
    Built,
    check_chunked_and_repeated_prefill,
    check_prefill_all_matches_hf,
    check_prefill_then_steps,
    check_step_matches_hf,
    graph_ops,
    hf_logits64,
    max_diff,
    random_ids,
    step_all,
    steps_alone,
)
from edgeseq.errors import EdgeseqError

DEFAULTS = dict(vocab_size=256, hidden_size=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=4,
                mamba_ngroups=1, num_attention_heads=4, intermediate_size=48, adapter_rank=4, chunk_size=16,
                num_hidden_layers=4, max_position_embeddings=4096)
M, H = "linear_attention", "hybrid"

CONFIGS = {
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


def add_noise(model, seed):
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
    model = add_noise(Zamba2ForCausalLM(Zamba2Config(**{**DEFAULTS, **cfg})).eval(), seed)
    path = Path(path)
    model.save_pretrained(path)
    if cfg.get("vocab_size") == 32000 and mistral_v1():
        shutil.copyfile(mistral_v1(), path / "tokenizer.model")  # converted to tokenizer.json at export
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Built:
    cfg = CONFIGS[request.param]
    d = tmp_path_factory.mktemp(f"zamba2-{request.param}")
    c = Built(make_zamba2(d / "hf", seed=7, **cfg), d, random_ids(cfg.get("vocab_size", 256), SEQ_LEN, seed=3))
    c.name = request.param
    assert c.ref.std() > 0.5 and len(set(c.ref.argmax(-1).tolist())) > 8  # not degenerate
    return c


FLAVOURS = pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])


# -- numbers against transformers ---------------------------------------------------------------

@FLAVOURS
def test_step_matches_hf(case, portable):
    check_step_matches_hf(case, portable)


def test_prefill_all_matches_hf(case):
    check_prefill_all_matches_hf(case, False)


@FLAVOURS
@pytest.mark.parametrize("t", [1, 2, 40])
def test_prefill_then_steps_equals_steps(case, portable, t):
    check_prefill_then_steps(case, portable, t)


def test_chunked_and_repeated_prefill(case):
    check_chunked_and_repeated_prefill(case, False)


def test_graphs_with_plain_onnxruntime(case):
    """An app's view: plain onnxruntime, names and shapes from the manifest, max_context chosen by
    the app (64 here), the position fed by hand."""
    import onnxruntime as ort

    bundle = case.bundle(False)
    man = json.loads((bundle / "edgeseq.json").read_text())
    assert man["max_context"] == 4096
    dims = {"batch": 1, "max_context": 64}
    zeros = {s["name"]: np.zeros([dims.get(d, d) for d in s["shape"]], np.float32) for s in man["state"]}
    sess = {k: ort.InferenceSession(str(bundle / g["file"]), providers=["CPUExecutionProvider"])
            for k, g in man["graphs"].items()}

    def run(kind, ids, state, p):
        g = man["graphs"][kind]
        assert g["inputs"][:2] == ["input_ids", "position"]
        outs = sess[kind].run(g["outputs"], {"input_ids": np.asarray([ids], np.int64),
                                             "position": np.array([p], np.int64), **state})
        return outs[0], {s["name"]: o for s, o in zip(man["state"], outs[1:])}

    state, got = dict(zeros), []
    for p, t in enumerate(case.ids):
        out, state = run("step", [t], state, p)
        got.append(out[0])
    assert max_diff(np.stack(got), case.ref) < TOL
    last, st = run("prefill", case.ids[:40], zeros, 0)
    last, st = run("prefill", case.ids[40:], st, 40)
    assert max_diff(last[0], case.ref[-1]) < TOL
    every, _ = run("prefill_all", case.ids, zeros, 0)
    assert max_diff(every[0], case.ref) < TOL


# -- state, max_context, position --------------------------------------------------------------

def test_state_spec(case):
    hc = case.hf.config
    man = json.loads((case.bundle(False) / "edgeseq.json").read_text())
    di = hc.mamba_expand * hc.hidden_size
    want = {}
    for i, t in enumerate(hc.layers_block_type):
        want[f"past_key_values.{i}.conv_state"] = ["batch", di + 2 * hc.mamba_ngroups * hc.mamba_d_state, 3]
        want[f"past_key_values.{i}.recurrent_state"] = ["batch", hc.n_mamba_heads, hc.mamba_d_state,
                                                        di // hc.n_mamba_heads]
        if t == "hybrid":
            for k in ("key", "value"):
                want[f"past_key_values.{i}.{k}"] = ["batch", hc.num_key_value_heads, "max_context",
                                                    hc.attention_head_dim]
    assert {s["name"]: s["shape"] for s in man["state"]} == want
    assert man["state_bytes_per_sequence"] == 4 * sum(np.prod([4096 if d == "max_context" else d for d in v[1:]])
                                                      for v in want.values())
    m = edgeseq.load(case.bundle(False), max_context=24)
    st = m.session().state()
    assert st["past_key_values.%d.key" % hc.hybrid_layer_ids[0]].shape == (1, hc.num_key_value_heads, 24,
                                                                            hc.attention_head_dim)
    assert m.state_bytes == sum(v.nbytes for v in st.values())
    ins = {i.name: i.shape for i in m.engine.session("prefill").get_inputs()}
    assert ins["position"] == [1]


@pytest.mark.parametrize("case", ["2blocks-gqa-dtmin"], indirect=True)
def test_context_full_stops_by_default(case):
    m = edgeseq.load(case.bundle(False), max_context=16)
    s = m.session()
    s.prefill(case.ids[:10])
    with pytest.raises(EdgeseqError, match="context full: 16 tokens.*--on-full slide"):
        s.prefill(case.ids[10:20])
    assert s.position == 10  # nothing was fed
    assert max_diff(step_all(s, case.ids[10:16]), case.ref[10:16]) < TOL  # up to the brim: exact
    with pytest.raises(EdgeseqError, match="context full"):
        s.step(case.ids[16])
    with pytest.raises(EdgeseqError, match="context full"):
        m.session().logits_all(case.ids[:17])


@pytest.mark.parametrize("case", ["1block-adapters-rope"], indirect=True)
def test_slide_past_max_context(case):
    """on_full='slide': the ring wraps and attention sees the last max_context tokens. Within the
    first max_context tokens the numbers are the full model's; past them they differ (as documented),
    but a prefill longer than the ring equals stepping, and chunked prefills equal both."""
    m = edgeseq.load(case.bundle(False), max_context=12, on_full="slide")
    stepped = step_all(m.session(), case.ids)
    assert max_diff(stepped[:12], case.ref[:12]) < TOL
    assert max_diff(stepped[12:], case.ref[12:]) > 1e-3
    s = m.session()
    assert max_diff(s.prefill(case.ids[:40]), stepped[39]) < TOL  # one call of 40 > 12 tokens
    assert max_diff(step_all(s, case.ids[40:]), stepped[40:]) < TOL
    assert s.position == SEQ_LEN
    s = m.session(prefill_chunk=5)
    assert max_diff(s.prefill(case.ids[:50]), stepped[49]) < TOL
    assert max_diff(m.session().logits_all(case.ids), stepped) < TOL


def test_save_load_fork_keep_the_position(case, tmp_path):
    m = edgeseq.load(case.bundle(False), max_context=128)
    s = m.session()
    s.prefill(case.ids[:30])
    s.save_state(str(tmp_path / "s.state"))
    t = m.session()
    t.load_state(str(tmp_path / "s.state"))
    assert t.position == 30
    f = s.fork()
    assert f.position == 30
    for sess in (s, t, f):
        assert max_diff(step_all(sess, case.ids[30:]), case.ref[30:]) < TOL
    # another ring length is another state shape: a clear error
    with pytest.raises(EdgeseqError):
        edgeseq.load(case.bundle(False), max_context=64).session().load_state(str(tmp_path / "s.state"))


def test_options_are_checked(case):
    with pytest.raises(EdgeseqError, match="on_full"):
        edgeseq.load(case.bundle(False), on_full="wrap")
    with pytest.raises(EdgeseqError, match="max_context"):
        edgeseq.load(case.bundle(False), max_context=0)


def test_graphs_use_the_ops_they_promise(case):
    fused, portable = graph_ops(case.bundle(False), "prefill"), graph_ops(case.bundle(True), "prefill")
    assert ("com.microsoft", "LinearAttention") in fused and ("com.microsoft", "CausalConvWithState") in fused
    assert {d for d, _ in portable} == {""}
    assert not {op for _, op in graph_ops(case.bundle(True), "step")} & {"Loop", "Scan", "If"}


# -- configuration and references ----------------------------------------------------------------

def test_config_read_from_checkpoint(case):
    hc = case.hf.config
    man = json.loads((case.bundle(False) / "edgeseq.json").read_text())
    cfg = man["config"]
    assert man["family"] == "zamba2" and man["architecture"] == "Zamba2ForCausalLM"
    assert cfg["hybrid_layers"] == hc.hybrid_layer_ids and cfg["num_mem_blocks"] == hc.num_mem_blocks
    assert (cfg["attn_heads"], cfg["kv_heads"], cfg["attn_head_dim"]) == (
        hc.num_attention_heads, hc.num_key_value_heads, hc.attention_head_dim)
    assert (cfg["attn_adapters"], cfg["mem_rope"], cfg["dt_min"]) == (
        hc.use_shared_attention_adapter, hc.use_mem_rope, hc.time_step_min)
    assert cfg["tie_embeddings"] == hc.tie_word_embeddings
    uses = len(hc.hybrid_layer_ids)
    if hc.tie_word_embeddings:  # blocks tied cyclically over the uses, each stored once
        assert cfg["use_block"] == [u % hc.num_mem_blocks for u in range(uses)]
        assert len(cfg["block_layer"]) == hc.num_mem_blocks
    else:  # transformers ties nothing then: every hybrid layer runs its own block (stored, different)
        assert cfg["use_block"] == list(range(uses)) and cfg["block_layer"] == hc.hybrid_layer_ids


@pytest.mark.parametrize("case", ["2blocks-gqa-dtmin"], indirect=True)
def test_dt_clamp_matters(case):
    """A control: without the time_step_min clamp HF gives other logits, so this configuration really
    checks the clamp edgeseq applies on every token."""
    free = copy.deepcopy(case.hf64)
    for layer in free.model.layers:
        mixer = layer.mamba_decoder.mamba if hasattr(layer, "mamba_decoder") else layer.mamba
        mixer.time_step_limit = (0.0, float("inf"))
    assert max_diff(hf_logits64(free, case.ids), case.ref) > 1e-2


@pytest.mark.parametrize("case", ["1block-adapters-rope"], indirect=True)
def test_sentencepiece_tokenizer_in_the_bundle(case):
    if mistral_v1() is None:
        pytest.skip("mistral-common is not installed (pip install -e '.[test]')")
    import sentencepiece as spm

    man = json.loads((case.bundle(False) / "edgeseq.json").read_text())
    assert man["tokenizer"] == {"kind": "hf", "file": "tokenizer.json"}
    assert (man["bos_token_id"], man["eos_token_id"]) == (1, 2)
    tok = case.model(False).tokenizer
    sp = spm.SentencePieceProcessor(model_file=mistral_v1())
    for text in ["Zamba2 runs on the edge.", "  spaced\tout\n\nüñí 🤖"]:
        assert tok.encode(text) == sp.encode(text)
    s = case.model(False).session()
    text = "".join(s.generate("Hello there", max_tokens=12, temperature=0.0))
    assert s.position == len(sp.encode("Hello there")) + s.stats.decode_tokens
    t = case.model(False).session()  # the same greedy continuation by hand
    logits, ids = t.prefill(sp.encode("Hello there")), []
    for _ in range(s.stats.decode_tokens):
        ids.append(int(np.argmax(logits)))
        logits = t.step(ids[-1])
    assert ids and text == sp.decode(ids)
