"""Falcon-H1: what is special to it: more config variants against transformers' float64 logits, every μP
multiplier shown to matter, sharded bf16 checkpoints, mobile and int8/int4 bundles, GGUF (edgeseq's file
equals what llama.cpp's converter writes, multipliers folded; llama.cpp runs it within 1e-3 of
transformers; edgeseq runs the converter's file; what llama.cpp cannot run is the generic GGUF), and
clear errors. The common checks run over tests/family_falcon_h1.py's cases in tests/test_conformance.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import families  # noqa: F401  (first: the suite's helpers)
from conftest import as_f64, hf_logits64, load_hf, random_ids
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.falcon_h1 import FalconH1
from family_falcon_h1 import CONFIGS, MULTIPLIERS, build_falcon_h1, make_falcon_h1
from gguf_helpers import convert, llama_cpp, write_neox_tokenizer

# logits only: each varies what the conformance cases keep fixed
VARIANTS = {
    # no gated norm in the mixer (mamba_rms_norm false: y · silu(z)), MHA, 3 groups of 2 heads, d_state
    # 16, no conv bias, a tied head whose multiplier equals the embedding's (the head is the embedding)
    "no-mamba-norm-mha-groups3-tied": dict(mamba_rms_norm=False, num_key_value_heads=4, mamba_n_groups=3,
                                          mamba_d_state=16, mamba_conv_bias=False, tie_word_embeddings=True,
                                          lm_head_multiplier=1.3, num_hidden_layers=2, seed=4),
    # head_dim 16 with 4 heads on d 48 (q wider than d), mamba_d_ssm from mamba_expand (null d_ssm:
    # 2 · 48 = 96, 12 heads of 8), RoPE theta 1e6, 4 layers
    "wide-heads-expand-ssm": dict(hidden_size=48, head_dim=16, mamba_d_ssm=None, mamba_expand=2, mamba_n_heads=12,
                                  mamba_d_head="auto", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                  num_hidden_layers=4, seed=6),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    return build_falcon_h1(request.param, tmp_path_factory.mktemp("falcon-h1-" + request.param),
                           VARIANTS[request.param])


def test_variant_logits(variant):
    """Prefill of every position (fused flavour) and steps (portable) against transformers in float64."""
    c = FalconH1.read_config(Checkpoint(str(variant.ckpt)))
    hc = variant.hf.config
    assert (c.mamba_norm, c.conv_bias, c.head_dim) == (hc.mamba_rms_norm, hc.mamba_conv_bias, hc.head_dim)
    assert c.tie_embeddings == (hc.tie_word_embeddings and hc.lm_head_multiplier == hc.embedding_multiplier)
    s = variant.model(False).session()
    assert np.abs(s.prefill(variant.ids[:40]) - variant.ref[39]).max() < variant.tol
    s = variant.model(True).session()
    got = np.array([s.step(i) for i in variant.ids[:24]])
    assert np.abs(got - variant.ref[:24]).max() < variant.tol


@pytest.fixture(scope="module")
def case_mup(tmp_path_factory):
    return families.built("falcon_h1/mup-gqa-groups2", tmp_path_factory)


@pytest.fixture(scope="module")
def case_rest(tmp_path_factory):
    return families.built("falcon_h1/norm-before-gate-mqa-biases-tied", tmp_path_factory)


def _without(case, key, j=None):
    """transformers' float64 logits (first 24 ids) with one multiplier (part j of a list) set to 1 in the
    model's own attributes (what its forward multiplies by), or with the dt clip lifted."""
    import copy

    m = copy.deepcopy(case.hf64)
    c = m.config
    for layer in m.model.layers:
        if key == "ssm_multipliers":
            di, gn = c.mamba_d_ssm, c.mamba_n_groups * c.mamba_d_state
            edges = np.cumsum([0, di, di, gn, gn, c.mamba_n_heads])
            layer.mamba.mup_vector[..., edges[j]:edges[j + 1]] = 1.0
        elif key == "mlp_multipliers":
            setattr(layer.feed_forward, ("gate_multiplier", "down_multiplier")[j], 1.0)
        elif key == "time_step_limit":
            layer.mamba.time_step_limit = (0.0, float("inf"))
        else:
            owner, name = {"key_multiplier": (layer.self_attn, "key_multiplier"),
                           "attention_in_multiplier": (layer, "attention_in_multiplier"),
                           "attention_out_multiplier": (layer, "attn_out_multiplier"),
                           "ssm_in_multiplier": (layer.mamba, "ssm_in_multiplier"),
                           "ssm_out_multiplier": (layer, "ssm_out_multiplier")}.get(key, (m.model, key))
            assert hasattr(owner, name), key
            setattr(owner, name, 1.0)
    return hf_logits64(m, case.ids[:24])


