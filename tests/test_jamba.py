"""Jamba: what is special to it: more layer patterns and options against transformers' float64 logits,
the fused 3-D expert layout, GGUF (edgeseq's file equals what llama.cpp's converter writes, llama.cpp runs
it within 1e-3 of transformers, edgeseq runs the converter's file), the mobile bundle, the routers kept
f32 under int4/int8, and clear errors for what is unsupported. The common checks run over
tests/family_jamba.py's cases in tests/test_conformance.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import families  # noqa: F401  (first: the suite's helpers)
from conftest import SEQ_LEN, as_f64, hf_logits64, load_hf, random_ids
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.jamba import Jamba
from family_jamba import CONFIGS, build_jamba, make_jamba
from families import mistral_v1
from gguf_helpers import convert, llama_cpp

# logits only: each varies what the conformance cases keep fixed
VARIANTS = {
    # attention first (offset 0) and every fourth layer, MHA, experts on every layer (period 1), top 1 of 3
    "attn0-moe-every-layer-top1-of-3": dict(num_hidden_layers=5, attn_layer_period=4, attn_layer_offset=0,
                                            num_key_value_heads=4, expert_layer_period=1, expert_layer_offset=0,
                                            num_experts=3, num_experts_per_tok=1, seed=6),
    # Mamba in/out projection biases, no conv bias, experts on even layers (top 3 of 5), untied, d_state 4
    "proj-bias-no-conv-bias-top3-of-5": dict(mamba_proj_bias=True, mamba_conv_bias=False, expert_layer_offset=0,
                                             num_experts=5, num_experts_per_tok=3, mamba_d_state=4,
                                             tie_word_embeddings=False, seed=8),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    return build_jamba(request.param, tmp_path_factory.mktemp("jamba-" + request.param), VARIANTS[request.param])


def test_variant_logits(variant):
    """Prefill of every position (fused flavour) and steps (portable) against transformers in float64."""
    c = Jamba.read_config(Checkpoint(str(variant.ckpt)))
    hc = variant.hf.config
    assert c.attn_layers == [i for i, x in enumerate(hc.layers_block_type) if x == "attention"]
    assert c.moe_layers == [i for i, x in enumerate(hc.layers_num_experts) if x > 1]
    assert c.proj_bias == hc.mamba_proj_bias and c.conv_bias == hc.mamba_conv_bias
    s = variant.model(False).session()
    assert np.abs(s.prefill(variant.ids[:40]) - variant.ref[39]).max() < variant.tol
    s = variant.model(True).session()
    got = np.array([s.step(i) for i in variant.ids[:24]])
    assert np.abs(got - variant.ref[:24]).max() < variant.tol


def test_routing_matters(family_case_moe):
    """The MoE case routes: its float64 reference changes when every chosen expert is weighed alike, so
    logits within 1e-4 of it check the choice and the (not renormalised) weights."""
    import transformers.models.jamba.modeling_jamba as modeling

    c = family_case_moe
    saved = modeling.JambaTopKRouter.forward

    def uniform(self, hidden_states):
        logits, w, chosen = saved(self, hidden_states)
        return logits, torch.full_like(w, 1.0 / w.shape[-1]), chosen

    modeling.JambaTopKRouter.forward = uniform
    try:
        other = hf_logits64(c.hf64, c.ids)
    finally:
        modeling.JambaTopKRouter.forward = saved
    assert np.abs(other - c.ref).max() > 0.05


@pytest.fixture(scope="module")
def family_case_moe(tmp_path_factory):
    return families.built("jamba/moe-top2-of-4-tied", tmp_path_factory)


def test_fused_expert_layout(family_case_moe, tmp_path):
    """Experts stored as transformers keeps them in memory (gate_up_proj (E, 2f, d), down_proj (E, d, f))
    convert to the same weights as the per-expert names save_pretrained and the hub write."""
    from safetensors.numpy import load_file, save_file

    c = family_case_moe
    ck = tmp_path / "fused"
    shutil.copytree(c.ckpt, ck)
    sd = load_file(str(ck / "model.safetensors"))
    E = c.hf.config.num_experts
    for i in Jamba.read_config(Checkpoint(str(c.ckpt))).moe_layers:
        f = f"model.layers.{i}.feed_forward.experts."
        g, u, dn = ([sd.pop(f"{f}{e}.{w}_proj.weight") for e in range(E)] for w in ("gate", "up", "down"))
        sd[f + "gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(g, u)])
        sd[f + "down_proj"] = np.stack(dn)
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    fam = Jamba(Jamba.read_config(Checkpoint(str(c.ckpt))))
    assert fam.layout(Checkpoint(str(ck)))[0] == "fused-experts" and fam.layout(Checkpoint(str(c.ckpt)))[0] is None
    want = dict(fam.convert(Checkpoint(str(c.ckpt))))
    got = dict(fam.convert(Checkpoint(str(ck))))
    assert set(got) == set(want) and any("experts_gate" in n for n in got)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_sharded_bf16_checkpoint(tmp_path):
    """bf16 weights in several safetensors shards (an index file), as released checkpoints come."""
    ck = make_jamba(tmp_path / "hf", seed=1, dtype=torch.bfloat16, shard="30KB")
    assert (ck / "model.safetensors.index.json").exists() and len(list(ck.glob("*.safetensors"))) > 2
    hf = load_hf(ck)
    hf.set_experts_implementation("eager")
    ref = hf_logits64(as_f64(hf), random_ids(256, 24, seed=2))
    from edgeseq.exporters.export import export
    import edgeseq

    s = edgeseq.load(export(str(ck), str(tmp_path / "b"))).session()
    assert np.abs(s.prefill(random_ids(256, 24, seed=2)) - ref[-1]).max() < 1e-4


def test_mobile_bundle(family_case_moe):
    """The mobile export (ORT format, standard ops, batch 1) steps to transformers' float64 logits."""
    import edgeseq
    from edgeseq.exporters.mobile import export_mobile

    c = family_case_moe
    s = edgeseq.load(export_mobile(str(c.ckpt), str(c.workdir / "mobile"))).session()
    got = np.array([s.step(i) for i in c.ids[:16]])
    assert np.abs(got - c.ref[:16]).max() < c.tol


