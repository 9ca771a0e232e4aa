"""Bamba and Granite-4.0-H: what is special to them: more variants against transformers' float64 logits,
transformers' in-memory expert names, the routing, int4's f32 routers, the mobile bundle, GGUF (edgeseq's
file against what llama.cpp's converter writes, llama.cpp running edgeseq's file, edgeseq running the
converter's), and clear errors for what is unsupported. The common checks run over
tests/family_granite_hybrid.py's cases in tests/test_conformance.py."""
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
from conftest import as_f64, hf_logits64, load_hf, random_ids
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.granite_hybrid import GraniteHybrid, permute_rows
from family_granite_hybrid import CONFIGS, A, M, build_granite, make_granite
from families import mistral_v1
from gguf_helpers import convert, llama_cpp

# logits only: each varies what the conformance cases keep fixed
VARIANTS = {
    # Bamba: attention first (MQA), tied head, no conv bias, Mamba in/out projection biases, d_state 16,
    # conv width 3
    "bamba-mqa-tied-proj-bias": ("bamba", dict(attn_layer_indices=[0, 2], num_key_value_heads=1,
                                               tie_word_embeddings=True, mamba_conv_bias=False,
                                               mamba_proj_bias=True, mamba_d_state=16, mamba_d_conv=3, seed=4)),
    # Granite: top 1 of 3 experts, two attention layers in a row with RoPE (theta 1e6), 2 groups, 8 Mamba
    # heads of 8, dt clamped to at most 0.5 (time_step_limit)
    "moe-top1-of-3-groups2-dt-limit": ("granite", dict(
        num_hidden_layers=5, layer_types=[M, A, A, M, M], num_local_experts=3, num_experts_per_tok=1,
        position_embedding_type="rope", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        mamba_n_groups=2, mamba_n_heads=8, mamba_d_head=8, time_step_limit=(0.0, 0.5), attention_multiplier=0.25,
        seed=5)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    return build_granite(request.param, tmp_path_factory.mktemp("gh-" + request.param), VARIANTS[request.param])


def test_variant_logits(variant):
    """Prefill of every position (fused flavour) and steps (portable) against transformers in float64."""
    c = GraniteHybrid.read_config(Checkpoint(str(variant.ckpt)))
    hc = variant.hf.config
    assert c.attn_layers == [i for i, x in enumerate(hc.layers_block_type) if x == "full_attention"]
    assert c.bamba == (hc.model_type == "bamba") and c.conv_bias == hc.mamba_conv_bias
    s = variant.model(False).session()
    assert np.abs(s.prefill(variant.ids[:40]) - variant.ref[39]).max() < variant.tol
    s = variant.model(True).session()
    got = np.array([s.step(i) for i in variant.ids[:24]])
    assert np.abs(got - variant.ref[:24]).max() < variant.tol


@pytest.fixture(scope="module")
def moe_case(tmp_path_factory):
    return families.built("granite_hybrid/moe-top2-of-4-untied", tmp_path_factory)


def test_routing_and_multipliers_matter(moe_case):
    """The MoE case's float64 reference changes when every chosen expert is weighed alike, and when the
    multipliers are 1: logits within 1e-4 of it check the softmax over the top k and each multiplier."""
    import transformers.models.granitemoehybrid.modeling_granitemoehybrid as modeling

    c = moe_case
    saved = modeling.GraniteMoeHybridTopKRouter.forward

    def uniform(self, hidden_states):
        logits, w, chosen = saved(self, hidden_states)
        return logits, torch.full_like(w, 1.0 / w.shape[-1]), chosen

    modeling.GraniteMoeHybridTopKRouter.forward = uniform
    try:
        assert np.abs(hf_logits64(c.hf64, c.ids) - c.ref).max() > 0.05
    finally:
        modeling.GraniteMoeHybridTopKRouter.forward = saved
    cfg = GraniteHybrid.read_config(Checkpoint(str(c.ckpt)))
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier, cfg.logits_scaling) == (
        1.5, 0.8, 0.3, 1.3)
    assert cfg.rope and cfg.n_experts == 4 and cfg.top_k == 2 and not cfg.tie_embeddings


def test_in_memory_expert_names(moe_case, tmp_path):
    """Experts and router as transformers names them in memory (experts.gate_up_proj, experts.down_proj,
    router.weight) convert to the same weights as the names save_pretrained and the hub write
    (input_linear, output_linear, router.layer)."""
    from safetensors.numpy import load_file, save_file

    c = moe_case
    ck = tmp_path / "renamed"
    shutil.copytree(c.ckpt, ck)
    sd = load_file(str(ck / "model.safetensors"))
    renames = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.gate_up_proj",
               "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.down_proj",
               "block_sparse_moe.router.layer.weight": "block_sparse_moe.router.weight"}
    n = 0
    for k in list(sd):
        for old, new in renames.items():
            if k.endswith(old):
                sd[k[:-len(old)] + new] = sd.pop(k)
                n += 1
    assert n == 3 * 4
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    fam = GraniteHybrid(GraniteHybrid.read_config(Checkpoint(str(c.ckpt))))
    want, got = dict(fam.convert(Checkpoint(str(c.ckpt)))), dict(fam.convert(Checkpoint(str(ck))))
    assert set(got) == set(want) and "layers.0.experts_gate" in got and "layers.0.shared_gate" in got
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_sharded_bf16_checkpoint(tmp_path):
    """bf16 weights in several safetensors shards (an index file), as released checkpoints come."""
    import edgeseq
    from edgeseq.exporters.export import export

    kind, cfg = CONFIGS["dense-multipliers-nope"]
    ck = make_granite(tmp_path / "hf", kind, dtype=torch.bfloat16, shard="20KB", **dict(cfg, seed=2))
    assert (ck / "model.safetensors.index.json").exists() and len(list(ck.glob("*.safetensors"))) > 2
    ids = random_ids(256, 24, seed=2)
    ref = hf_logits64(as_f64(load_hf(ck)), ids)
    s = edgeseq.load(export(str(ck), str(tmp_path / "b"))).session()
    assert np.abs(s.prefill(ids) - ref[-1]).max() < 1e-4