def test_every_multiplier_matters(case_mup, case_rest):
    """Each multiplier (each part of ssm_multipliers and mlp_multipliers) set to 1 alone, and the dt clip
    lifted, moves transformers' float64 logits by more than 0.02, so the conformance cases' 1e-4
    agreement checks each one where it is applied."""
    for key, value in MULTIPLIERS.items():
        for j in (range(len(value)) if isinstance(value, list) else [None]):
            assert np.abs(_without(case_mup, key, j) - case_mup.ref[:24]).max() > 0.02, (key, j)
    assert np.abs(_without(case_rest, "time_step_limit") - case_rest.ref[:24]).max() > 0.02


def test_sharded_bf16_checkpoint(tmp_path):
    """bf16 weights in several safetensors shards (an index file), as released checkpoints come."""
    import edgeseq
    from edgeseq.exporters.export import export

    ck = make_falcon_h1(tmp_path / "hf", seed=1, dtype=torch.bfloat16, shard="20KB")
    assert (ck / "model.safetensors.index.json").exists() and len(list(ck.glob("*.safetensors"))) > 2
    ids = random_ids(256, 24, seed=2)
    # loaded as float64: transformers' bf16 model computes its μP vector in bf16 (1.1 -> 1.1016, 1.6e-2
    # off in the logits), where the multipliers are the config's numbers
    ref = hf_logits64(load_hf(ck, torch.float64), ids)
    s = edgeseq.load(export(str(ck), str(tmp_path / "b"))).session()
    assert np.abs(s.prefill(ids) - ref[-1]).max() < 1e-4


def test_mobile_bundle(case_rest):
    """The mobile export (ORT format, standard ops, batch 1) steps to transformers' float64 logits."""
    import edgeseq
    from edgeseq.exporters.mobile import export_mobile

    c = case_rest
    s = edgeseq.load(export_mobile(str(c.ckpt), str(c.workdir / "mobile"))).session()
    got = np.array([s.step(i) for i in c.ids[:16]])
    assert np.abs(got - c.ref[:16]).max() < c.tol


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_bundles(case_mup, quant):
    """int8 / int4: the projections become MatMulNBits, head_expand (an exact 0/1 matrix) stays f32. On
    this tiny noisy model int8 moves the last logits by about 0.05, int4 by about 0.6 (logits' std 1.5):
    the int8 bound is a sanity bound, int4 only has to run."""
    import onnx

    c = case_mup
    bundle = c.bundle(False, quant=quant)
    m = onnx.load(str(bundle / "step.onnx"), load_external_data=False)
    quantized = {n.input[1] for n in m.graph.node if n.op_type == "MatMulNBits"}
    for n in ("in_proj", "out_proj", "q", "k", "v", "o", "gate", "up", "down"):
        assert any(q.startswith(f"layers.1.{n}") for q in quantized), (n, sorted(quantized))
    assert not any("head_expand" in q for q in quantized)
    got = c.model(False, quant=quant).session().prefill(c.ids[:40])
    assert np.isfinite(got).all()
    if quant == "int8":
        assert np.abs(got - c.ref[39]).max() < 0.3


# ---------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's falcon-h1
# ---------------------------------------------------------------------------------------------------

def _kv(reader) -> dict:
    """{key: (GGUF types, the value's bytes)} as gguf-py reads a file (a reader edgeseq did not write)."""
    return {f.name: ([int(x) for x in f.types], b"".join(p.tobytes() for p in f.parts[3:]))
            for f in reader.fields.values() if not f.name.startswith("GGUF.")}


# the converter's title-cased folder name and its size label; it names GPT-NeoX's tokenizer by its hash
# (`olmo`), edgeseq by its regex (`gpt-2`): llama.cpp splits text alike under both
DIFFERENT_VALUES = {"general.name", "general.size_label", "tokenizer.ggml.pre"}


def _neox_model(path, **cfg):
    """A Falcon-H1 checkpoint with GPT-NeoX's tokenizer.json (the converter writes gpt2 tokenizer keys)."""
    ck = make_falcon_h1(path, **{**cfg, "vocab_size": 50277, "num_hidden_layers": 2})
    write_neox_tokenizer(ck)
    return ck