def test_router_stays_f32_under_int4(tmp_path, monkeypatch):
    """int4 flips Jamba routes: on a 16-expert top-2 model (d 64) an int4 router alone (block 32, the
    rest float64) changed the chosen experts of 19 % of token-layer routes over 256 tokens (14 % and
    24 % in its two MoE layers), an int8 one 1 %; so the routers stay f32 (as llama.cpp's converter
    keeps ffn_gate_inp), and dt_proj keeps 8 bits. Without the policy the router goes 4-bit."""
    from edgeseq.exporters.export import export
    from edgeseq.families.base import Family

    ck = make_jamba(tmp_path / "hf", seed=5, hidden_size=64, num_experts=16, num_experts_per_tok=2,
                    intermediate_size=32, mamba_dt_rank=16)

    def quantized(out):
        return json.loads((Path(export(str(ck), str(tmp_path / out), quant="int4")) / "edgeseq.json").read_text()
                          )["quant"]["tensors"]

    t = quantized("int4")
    assert not any(r in t for r in ("layers.1.router", "layers.3.router")), sorted(t)
    assert t["layers.1.experts_up"]["bits"] == 4 and t["layers.0.in_proj"]["bits"] == 4
    assert t["layers.0.dt_proj"]["bits"] == 8
    monkeypatch.setattr(Jamba, "quant_policy", Family.quant_policy)
    t = quantized("int4-plain")
    assert t["layers.1.router"]["bits"] == 4


# ---------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's jamba
# ---------------------------------------------------------------------------------------------------

def _kv(reader) -> dict:
    """{key: (GGUF types, the value's bytes)} as gguf-py reads a file (a reader edgeseq did not write)."""
    return {f.name: ([int(x) for x in f.types], b"".join(p.tobytes() for p in f.parts[3:]))
            for f in reader.fields.values() if not f.name.startswith("GGUF.")}


# the converter title-cases the folder name, and labels an MoE's size "{E}x{per expert}"
# (exporters/gguf_writer.py writes the total)
DIFFERENT_VALUES = {"general.name", "general.size_label"}


