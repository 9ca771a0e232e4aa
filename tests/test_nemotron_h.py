"""What is special to Nemotron-H (the conformance suite runs the common checks over tests/family_nemotron_h.py's
cases): more layer patterns and options checked against transformers in float64, the checkpoint layouts,
GGUF against llama.cpp's own converter file to file and in llama.cpp, and clear errors for what is not
supported."""
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
from edgeseq.families.nemotron_h import NemotronH, NemotronHMoe, permute_rows
from family_nemotron_h import CONFIGS, build_nemotron_h, make_nemotron_h
from families import built
from gguf_helpers import convert, llama_cpp, write_neox_tokenizer

MOE_CASE = "nemotron_h/ME*EME-moe-untied"
L, M, A, E = "mlp", "linear_attention", "full_attention", "moe"
# logits only: each varies what the conformance cases keep fixed
VARIANTS = {
    # attention first, MHA with head dim 16 (!= d / H), Mamba in/out projection biases (use_bias), no conv
    # bias, four groups of B/C, dt clipped to time_step_limit (0.02, 0.3), untied head
    "*M-M-bias-clip-mha": dict(hybrid_override_pattern="*M-M", num_key_value_heads=4, head_dim=16, use_bias=True,
                               use_conv_bias=False, n_groups=4, time_step_limit=(0.02, 0.3), seed=5),
    # the pattern as a layers_block_type list; top 3 of 6 experts, not renormalised, routed scaling 0.5,
    # two expert groups both chosen (n_group 2, topk_group 2: plain top k), a wider shared expert
    "MEM*E-top3-of-6-groups": dict(layers_block_type=[M, E, M, A, E], n_routed_experts=6, num_experts_per_tok=3,
                                   norm_topk_prob=False, routed_scaling_factor=0.5, n_group=2, topk_group=2,
                                   moe_shared_expert_intermediate_size=40, seed=7),
    # dense MLP and MoE blocks in one model (llama.cpp's nemotron_h_moe cannot express it: generic GGUF)
    "M-E*-mixed": dict(hybrid_override_pattern="M-E*", seed=9),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    return build_nemotron_h(request.param, tmp_path_factory.mktemp("nemotron_h-v"), VARIANTS[request.param])


@pytest.fixture(scope="module")
def moe_case(tmp_path_factory):
    return built(MOE_CASE, tmp_path_factory)


def test_variant_logits(variant):
    """Prefill of every position (fused flavour) and steps (portable) against transformers in float64."""
    c = NemotronH.read_config(Checkpoint(str(variant.ckpt)))
    hc = variant.hf.config
    assert c.pattern == hc.hybrid_override_pattern
    assert (c.proj_bias, c.conv_bias) == (hc.use_bias, hc.use_conv_bias)
    s = variant.model(False).session()
    assert np.abs(s.prefill(variant.ids[:40]) - variant.ref[39]).max() < variant.tol
    s = variant.model(True).session()
    got = np.array([s.step(i) for i in variant.ids[:24]])
    assert np.abs(got - variant.ref[:24]).max() < variant.tol


def test_pattern_and_options_read(variant):
    c = NemotronH.read_config(Checkpoint(str(variant.ckpt)))
    if variant.name.startswith("*M-M"):
        assert (c.dt_min, c.dt_max, c.head_dim, c.kv_heads, c.n_groups) == (0.02, 0.3, 16, 4, 4)
    elif variant.name.startswith("MEM*E"):
        assert (c.pattern, c.n_experts, c.top_k, c.norm_topk, c.routed_scaling, c.n_group, c.shared_dim) == (
            "MEM*E", 6, 3, False, 0.5, 2, 40)
    assert type(NemotronH(c)) is (NemotronHMoe if "E" in c.pattern else NemotronH)


def test_routing_matters(moe_case):
    """The correction bias changes which experts are chosen on the test ids (so the MoE case checks the
    choice, not only the weights): with it zeroed transformers' logits move."""
    hf = as_f64(load_hf(moe_case.ckpt))
    hf.set_experts_implementation("eager")
    with torch.no_grad():
        for layer in hf.model.layers:
            if hasattr(layer.mixer, "gate"):
                layer.mixer.gate.e_score_correction_bias.zero_()
    assert np.abs(hf_logits64(hf, moe_case.ids) - moe_case.ref).max() > 1e-2


def test_fused_expert_layout(moe_case, tmp_path):
    """transformers' in-memory layout (fused 3-D experts.up_proj (E, f, d) / down_proj (E, d, f)) under
    the `model.` prefix converts to the same canonical weights as the saved per-expert `backbone.` names."""
    from safetensors.numpy import load_file, save_file

    ck = tmp_path / "fused"
    shutil.copytree(moe_case.ckpt, ck)
    w = load_file(str(ck / "model.safetensors"))
    out = {}
    for n, a in w.items():
        if ".experts." in n:
            continue
        out[n.replace("backbone.", "model.", 1)] = a
    for i in range(6):
        p = f"backbone.layers.{i}.mixer.experts."
        if p + "0.up_proj.weight" in w:
            for kind in ("up_proj", "down_proj"):
                out[f"model.layers.{i}.mixer.experts.{kind}"] = np.stack([w[f"{p}{e}.{kind}.weight"] for e in range(4)])
    save_file(out, str(ck / "model.safetensors"))
    fam = NemotronH(NemotronH.read_config(Checkpoint(str(moe_case.ckpt))))
    want = dict(fam.convert(Checkpoint(str(moe_case.ckpt))))
    got = dict(fam.convert(Checkpoint(str(ck))))
    assert set(got) == set(want) and "layers.1.experts_up" in got
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def test_sharded_bf16_checkpoint(tmp_path):
    """bf16 weights in several safetensors shards (an index file), as released checkpoints come; every
    block kind."""
    from safetensors import safe_open

    import edgeseq
    from edgeseq.exporters.export import export

    ck = make_nemotron_h(tmp_path / "hf", seed=4, dtype=torch.bfloat16, shard="30KB", hybrid_override_pattern="ME*-")
    shards = sorted(ck.glob("*.safetensors"))
    assert (ck / "model.safetensors.index.json").exists() and len(shards) > 2
    dtypes = {}
    for f in shards:
        with safe_open(str(f), "pt") as h:
            dtypes.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    assert dtypes["backbone.layers.1.mixer.experts.0.up_proj.weight"] == dtypes["backbone.embeddings.weight"] == "BF16"
    hf = load_hf(ck)
    hf.set_experts_implementation("eager")
    hf64 = as_f64(hf)
    ids = random_ids(256, 24, seed=2)
    from family_nemotron_h import MARGIN, routing_margin

    assert routing_margin(hf64, ids) > MARGIN
    ref = hf_logits64(hf64, ids)
    s = edgeseq.load(export(str(ck), str(tmp_path / "b")), max_context=64).session()
    assert np.abs(s.prefill(ids) - ref[-1]).max() < 1e-4


def test_permute_rows_round_trip():
    a = np.random.default_rng(0).standard_normal((32, 4 * 12)).astype(np.float32)
    c = permute_rows(4)
    assert not np.array_equal(c.enc(a), a.T)
    np.testing.assert_array_equal(c.dec(c.enc(a)), a)


def test_mobile_bundle_and_int4_router(moe_case, tmp_path):
    """The mobile (portable, batch 1, .ort) bundle runs to the reference; int4 keeps the routers f32."""
    import edgeseq
    import onnx
    from edgeseq.exporters.export import export
    from edgeseq.exporters.mobile import export_mobile

    out = tmp_path / "mobile"
    export_mobile(str(moe_case.ckpt), str(out))
    s = edgeseq.load(str(out), max_context=64).session()
    got = np.array([s.step(t) for t in moe_case.ids[:8]])
    assert np.abs(got - moe_case.ref[:8]).max() < moe_case.tol
    q = tmp_path / "int4"
    export(str(moe_case.ckpt), str(q), quant="int4")
    g = onnx.load(str(q / "step.onnx"), load_external_data=False)
    inits = {i.name for i in g.graph.initializer}
    assert "layers.1.router" in inits and not any(n.startswith("layers.1.router") and n != "layers.1.router"
                                                  for n in inits)
    assert any(n.startswith("layers.1.experts_up") and n != "layers.1.experts_up" for n in inits)  # quantized


# ---------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------

DIFFERENT_VALUES = {"general.name", "tokenizer.ggml.pre"}  # the folder's name; the NeoX pre-tokenizer's
# name (the converter finds "olmo" by its hash table, edgeseq "gpt-2" from tokenizer.json: the same regex)


def _neox_checkpoint(tmp_path, name, **over):
    cfg = dict(CONFIGS[name])
    seed = cfg.pop("seed", 3)
    ck = make_nemotron_h(tmp_path / "hf", seed=seed, **{**cfg, "tie": False, "vocab_size": 50280, **over})
    assert write_neox_tokenizer(ck) <= 50280  # the converter pads the vocabulary to a multiple of 8
    return ck


def _kv(r):
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.slow
def test_moe_same_file_as_llama_cpp_converter_and_llama_cpp_runs_it(tmp_path):
    """The MoE case (M, *, E blocks; untied): edgeseq's GGUF equals the converter's (every key's type and
    value, the architecture's keys in the converter's order; every tensor's name, shape, type and values, q and k rows permuted as the converter
    does), and llama.cpp runs edgeseq's file within 1e-3 of transformers in float64."""
    lc = llama_cpp()
    from gguf import GGUFReader

    from edgeseq.exporters.gguf_writer import export_gguf

    ck = _neox_checkpoint(tmp_path, "ME*EME-moe-untied")
    ours = tmp_path / "ours.gguf"
    info = export_gguf(str(ck), str(ours))
    assert info["architecture"] == "nemotron_h_moe" and info["generic_because"] is None
    ref = convert(ck, tmp_path / "ref.gguf")
    a, b = GGUFReader(ours), GGUFReader(ref)
    ka, kb = _kv(a), _kv(b)
    assert set(ka) == set(kb)
    arch = [k for k in kb if k.startswith("nemotron_h_moe.")]
    assert [k for k in ka if k.startswith("nemotron_h_moe.")] == arch  # (general.* come where the writer puts them)
    for k in kb:
        assert ka[k][0] == kb[k][0], k
        assert k in DIFFERENT_VALUES or ka[k][1] == kb[k][1], (k, ka[k][1], kb[k][1])
    assert kb["nemotron_h_moe.feed_forward_length"][1] == [0, 16, 0, 16, 0, 16]
    ta, tb = {x.name: x for x in a.tensors}, {x.name: x for x in b.tensors}
    assert set(ta) == set(tb)
    assert {"blk.1.ffn_up_exps.weight", "blk.1.exp_probs_b.bias", "blk.1.ffn_up_shexp.weight", "blk.2.attn_q.weight",
            "blk.0.ssm_norm.weight", "output.weight"} <= set(tb)
    for n, x in tb.items():
        assert (list(ta[n].shape), ta[n].tensor_type) == (list(x.shape), x.tensor_type), n
        np.testing.assert_allclose(ta[n].data, x.data, rtol=1e-6, atol=1e-7, err_msg=n)
    prompt = random_ids(50280, 12, seed=4)
    hf = load_hf(ck)
    hf.set_experts_implementation("eager")
    want = hf_logits64(as_f64(hf), prompt)
    llm = lc.Llama(str(ours), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    llm.eval(prompt)
    assert np.abs(np.array(llm.scores[:len(prompt)]) - want).max() < 1e-3


def test_dense_gguf_is_nemotron_h_and_llama_cpp_runs_it(tmp_path):
    """A dense model (M, *, - blocks, byte vocabulary): edgeseq writes llama.cpp's nemotron_h (MLP widths
    per layer in feed_forward_length, no expert keys), which llama.cpp runs within 1e-3 of transformers.
    (The pinned converter reads the config through transformers, whose NemotronHConfig always holds
    num_experts_per_tok, so it writes every Nemotron-H as nemotron_h_moe, the MLP layers' feed_forward_length
    0: llama.cpp then takes them for Mamba layers and refuses the file. Measured once, not run here: the
    converter costs 8 s; its tensors equalled edgeseq's name for name, and so did the keys both share.)"""
    lc = llama_cpp()
    from gguf import GGUFReader

    from edgeseq.exporters.gguf_writer import export_gguf

    ck = make_nemotron_h(tmp_path / "hf", seed=3, hybrid_override_pattern="M-M*-M-")
    ours = tmp_path / "ours.gguf"
    info = export_gguf(str(ck), str(ours))
    assert info["architecture"] == "nemotron_h" and info["generic_because"] is None
    kv = _kv(GGUFReader(ours))
    assert kv["nemotron_h.feed_forward_length"][1] == [0, 48, 0, 0, 48, 0, 48]
    assert kv["nemotron_h.attention.head_count_kv"][1] == [0, 0, 0, 2, 0, 0, 0]
    assert not any(".expert_" in k for k in kv)
    prompt = random_ids(256, 12, seed=4)
    want = hf_logits64(as_f64(load_hf(ck)), prompt)
    llm = lc.Llama(str(ours), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    llm.eval(prompt)
    assert np.abs(np.array(llm.scores[:len(prompt)]) - want).max() < 1e-3


def test_edgeseq_reads_nemotron_h_gguf(moe_case, tmp_path):
    """edgeseq reads back the nemotron_h_moe file it writes (the pattern from head_count_kv,
    feed_forward_length and ffn_gate_inp) and runs it to the reference."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    export_gguf(str(moe_case.ckpt), str(tmp_path / "m.gguf"))
    m = edgeseq.load(str(tmp_path / "m.gguf"))
    assert m.manifest["config"]["pattern"] == "ME*EME"
    assert np.abs(m.session().prefill(moe_case.ids[:30]) - moe_case.ref[29]).max() < moe_case.tol


def test_what_llama_cpp_cannot_run_is_generic_gguf(variant, tmp_path):
    """Mamba projection biases and a pattern with both - and E blocks have no llama.cpp nemotron_h form:
    written as edgeseq's generic GGUF, saying why, and edgeseq runs that file to the reference."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    info = export_gguf(str(variant.ckpt), str(tmp_path / "m.gguf"))
    if variant.name.startswith("*M-M"):
        assert info["architecture"] == "edgeseq-nemotron_h" and "use_bias" in info["generic_because"]
    elif variant.name.startswith("M-E*"):
        assert info["architecture"] == "edgeseq-nemotron_h_moe" and "both - and E" in info["generic_because"]
    else:
        assert info["architecture"] == "nemotron_h_moe"
        return
    s = edgeseq.load(str(tmp_path / "m.gguf"), max_context=64).session()
    assert np.abs(s.prefill(variant.ids[:30]) - variant.ref[29]).max() < variant.tol


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

def _edit_config(path, drop=(), **kw):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(kw)
    for k in drop:
        cfg.pop(k, None)
    f.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return make_nemotron_h(tmp_path_factory.mktemp("nemotron_h-plain") / "hf", seed=1,
                           hybrid_override_pattern="ME*-")


@pytest.mark.parametrize("edit, error, message", [
    (dict(n_group=2, topk_group=1), UnsupportedError, "group-limited routing"),
    (dict(moe_latent_size=16), UnsupportedError, "moe_latent_size"),
    (dict(mlp_hidden_act="silu"), UnsupportedError, "mlp_hidden_act 'silu'"),
    (dict(mamba_hidden_act="gelu"), UnsupportedError, "mamba_hidden_act 'gelu'"),
    (dict(mlp_bias=True), UnsupportedError, "mlp_bias"),
    (dict(num_experts_per_tok=5), UnsupportedError, "num_experts_per_tok 5"),
    (dict(layers_block_type=[M, E, A, "cross_attention"]), UnsupportedError, "layers_block_type must be"),
    (dict(hybrid_override_pattern="ME*X"), UnsupportedError, "hybrid_override_pattern must be"),
    (dict(hybrid_override_pattern="M*E-"), EdgeseqError, "the weights lack"),  # the weights follow another
    (dict(time_step_limit=[0.5, 0.1]), UnsupportedError, "time_step_limit"),
    (dict(n_groups=3), EdgeseqError, "n_groups 3"),
    (dict(drop=("layers_block_type",)), EdgeseqError, "hybrid_override_pattern, layers_block_type"),
])
def test_unsupported_config(plain_ckpt, tmp_path, edit, error, message):
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    _edit_config(ck, **edit)
    with pytest.raises(error, match=message) as e:
        NemotronH.read_config(Checkpoint(str(ck)))
    assert "config.json" in str(e.value) or str(ck) in str(e.value)


def test_hub_style_config_reads_the_same(plain_ckpt, tmp_path):
    """The hub's config.json spellings (the pattern as hybrid_override_pattern, mamba_n_groups,
    mamba_dt_limit with JSON's Infinity, no layers_block_type) give the config transformers' save gives."""
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    groups = cfg.pop("n_groups")
    for k in ("layers_block_type", "time_step_limit"):
        cfg.pop(k)
    cfg.update(hybrid_override_pattern="ME*-", mamba_n_groups=groups, num_hidden_layers=4)
    (ck / "config.json").write_text(json.dumps(cfg)[:-1] + ', "mamba_dt_limit": [0.0, Infinity]}')
    assert NemotronH.read_config(Checkpoint(str(ck))) == NemotronH.read_config(Checkpoint(str(plain_ckpt)))


def test_cli_error_is_one_line_and_writes_nothing(plain_ckpt, tmp_path):
    ck = tmp_path / "hf"
    shutil.copytree(plain_ckpt, ck)
    _edit_config(ck, n_group=4, topk_group=2)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, "-m", "edgeseq", "export", str(ck), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0] and "topk_group" in lines[0]
    assert not out.exists()