def test_mobile_bundle(moe_case):
    """The mobile export (ORT format, standard ops, batch 1) steps to transformers' float64 logits."""
    import edgeseq
    from edgeseq.exporters.mobile import export_mobile

    c = moe_case
    s = edgeseq.load(export_mobile(str(c.ckpt), str(c.workdir / "mobile"))).session()
    got = np.array([s.step(i) for i in c.ids[:16]])
    assert np.abs(got - c.ref[:16]).max() < c.tol


def test_router_stays_f32_under_int4(tmp_path, monkeypatch):
    """The routers stay f32 under int4 (as llama.cpp's converter keeps ffn_gate_inp f32; a 4-bit router
    flips routes: see lfm2_moe and jamba); the experts and the shared MLP go 4-bit. Without the policy
    the router (16 experts of d 64: large enough to quantize) would go 4-bit too."""
    from edgeseq.exporters.export import export
    from edgeseq.families.base import Family

    ck = make_granite(tmp_path / "hf", "granite", seed=5, hidden_size=64, num_local_experts=16, intermediate_size=32,
                      mamba_n_heads=8)

    def quantized(out):
        path = Path(export(str(ck), str(tmp_path / out), quant="int4"))
        return json.loads((path / "edgeseq.json").read_text())["quant"]["tensors"]

    q = quantized("int4")
    assert "layers.0.router" not in q and "layers.1.router" not in q, sorted(q)
    assert q["layers.0.experts_up"]["bits"] == 4 and q["layers.0.shared_gate"]["bits"] == 4
    monkeypatch.setattr(GraniteHybrid, "quant_policy", Family.quant_policy)
    assert quantized("int4-plain")["layers.0.router"]["bits"] == 4


@pytest.mark.parametrize("quant", ["int8", "int4", "q8_0"])
def test_quantized(moe_case, quant, tmp_path):
    """int8 / int4 bundles put the experts, the shared MLP, the Mamba and attention projections in
    MatMulNBits; q8_0 GGUF runs in edgeseq. On this tiny noisy model (d 32, logits' std 1.2) int8 moves the
    last logits by 0.12, q8_0 by 0.34 (a block is a whole row), int4 by 1.2: the bound is a sanity bound
    for the 8-bit ones."""
    import edgeseq
    import onnx

    c = moe_case
    if quant.startswith("q"):
        from edgeseq.exporters.gguf_writer import export_gguf

        export_gguf(str(c.ckpt), str(tmp_path / "m.gguf"), quant=quant)
        got = edgeseq.load(tmp_path / "m.gguf").session().prefill(c.ids[:40])
        assert np.abs(got - c.ref[39]).max() < 0.5
        return
    m = onnx.load(str(c.bundle(False, quant=quant) / "prefill.onnx"), load_external_data=False)
    q = {n.input[1] for n in m.graph.node if n.op_type == "MatMulNBits"}
    for w in ("layers.0.experts_gate", "layers.0.shared_up", "layers.0.in_proj", "layers.1.q", "layers.3.out_proj"):
        assert any(w in x for x in q), (w, sorted(q))
    if quant == "int8":
        got = c.model(False, quant=quant).session().prefill(c.ids[:40])
        assert np.abs(got - c.ref[39]).max() < 0.5