@pytest.mark.slow
@pytest.mark.parametrize("name, compare", [("moe-top2-of-4-tied", True), ("dense-untied-period3", False)])
def test_same_file_as_llama_cpp_converter_and_both_engines_run_both(tmp_path, name, compare):
    """The MoE case with its head untied (so every jamba tensor kind is there: experts, dense MLPs,
    output.weight): edgeseq's GGUF equals the converter's (every key's type and value, every tensor's
    name, shape, type and values; Mistral's SentencePiece tokenizer.model) and edgeseq runs the
    converter's file within 1e-4 (the converter's start-up costs 8 s, so once). Both cases: llama.cpp
    runs edgeseq's file within 1e-3 of transformers' float64 logits (an f32 KV cache)."""
    lc = llama_cpp()
    if not mistral_v1():
        pytest.skip("mistral_common's tokenizer.model.v1 (a SentencePiece model the converter reads) is missing")
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    cfg = dict(CONFIGS[name], **({"tie_word_embeddings": False} if compare else {}))
    ck = make_jamba(tmp_path / "hf", seed=cfg.pop("seed", 3), **{**cfg, "vocab_size": 32000})
    shutil.copyfile(mistral_v1(), ck / "tokenizer.model")
    ours = tmp_path / "ours.gguf"
    info = export_gguf(str(ck), str(ours))
    assert info["architecture"] == "jamba" and info["generic_because"] is None
    prompt = random_ids(32000, 12, seed=4)
    hf = load_hf(ck)
    hf.set_experts_implementation("eager")
    want = hf_logits64(as_f64(hf), prompt)
    llm = lc.Llama(str(ours), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    llm.eval(prompt)
    np.testing.assert_allclose(np.array(llm.scores[:len(prompt)]), want, atol=1e-3, rtol=0)
    if not compare:
        return
    from gguf import GGUFReader

    ref = convert(ck, tmp_path / "ref.gguf")
    a, b = GGUFReader(ours), GGUFReader(ref)
    ka, kb = _kv(a), _kv(b)
    assert set(ka) == set(kb)
    for k in kb:
        assert ka[k][0] == kb[k][0], k
        assert k in DIFFERENT_VALUES or ka[k][1] == kb[k][1], (k, a.fields[k].contents(), b.fields[k].contents())
    kv = list(b.fields["jamba.attention.head_count_kv"].contents())
    assert kv == [2 if x == "attention" else 0 for x in hf.config.layers_block_type] == [0, 2, 0, 2]
    ta, tb = {x.name: x for x in a.tensors}, {x.name: x for x in b.tensors}
    assert set(ta) == set(tb)
    assert {"output.weight", "blk.1.ffn_gate_exps.weight", "blk.0.ffn_gate.weight", "blk.0.ssm_dt_norm.weight",
            "blk.1.ffn_gate_inp.weight", "blk.1.attn_q.weight"} <= set(tb)
    for n, x in tb.items():
        assert (list(ta[n].shape), ta[n].tensor_type) == (list(x.shape), x.tensor_type), n
        np.testing.assert_allclose(ta[n].data, x.data, rtol=1e-6, atol=1e-7, err_msg=n)
    s = edgeseq.load(ref).session()
    got = np.array([s.step(t) for t in prompt])
    assert np.abs(got - want).max() < 1e-4


def test_gguf_read_back_in_edgeseq(family_case_moe, tmp_path):
    """edgeseq reads back the jamba file it writes (layer pattern from head_count_kv, MoE layers from
    ffn_gate_inp) to the same config and the reference."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    c = family_case_moe
    export_gguf(str(c.ckpt), str(tmp_path / "m.gguf"))
    m = edgeseq.load(tmp_path / "m.gguf")
    cfg = Jamba.read_config(Checkpoint(str(c.ckpt)))
    got = m.manifest["config"]
    assert (got["attn_layers"], got["moe_layers"]) == (cfg.attn_layers, cfg.moe_layers)
    assert np.abs(m.session().prefill(c.ids[:SEQ_LEN]) - c.ref[-1]).max() < c.tol


def test_what_llama_cpp_cannot_run_is_generic_gguf(variant, tmp_path):
    """llama.cpp's jamba has no Mamba projection biases and needs the conv bias (its loader stops at a
    missing blk.0.ssm_conv1d.bias): such checkpoints are written as edgeseq's generic GGUF, saying why."""
    from edgeseq.exporters.gguf_writer import export_gguf

    info = export_gguf(str(variant.ckpt), str(tmp_path / "m.gguf"))
    if variant.name.startswith("proj-bias"):
        assert info["architecture"] == "edgeseq-jamba" and "mamba_proj_bias" in info["generic_because"]
    else:
        assert info["architecture"] == "jamba" and info["generic_because"] is None