@pytest.mark.slow
def test_same_file_as_llama_cpp_converter_and_both_engines_run_both(tmp_path):
    """The first conformance case with GPT-NeoX's vocabulary: edgeseq's GGUF equals the converter's (every
    key's type and value, every tensor's name, shape, type and values: the multipliers folded into the
    same tensors), llama.cpp runs edgeseq's file within 1e-3 of transformers' float64 logits (an f32 KV
    cache), and edgeseq runs the converter's file within 1e-4."""
    lc = llama_cpp()
    import edgeseq
    from gguf import GGUFReader

    from edgeseq.exporters.gguf_writer import export_gguf

    cfg = dict(CONFIGS["mup-gqa-groups2"])
    ck = _neox_model(tmp_path / "hf", seed=cfg.pop("seed"), **cfg)
    ours = tmp_path / "ours.gguf"
    info = export_gguf(str(ck), str(ours))
    assert info["architecture"] == "falcon-h1" and info["generic_because"] is None
    ref = convert(ck, tmp_path / "ref.gguf")
    a, b = GGUFReader(ours), GGUFReader(ref)
    ka, kb = _kv(a), _kv(b)
    assert set(ka) == set(kb)
    for k in kb:
        assert ka[k][0] == kb[k][0], k
        assert k in DIFFERENT_VALUES or ka[k][1] == kb[k][1], (k, a.fields[k].contents(), b.fields[k].contents())
    ta, tb = {x.name: x for x in a.tensors}, {x.name: x for x in b.tensors}
    assert set(ta) == set(tb)
    assert {"output.weight", "blk.0.ffn_norm", "blk.1.ssm_norm.weight", "blk.0.attn_k.weight"} <= set(tb)
    for n, x in tb.items():
        assert (list(ta[n].shape), ta[n].tensor_type) == (list(x.shape), x.tensor_type), n
        np.testing.assert_allclose(ta[n].data, x.data, rtol=1e-6, atol=1e-7, err_msg=n)
    prompt = random_ids(50277, 12, seed=4)
    want = hf_logits64(load_hf(ck), prompt)
    llm = lc.Llama(str(ours), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    llm.eval(prompt)
    np.testing.assert_allclose(np.array(llm.scores[:len(prompt)]), want, atol=1e-3, rtol=0)
    s = edgeseq.load(ref).session()
    got = np.array([s.step(t) for t in prompt])
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.slow
def test_llama_cpp_runs_tied_head_with_its_own_multiplier_and_no_mamba_norm(tmp_path):
    """A tied head whose lm_head_multiplier differs from embedding_multiplier, and no gated norm: the
    converter writes no output.weight, so llama.cpp scales the logits by the embedding's multiplier
    (measured 4.2 off transformers on such a model); edgeseq's file holds output.weight (the embedding ·
    lm_head_multiplier, not token_embd's embedding · embedding_multiplier) and no ssm_norm, and llama.cpp
    runs it within 1e-3; and both engines run its q4_0 file alike."""
    lc = llama_cpp()
    from edgeseq.exporters.gguf_writer import export_gguf

    ck = make_falcon_h1(tmp_path / "hf", seed=3, tie_word_embeddings=True, mamba_rms_norm=False, num_hidden_layers=2)
    ours = tmp_path / "ours.gguf"
    assert export_gguf(str(ck), str(ours))["architecture"] == "falcon-h1"
    from gguf import GGUFReader

    ts = {x.name: x for x in GGUFReader(ours).tensors}
    assert "blk.0.ssm_norm.weight" not in ts
    np.testing.assert_allclose(ts["output.weight"].data * 1.3, ts["token_embd.weight"].data * 0.7, rtol=1e-5)
    prompt = random_ids(256, 10, seed=5)
    want = hf_logits64(load_hf(ck), prompt)

    def run(path):
        llm = lc.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
        llm.eval(prompt)
        return np.array(llm.scores[:len(prompt)])

    np.testing.assert_allclose(run(ours), want, atol=1e-3, rtol=0)
    # q4_0: both engines on one quantized file (llama.cpp also rounds the activations to 8 bits: measured
    # 0.11 apart on the file-to-file test's model with GPT-NeoX's vocabulary, each 3.0 from the float64
    # logits, std 1.2; q8_0: 0.09 apart, each 0.2 from them)
    import edgeseq

    q = tmp_path / "q4_0.gguf"
    assert export_gguf(str(ck), str(q), quant="q4_0")["architecture"] == "falcon-h1"
    s = edgeseq.load(q).session()
    assert np.abs(run(q) - np.array([s.step(i) for i in prompt])).max() < 0.3


def test_what_llama_cpp_cannot_run_is_generic_gguf(case_rest, tmp_path):
    """The norm before the gate, biases and a dt clip are beyond llama.cpp's falcon-h1: the GGUF is
    edgeseq's generic one, saying why, and edgeseq runs it to the reference."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    c = case_rest
    info = export_gguf(str(c.ckpt), str(tmp_path / "m.gguf"))
    assert info["architecture"] == "edgeseq-falcon_h1" and "biases" in info["generic_because"]
    s = edgeseq.load(tmp_path / "m.gguf").session()
    assert np.abs(s.prefill(c.ids[:40]) - c.ref[39]).max() < c.tol


@pytest.mark.parametrize("edit, reason", [
    (dict(mamba_norm_before_gate=True), "mamba_norm_before_gate"),
    (dict(time_step_limit=[0.01, 5.0]), "time_step_limit"),
])
def test_gguf_supports(case_mup, tmp_path, edit, reason):
    """What llama.cpp's falcon-h1 computes otherwise (measured: the norm before the gate 4.2 off
    transformers) or lacks (the dt clip) makes the GGUF generic, naming the config key."""
    ck = tmp_path / "hf"
    shutil.copytree(case_mup.ckpt, ck)
    assert FalconH1.gguf.supports(FalconH1(FalconH1.read_config(Checkpoint(str(ck))))) is None
    _edit_config(ck, **edit)
    assert reason in FalconH1.gguf.supports(FalconH1(FalconH1.read_config(Checkpoint(str(ck)))))


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

def _edit_config(path, **kw):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(kw)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, error, message", [
    (dict(hidden_act="gelu"), UnsupportedError, "hidden_act 'gelu'"),
    (dict(mamba_use_mlp=False), UnsupportedError, "mamba_use_mlp"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), UnsupportedError, "rope_type 'yarn'"),
    (dict(ssm_multipliers=[1.0, 2.0]), EdgeseqError, "ssm_multipliers must be a list of 5"),
    (dict(key_multiplier="big"), EdgeseqError, "key_multiplier must be a number"),
    (dict(mamba_d_ssm=64), EdgeseqError, "mamba_d_ssm 64"),
    (dict(num_attention_heads=3), EdgeseqError, "num_attention_heads"),
])
def test_unsupported_config(case_mup, tmp_path, edit, error, message):
    ck = tmp_path / "hf"
    shutil.copytree(case_mup.ckpt, ck)
    _edit_config(ck, **edit)
    with pytest.raises(error, match=message) as e:
        FalconH1.read_config(Checkpoint(str(ck)))
    assert "config.json" in str(e.value) or str(ck) in str(e.value)


def test_cli_error_is_one_line_and_writes_nothing(case_mup, tmp_path):
    ck = tmp_path / "hf"
    shutil.copytree(case_mup.ckpt, ck)
    _edit_config(ck, ssm_multipliers=[1.0, "x", 1.0, 1.0, 1.0])
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-m", "edgeseq", "export", str(ck), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0], lines
    assert "ssm_multipliers" in lines[0]
    assert not out.exists()


def test_config_defaults_as_transformers(case_mup, tmp_path):
    """Keys a config.json may leave out get transformers' defaults: RoPE theta 10000 (FalconH1Config's
    rope_parameters), mamba_rms_norm false, the norm before the gate, multipliers 1."""
    from transformers import FalconH1Config

    ck = tmp_path / "hf"
    shutil.copytree(case_mup.ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    for k in ("rope_parameters", "mamba_rms_norm", "mamba_norm_before_gate", "key_multiplier", "ssm_multipliers"):
        cfg.pop(k)
    (ck / "config.json").write_text(json.dumps(cfg))
    hc = FalconH1Config.from_pretrained(ck)
    c = FalconH1.read_config(Checkpoint(str(ck)))
    assert c.rope_theta == hc.rope_parameters["rope_theta"] == 10000.0
    assert (c.mamba_norm, c.norm_before_gate) == (hc.mamba_rms_norm, hc.mamba_norm_before_gate) == (False, True)
    assert c.key_multiplier == hc.key_multiplier == 1.0 and c.ssm_multipliers == list(hc.ssm_multipliers)