# ---------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's granitehybrid
# ---------------------------------------------------------------------------------------------------

def _kv(reader) -> dict:
    """{key: (GGUF types, the value's bytes)} as gguf-py reads a file (a reader edgeseq did not write)."""
    return {f.name: ([int(x) for x in f.types], b"".join(p.tobytes() for p in f.parts[3:]))
            for f in reader.fields.values() if not f.name.startswith("GGUF.")}


# the converter title-cases the folder name, and labels an MoE's size "{E}x{per expert}"
# (exporters/gguf_writer.py writes the total)
DIFFERENT_VALUES = {"general.name", "general.size_label"}
# what edgeseq writes otherwise, and why (the test checks these are the only differences):
FIXES = {
    # without experts the converter writes transformers' default num_experts_per_tok (2) beside an
    # expert_count of 0, on which llama.cpp aborts the process; and feed_forward_length = intermediate_size
    # (the experts' width) where llama.cpp sizes the dense MLP by it: edgeseq writes 0 and the shared width
    "dense": {"granitehybrid.expert_used_count": 0, "granitehybrid.feed_forward_length": 40},
    "moe": {},
    # Bamba: q/k permuted on the rotary half of each head only (below), marked so that a reader tells it
    # from the converter's whole-head permutation
    "bamba": {"granitehybrid.edgeseq.rope_rotary_permute": True},
}
GGUF_CASES = {  # hub-like configs: layer_types as the hub spells them, Bamba's attn_rotary_emb
    "moe": ("granite", dict(CONFIGS["moe-top2-of-4-untied"][1], position_embedding_type=None)),
    "dense": CONFIGS["dense-multipliers-nope"],
    "bamba": ("bamba", dict(CONFIGS["bamba"][1], attn_rotary_emb=4)),
}