def test_no_attention_layer_is_generic_gguf(tmp_path):
    """Three layers with attention from layer 4: all Mamba. edgeseq runs it to transformers' float64
    logits (without a cache: transformers' cache needs an attention layer); llama.cpp's jamba aborts the process on it (GGML_ASSERT(buffer): an empty KV cache), so the
    GGUF is edgeseq's generic one."""
    from edgeseq.exporters.gguf_writer import export_gguf

    ck = make_jamba(tmp_path / "hf", num_hidden_layers=3, attn_layer_period=8, attn_layer_offset=4)
    assert Jamba.read_config(Checkpoint(str(ck))).attn_layers == []
    import edgeseq
    from edgeseq.exporters.export import export

    ids = random_ids(256, 16, seed=3)
    hf = load_hf(ck)
    hf.set_experts_implementation("eager")
    s = edgeseq.load(export(str(ck), str(tmp_path / "b"))).session()
    assert np.abs(np.array([s.step(i) for i in ids]) - hf_logits64(as_f64(hf), ids)).max() < 1e-4
    info = export_gguf(str(ck), str(tmp_path / "m.gguf"))
    assert info["architecture"] == "edgeseq-jamba" and "attention layers" in info["generic_because"]


def test_dense_model_expert_used_count(tmp_path):
    """transformers' default num_experts_per_tok (2) on a model without experts (num_experts 1): the
    converter writes expert_used_count 2 > expert_count 1, on which llama.cpp aborts the process
    (GGML_ASSERT n_expert_used_max <= n_expert); edgeseq writes 1, which it runs."""
    from gguf import GGUFReader

    from edgeseq.exporters.gguf_writer import export_gguf

    ck = make_jamba(tmp_path / "hf", num_experts=1, num_experts_per_tok=2)
    assert Jamba.read_config(Checkpoint(str(ck))).top_k == 1
    export_gguf(str(ck), str(tmp_path / "m.gguf"))
    r = GGUFReader(tmp_path / "m.gguf")
    assert (r.fields["jamba.expert_count"].contents(), r.fields["jamba.expert_used_count"].contents()) == (1, 1)


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

def _edit_config(path, **kw):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(kw)
    f.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return make_jamba(tmp_path_factory.mktemp("jamba-plain") / "hf", seed=1)


@pytest.mark.parametrize("edit, error, message", [
    (dict(hidden_act="gelu"), UnsupportedError, "hidden_act 'gelu'"),
    (dict(head_dim=16), UnsupportedError, "head_dim 16"),
    (dict(attn_layer_offset=2, attn_layer_period=2), UnsupportedError, "attn_layer_offset 2"),
    (dict(num_experts_per_tok=5), UnsupportedError, "num_experts_per_tok 5"),
    (dict(attn_layer_period=1, attn_layer_offset=0), UnsupportedError, "leaves no Mamba layer"),
    (dict(attn_layer_offset=0), EdgeseqError, "the weights lack"),  # the weights follow another pattern
    (dict(mamba_expand=3), EdgeseqError, "mamba_expand 3"),
])
def test_unsupported_config(plain_ckpt, tmp_path, edit, error, message):
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    _edit_config(ck, **edit)
    with pytest.raises(error, match=message) as e:
        Jamba.read_config(Checkpoint(str(ck)))
    assert "config.json" in str(e.value) or str(ck) in str(e.value)


def test_cli_error_is_one_line_and_writes_nothing(plain_ckpt, tmp_path):
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    _edit_config(ck, hidden_act="gelu")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-m", "edgeseq", "export", str(ck), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0] and "hidden_act" in lines[0]
    assert not out.exists()


def test_gguf_tokenizer_prefers_sentencepiece_as_the_converter(tmp_path):
    """Released Jamba folders may hold both tokenizer.model and tokenizer.json; llama.cpp's converter then
    writes the SentencePiece model (tokenizer.ggml.model "llama", scores), and so does edgeseq's GGUF."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from edgeseq.exporters.gguf_writer import export_gguf
    from edgeseq.gguf_file import GGUFFile

    cfg = dict(CONFIGS["dense-untied-period3"])
    ck = make_jamba(tmp_path / "hf", seed=cfg.pop("seed", 3), **{**cfg, "vocab_size": 32000})
    shutil.copyfile(mistral_v1(), ck / "tokenizer.model")  # mistral_common is a test extra
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(ck / "tokenizer.json"))
    export_gguf(str(ck), str(tmp_path / "m.gguf"))
    g = GGUFFile(str(tmp_path / "m.gguf"))
    assert g.get("tokenizer.ggml.model") == "llama"
    assert len(g.get("tokenizer.ggml.scores")) == 32000
