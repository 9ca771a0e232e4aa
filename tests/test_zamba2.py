"""Zamba2: what is special to it: its configuration, the KV ring's run-time length (max_context), stop
and slide when it is full, the dt clamp, and the SentencePiece tokenizer converted at export. The common
checks (transformers' Zamba2ForCausalLM in float64, full forward without cache: HF's cached decode skips
the time_step_min clamp; both flavours; the state contract; plain onnxruntime; save/load/fork; GGUF) run
over the cases registered in tests/families.py (ZAMBA2_CONFIGS), in tests/test_conformance.py."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import edgeseq
from conftest import SEQ_LEN, TOL, hf_logits64, max_diff, step_all
from edgeseq.errors import EdgeseqError
# tests/make_golden.py, tests/pi and the GGUF tests build Zamba2 models from these
from families import ZAMBA2_CONFIGS as CONFIGS, make_zamba2, mistral_v1  # noqa: F401


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, family_case):
    return family_case(f"zamba2/{request.param}")


# -- max_context ---------------------------------------------------------------------------------

def test_ring_length_is_chosen_at_load(case):
    hc = case.hf.config
    m = edgeseq.load(case.bundle(False), max_context=24)
    st = m.session().state()
    assert st["past_key_values.%d.key" % hc.hybrid_layer_ids[0]].shape == (1, hc.num_key_value_heads, 24,
                                                                            hc.attention_head_dim)
    assert m.state_bytes == sum(v.nbytes for v in st.values())
    assert json.loads((case.bundle(False) / "edgeseq.json").read_text())["max_context"] == 4096


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


def test_state_file_of_another_ring_length_is_refused(case, tmp_path):
    """Another ring length is another state shape: a clear error (save/load/fork themselves are in the
    conformance suite)."""
    s = edgeseq.load(case.bundle(False), max_context=128).session()
    s.prefill(case.ids[:30])
    s.save_state(str(tmp_path / "s.state"))
    with pytest.raises(EdgeseqError):
        edgeseq.load(case.bundle(False), max_context=64).session().load_state(str(tmp_path / "s.state"))


def test_options_are_checked(case):
    with pytest.raises(EdgeseqError, match="on_full"):
        edgeseq.load(case.bundle(False), on_full="wrap")
    with pytest.raises(EdgeseqError, match="max_context"):
        edgeseq.load(case.bundle(False), max_context=0)


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