def _hub_checkpoint(tmp_path, name):
    """A 32000-token checkpoint with Mistral's tokenizer.model, its float64 reference on 12 ids, and its
    config.json as the hub writes layer_types (mamba / attention: the converter looks for "attention")."""
    kind, cfg = GGUF_CASES[name]
    cfg = dict(cfg)
    ck = make_granite(tmp_path / "hf", kind, seed=cfg.pop("seed", 3), **{**cfg, "vocab_size": 32000})
    shutil.copyfile(mistral_v1(), ck / "tokenizer.model")
    hf = load_hf(ck)
    if hasattr(hf, "set_experts_implementation"):
        hf.set_experts_implementation("eager")
    prompt = random_ids(32000, 12, seed=4)
    want = hf_logits64(as_f64(hf), prompt)
    c = json.loads((ck / "config.json").read_text())
    if "layer_types" in c:
        c["layer_types"] = [A if x == "full_attention" else M for x in c["layer_types"]]
    (ck / "config.json").write_text(json.dumps(c))
    return ck, prompt, want


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_same_file_as_llama_cpp_converter_and_both_engines_run_it(tmp_path, name):
    """edgeseq's GGUF equals the converter's (every key's type and value but FIXES, every tensor's name,
    shape, type and values: q/k permuted, experts stacked, the shared MLP as ffn_*_shexp or ffn_*);
    edgeseq runs the converter's file within 1e-4 of transformers' float64 logits, and llama.cpp runs
    edgeseq's within 1e-3 (an f32 KV cache); the converter's Bamba file it runs right at position 0 only."""
    lc = llama_cpp()
    if not mistral_v1():
        pytest.skip("mistral_common's tokenizer.model.v1 (a SentencePiece model the converter reads) is missing")
    import edgeseq
    from gguf import GGUFReader

    from edgeseq.exporters.gguf_writer import export_gguf

    ck, prompt, want = _hub_checkpoint(tmp_path, name)
    ours = tmp_path / "ours.gguf"
    info = export_gguf(str(ck), str(ours))
    assert info["architecture"] == "granitehybrid" and info["generic_because"] is None
    ref = convert(ck, tmp_path / "ref.gguf")
    a, b = GGUFReader(ours), GGUFReader(ref)
    ka, kb = _kv(a), _kv(b)
    assert set(ka) - set(kb) == {k for k in FIXES[name] if k.startswith("granitehybrid.edgeseq.")}
    assert set(kb) <= set(ka)
    for k in FIXES[name]:
        if k not in kb:
            assert a.fields[k].contents() == FIXES[name][k], k
    for k in kb:
        assert ka[k][0] == kb[k][0], k
        if k in FIXES[name]:
            assert a.fields[k].contents() == FIXES[name][k] != b.fields[k].contents(), k
        else:
            assert k in DIFFERENT_VALUES or ka[k][1] == kb[k][1], (k, a.fields[k].contents(), b.fields[k].contents())
    ta, tb = {x.name: x for x in a.tensors}, {x.name: x for x in b.tensors}
    assert set(ta) == set(tb)
    hc = load_hf(ck).config
    for n, x in tb.items():
        assert (list(ta[n].shape), ta[n].tensor_type) == (list(x.shape), x.tensor_type), n
        if name == "bamba" and n.endswith(("attn_q.weight", "attn_k.weight")):
            # the same weights, in other row orders: undone, each file gives transformers' q/k
            heads = hc.num_attention_heads if "attn_q" in n else hc.num_key_value_heads
            hd = hc.hidden_size // hc.num_attention_heads
            assert not np.array_equal(ta[n].data, x.data), n
            np.testing.assert_array_equal(permute_rows(heads, hd // 2).dec(np.array(ta[n].data)),
                                          permute_rows(heads).dec(np.array(x.data)), err_msg=n)
        else:
            np.testing.assert_allclose(ta[n].data, x.data, rtol=1e-6, atol=1e-7, err_msg=n)
    s = edgeseq.load(ref).session()
    assert np.abs(np.array([s.step(t) for t in prompt]) - want).max() < 1e-4
    for path in (ours, ref) if name == "bamba" else (ours,):
        llm = lc.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
        llm.eval(prompt)
        err = np.abs(np.array(llm.scores[:len(prompt)]) - want).max(-1)
        if path == ours:
            assert err.max() < 1e-3, err
        else:
            # the converter's Bamba file in llama.cpp: its whole-head permutation makes llama.cpp rotate
            # the pairs (j, j + hd/2), j < hd/4, where transformers rotates (j, j + hd/4): right where RoPE
            # is the identity (position 0) only. edgeseq runs that file right (above).
            assert err[0] < 1e-3 and err[1:].max() > 0.05, err


@pytest.mark.slow
def test_granite_rope_runs_in_llama_cpp(tmp_path):
    """A Granite with position_embedding_type rope: edgeseq's file sets rope.scaling.finetuned (llama.cpp's
    switch for RoPE in granitehybrid) and llama.cpp runs it within 1e-3; the converter sets it for Bamba
    only, so its file of this checkpoint would run without RoPE."""
    lc = llama_cpp()
    if not mistral_v1():
        pytest.skip("mistral_common's tokenizer.model.v1 is missing")
    from gguf import GGUFReader

    from edgeseq.exporters.gguf_writer import export_gguf

    GGUF_CASES["moe-rope"] = CONFIGS["moe-top2-of-4-untied"]
    try:
        ck, prompt, want = _hub_checkpoint(tmp_path, "moe-rope")
    finally:
        del GGUF_CASES["moe-rope"]
    ours = tmp_path / "ours.gguf"
    export_gguf(str(ck), str(ours))
    assert GGUFReader(ours).fields["granitehybrid.rope.scaling.finetuned"].contents() is True
    llm = lc.Llama(str(ours), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    llm.eval(prompt)
    assert np.abs(np.array(llm.scores[:len(prompt)]) - want).max() < 1e-3


def test_gguf_read_back_config(moe_case, tmp_path):
    """edgeseq reads back the granitehybrid file it writes to the same config (layer pattern from
    head_count_kv, multipliers from the scales, RoPE from rope.scaling.finetuned)."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    export_gguf(str(moe_case.ckpt), str(tmp_path / "m.gguf"))
    got = edgeseq.load(tmp_path / "m.gguf").manifest["config"]
    want = GraniteHybrid(GraniteHybrid.read_config(Checkpoint(str(moe_case.ckpt)))).config_json()
    for k in ("attn_layers", "n_experts", "top_k", "expert_dim", "ffn_dim", "rope", "rotary_dim", "ssm_heads",
              "n_groups", "d_state", "embedding_multiplier", "residual_multiplier", "logits_scaling", "bamba"):
        assert got[k] == pytest.approx(want[k]), k
    assert got["attention_multiplier"] == pytest.approx(want["attention_multiplier"])


def test_what_llama_cpp_cannot_run_is_generic_gguf(variant, tmp_path):
    """llama.cpp's granitehybrid has no Mamba projection biases, needs the conv bias and does not clamp dt:
    such checkpoints are written as edgeseq's generic GGUF, saying why."""
    from edgeseq.exporters.gguf_writer import export_gguf

    info = export_gguf(str(variant.ckpt), str(tmp_path / "m.gguf"))
    assert info["architecture"] == "edgeseq-granite_hybrid"
    assert ("mamba_proj_bias" if variant.name.startswith("bamba") else "time_step_limit") in info["generic_because"]


def test_all_mamba_model_is_generic_gguf(tmp_path):
    """No attention layer: llama.cpp's granitehybrid aborts the process on such a file (its KV cache is
    empty; tried with this edgeseq's file), so edgeseq writes its generic GGUF, saying why, and runs it."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    ck = make_granite(tmp_path / "hf", "granite", seed=6, layer_types=[M] * 3, num_hidden_layers=3)
    info = export_gguf(str(ck), str(tmp_path / "m.gguf"))
    assert info["architecture"] == "edgeseq-granite_hybrid" and "without attention layers" in info["generic_because"]
    ids = random_ids(256, 16, seed=3)
    want = hf_logits64(as_f64(load_hf(ck)), ids)
    assert np.abs(edgeseq.load(tmp_path / "m.gguf").session().prefill(ids) - want[-1]).max() < 1e-4


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
    return make_granite(tmp_path_factory.mktemp("gh-plain") / "hf", "granite", seed=1, num_local_experts=4)


@pytest.mark.parametrize("edit, error, message", [
    (dict(hidden_act="gelu"), UnsupportedError, "hidden_act 'gelu'"),
    (dict(head_dim=16), UnsupportedError, "head_dim 16"),
    (dict(attention_bias=True), UnsupportedError, "attention_bias"),
    (dict(position_embedding_type="alibi"), UnsupportedError, "position_embedding_type 'alibi'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), UnsupportedError, "only the default RoPE"),
    (dict(num_experts_per_tok=5), UnsupportedError, "num_experts_per_tok 5"),
    (dict(layer_types=[A, A, A, A]), UnsupportedError, "no Mamba layer"),
    (dict(layer_types=[M, M]), UnsupportedError, "layer_types must list"),
    (dict(layer_types=[A, M, M, M]), EdgeseqError, "the weights lack"),  # the weights follow another pattern
    (dict(embedding_multiplier="big"), EdgeseqError, "embedding_multiplier 'big'"),
    (dict(time_step_limit=[0.0]), EdgeseqError, "time_step_limit"),
])
def test_unsupported_config(plain_ckpt, tmp_path, edit, error, message):
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    _edit_config(ck, **edit)
    with pytest.raises(error, match=message) as e:
        GraniteHybrid.read_config(Checkpoint(str(ck)))
    assert "config.json" in str(e.value) or str(ck) in str(e.value)


def test_hub_layer_type_names(plain_ckpt, tmp_path):
    """The hub's configs spell the layer types mamba / attention (transformers 5.25 saves linear_attention /
    full_attention); both read to the same layers, and a Granite config without layer_types is all Mamba
    (transformers' default), which these weights (attention on layer 1) contradict."""
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    _edit_config(ck, layer_types=[M, A, M, M])
    assert GraniteHybrid.read_config(Checkpoint(str(ck))).attn_layers == [1]
    assert GraniteHybrid.read_config(Checkpoint(str(plain_ckpt))).attn_layers == [1]
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["layer_types"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeseqError, match="the weights lack"):
        GraniteHybrid.read_config(Checkpoint(str(ck)))


def test_cli_error_is_one_line_and_writes_nothing(plain_ckpt, tmp_path):
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    _edit_config(ck, position_embedding_type="alibi")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-m", "edgeseq", "export", str(ck), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0], lines
    assert "position_embedding_type" in lines[0] and not out.exists()
