"""LFM2: what is special to it: the configuration (layer_types and the older full_attn_idxs, the MLP
width rule, the tie_embedding alias), the state against transformers' own cache, and GGUF: edgeseq's
file equals what llama.cpp's converter writes (metadata, tensor names, shapes, values) and llama.cpp
runs it to transformers' float64 logits within 1e-3. The common checks (transformers in float64, both
flavours, the state contract, plain onnxruntime, save/load/fork) run over tests/family_lfm2.py's cases
in tests/test_conformance.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import families  # noqa: F401  (first: the suite's helpers)
from conftest import SEQ_LEN, Built, as_f64, hf_logits64, load_hf, random_ids
from edgeseq.errors import EdgeseqError, UnsupportedError
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.lfm2 import Lfm2, Lfm2Gguf
from family_lfm2 import CONFIGS, DEFAULTS, MOE_CONFIGS, _build, _build_moe, make_lfm2
from gguf_helpers import convert, llama_cpp, write_neox_tokenizer


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Built:
    return _build(request.param)(tmp_path_factory.mktemp("lfm2-" + request.param))


def test_config(case):
    hc = case.hf.config
    c = Lfm2.read_config(Checkpoint(str(case.ckpt)))
    assert c.layer_types == list(hc.layer_types) and c.n_layer == hc.num_hidden_layers
    assert c.ffn_dim == case.hf.model.layers[0].feed_forward.w1.out_features  # transformers' width rule
    assert (c.attn_heads, c.kv_heads, c.d_conv, c.head_dim) == (
        hc.num_attention_heads, hc.num_key_value_heads, hc.conv_L_cache, hc.hidden_size // hc.num_attention_heads)
    assert c.tie_embeddings == bool(hc.tie_word_embeddings) and c.conv_bias == bool(hc.conv_bias)
    m = case.model(False)
    assert m.manifest["family"] == "lfm2" and m.manifest["max_context"] == 4096


def _edit_config(path, **kw):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f.write_text(json.dumps(cfg))


def test_older_config_keys(tmp_path):
    """Released configs name the attention layers by index (full_attn_idxs) and may say tie_embedding
    and block_ff_dim: read as transformers reads them."""
    ck = make_lfm2(tmp_path / "hf", hidden_size=32, num_hidden_layers=4, layer_types=["conv", "full_attention",
                                                                                      "conv", "full_attention"])
    _edit_config(ck, layer_types=None, full_attn_idxs=[1, 3], tie_word_embeddings=None, tie_embedding=True,
                 intermediate_size=None, block_ff_dim=96)
    c = Lfm2.read_config(Checkpoint(str(ck)))
    assert c.layer_types == ["conv", "full_attention", "conv", "full_attention"]
    assert c.ffn_dim == 64 and c.tie_embeddings


def test_sharded_bf16_checkpoint(tmp_path):
    """bf16 weights in several safetensors shards (an index file), as released checkpoints come."""
    ck = make_lfm2(tmp_path / "hf", seed=5, dtype=torch.bfloat16, shard="40KB")
    assert (ck / "model.safetensors.index.json").exists() and len(list(ck.glob("*.safetensors"))) > 2
    c = Built(ck, tmp_path, random_ids(256, 24, seed=2))
    s = c.model(False).session()
    assert np.abs(s.prefill(c.ids) - c.ref[-1]).max() < c.tol


@pytest.mark.parametrize("edit, message", [
    (dict(layer_types=["conv", "sliding_attention", "conv", "full_attention"]), "layer_types"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0}), "rope_type"),
    (dict(head_dim=16), "head_dim"),
    # malformed values: one line naming the key, not a traceback
    (dict(hidden_size="big"), "hidden_size must be a whole number"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a whole number >= 1"),
    (dict(layer_types="conv"), "layer_types"),
    (dict(rope_parameters=[1]), "rope_parameters must be an object"),
    (dict(block_multiple_of=None, block_ffn_dim_multiplier="x"), "block_ffn_dim_multiplier must be a number"),
])
def test_unsupported_config(tmp_path, edit, message):
    ck = make_lfm2(tmp_path / "hf")
    _edit_config(ck, **edit)
    with pytest.raises(UnsupportedError, match=message) as e:
        Lfm2.read_config(Checkpoint(str(ck)))
    assert "config.json" in str(e.value)


def test_state_matches_transformers_cache(case):
    """After 40 tokens: each conv layer's state (transformers keeps the last k inputs B·x, edgeseq the
    last k-1) and each attention layer's keys (after QK-norm and RoPE) and values in ring slots 0..39,
    against transformers' cache in float64."""
    hc, n = case.hf.config, 40
    with torch.no_grad():
        cache = case.hf64(torch.tensor([case.ids[:n]]), use_cache=True).past_key_values
    s = case.model(False).session()
    s.prefill(case.ids[:n])
    st = s.state()
    for i, kind in enumerate(hc.layer_types):
        if kind == "conv":
            ref = cache.get_conv_state(i).double().numpy()[..., 1:]
            got = st[f"past_key_values.{i}.conv_state"]
            assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4 * max(1, np.abs(ref).max())
        else:
            for name, ref in (("key", cache.layers[i].keys), ("value", cache.layers[i].values)):
                ref = ref.double().numpy()
                got = st[f"past_key_values.{i}.{name}"][:, :, :n]
                assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4 * max(1, np.abs(ref).max())


# ---------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's lfm2
# ---------------------------------------------------------------------------------------------------

def _kv(reader) -> dict:
    """{key: (GGUF types, the value's bytes)} as gguf-py reads a file (a reader edgeseq did not write);
    bytes rather than values: decoding the 50k-token vocabulary takes seconds."""
    return {f.name: ([int(x) for x in f.types], b"".join(p.tobytes() for p in f.parts[3:]))
            for f in reader.fields.values() if not f.name.startswith("GGUF.")}


class _Reader:
    """gguf-py's reader behind the calls Lfm2Gguf.config and the table's from_gguf make."""

    def __init__(self, r, arch):
        self.path, self.arch = "converter.gguf", arch
        self.kv = {f.name: f.contents() for f in r.fields.values() if f.name.startswith(arch + ".")}
        self.arrays = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in r.tensors}
        self.tensors = {n: type("T", (), {"shape": a.shape}) for n, a in self.arrays.items()}

    def arch_key(self, key):
        return f"{self.arch}.{key}"

    def get(self, key, default=None, kind=None):
        return self.kv.get(key, default)

    def need(self, key, kind=None):
        return self.kv[key]

    def tensor(self, name):
        return self.tensors[name]

    def array(self, name):
        return self.arrays[name]


@pytest.fixture
def lfm2_map():
    """The families declare llama.cpp's lfm2 / lfm2moe maps themselves (kept as a fixture name for the tests)."""


# the converter title-cases the folder name; it names the NeoX pre-tokenizer from a table of hashes,
# edgeseq "gpt-2" from the tokenizer.json (llama.cpp gives both GPT-2's regex)
DIFFERENT_VALUES = {"general.name", "tokenizer.ggml.pre"}


@pytest.mark.slow
@pytest.mark.parametrize("name, compare", [("mqa-untied-conv4", True), ("gqa2-tied", False), ("moe-top2-of-4", True)])
def test_same_file_as_llama_cpp_converter_and_llama_cpp_runs_it(tmp_path, name, compare, lfm2_map):
    """The converter's file for the untied case, which has every lfm2 tensor, and for LFM2-MoE (lfm2moe;
    10 s of the converter's start-up each); llama.cpp runs those and the tied file (the head read from
    token_embd)."""
    from edgeseq.families.lfm2_moe import Lfm2Moe

    moe = name in MOE_CONFIGS
    fam_cls, arch = (Lfm2Moe, "lfm2moe") if moe else (Lfm2, "lfm2")
    lc = llama_cpp()
    from gguf import GGUFReader

    from edgeseq.exporters.gguf_writer import export_gguf

    ck = tmp_path / "hf"
    ck.mkdir()
    write_neox_tokenizer(ck)  # the converter needs a tokenizer it knows
    make_lfm2(ck, seed=3, vocab_size=50304, bos_token_id=0, eos_token_id=0, pad_token_id=1,
              **(MOE_CONFIGS if moe else CONFIGS)[name])
    ours = tmp_path / "ours.gguf"
    info = export_gguf(str(ck), str(ours))
    assert info["architecture"] == arch and info["generic_because"] is None
    if compare:  # gguf-py's reader takes 4 s to open each file (the vocabulary)
        a, b = GGUFReader(ours), GGUFReader(convert(ck, tmp_path / "ref.gguf"))
        cfg = {**DEFAULTS, **(MOE_CONFIGS if moe else CONFIGS)[name]}  # 0 key/value heads for a conv layer
        assert list(b.fields[f"{arch}.attention.head_count_kv"].contents()) == [
            0 if x == "conv" else cfg["num_key_value_heads"] for x in cfg["layer_types"]]
        ka, kb = _kv(a), _kv(b)
        assert set(ka) == set(kb)
        for k in kb:
            assert ka[k][0] == kb[k][0], k
            # the converter labels an MoE's size "{E}x{per expert}" (exporters/gguf_writer.py: the total)
            same = DIFFERENT_VALUES | ({"general.size_label"} if moe else set())
            assert k in same or ka[k][1] == kb[k][1], (k, a.fields[k].contents(), b.fields[k].contents())
        ta, tb = {x.name: x for x in a.tensors}, {x.name: x for x in b.tensors}
        assert set(ta) == set(tb) and ("output.weight" in tb) == (not cfg["tie_word_embeddings"])
        for n, x in tb.items():
            assert (list(ta[n].shape), ta[n].tensor_type) == (list(x.shape), x.tensor_type), n
            np.testing.assert_allclose(ta[n].data, x.data, rtol=1e-6, atol=1e-7, err_msg=n)
        # and back: Lfm2Gguf reads the converter's file to the checkpoint's config and weights
        fam = fam_cls(fam_cls.read_config(Checkpoint(str(ck))))
        got = fam_cls.Config(**fam_cls.gguf.config(_Reader(b, arch)))
        assert got.norm_eps == pytest.approx(fam.config.norm_eps, rel=1e-6)  # through float32
        assert vars(got) == {**vars(fam.config), "norm_eps": got.norm_eps}
        canonical = dict(fam.convert(Checkpoint(str(ck))))
        back = dict(fam.table().from_gguf(_Reader(b, arch)))
        assert set(back) == set(canonical)
        for n, x in back.items():
            np.testing.assert_array_equal(x, canonical[n], err_msg=n)

    # llama.cpp runs edgeseq's file to transformers' greedy tokens and float64 logits (an f32 KV cache:
    # its default f16 cache alone moves these logits by 2e-3)
    prompt = random_ids(50304, 12, seed=4)
    llm = lc.Llama(str(ours), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    llm.eval(prompt)
    greedy = []
    for _ in range(6):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    got = np.array(llm.scores[:len(prompt) + 6])
    hf = load_hf(ck)
    hf.set_experts_implementation("eager")  # (grouped_mm takes no float64)
    want = hf_logits64(as_f64(hf), prompt + greedy)
    assert [int(np.argmax(r)) for r in want[len(prompt) - 1:-1]] == greedy
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_conv_bias_is_not_lfm2_gguf(tmp_path, tmp_path_factory):
    """llama.cpp's lfm2 has no conv biases: such a checkpoint is written as edgeseq's generic GGUF, and
    says why."""
    import families
    from edgeseq.exporters.gguf_writer import export_gguf

    case = families.built("lfm2/mha-bias-bf16", tmp_path_factory)  # the case with conv biases
    assert case.hf.config.conv_bias

    info = export_gguf(str(case.ckpt), str(tmp_path / "m.gguf"))
    assert info["architecture"] != "lfm2" and "conv_bias" in info["generic_because"]


def test_lfm2_gguf_read_back_in_edgeseq(tmp_path):
    """edgeseq reads back the llama.cpp lfm2 file it writes (head_count_kv one per layer) to the reference."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    c = _build("gqa2-tied")(tmp_path)
    export_gguf(str(c.ckpt), str(tmp_path / "m.gguf"))
    s = edgeseq.load(tmp_path / "m.gguf").session()
    assert np.abs(s.prefill(c.ids[:SEQ_LEN]) - c.ref[-1]).max() < c.tol


# ---------------------------------------------------------------------------------------------------
# LFM2-MoE
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def moe_case(request, tmp_path_factory) -> Built:
    return _build_moe(request.param)(tmp_path_factory.mktemp("lfm2moe-" + request.param))


def test_moe_config(moe_case):
    from edgeseq.families.lfm2_moe import Lfm2Moe

    hc = moe_case.hf.config
    c = Lfm2Moe.read_config(Checkpoint(str(moe_case.ckpt)))
    assert (c.n_experts, c.top_k, c.expert_dim, c.n_dense) == (
        hc.num_experts, hc.num_experts_per_tok, hc.moe_intermediate_size, hc.num_dense_layers)
    assert (c.norm_topk, c.routed_scaling, c.expert_bias) == (
        hc.norm_topk_prob, hc.routed_scaling_factor, hc.use_expert_bias)
    assert c.ffn_dim == moe_case.hf.model.layers[0].feed_forward.w1.out_features  # the dense layers' width
    assert moe_case.model(False).manifest["family"] == "lfm2_moe"


def test_moe_routing_matters(moe_case):
    """The case routes: its float64 reference changes when every expert is weighed alike (so logits
    within 1e-4 of it check the choice and the weights)."""
    import transformers.models.lfm2_moe.modeling_lfm2_moe as modeling

    saved = modeling.Lfm2MoeTopKRouter.forward

    def uniform(self, hidden_states, expert_bias=None):
        logits, w, chosen = saved(self, hidden_states, expert_bias)
        return logits, torch.full_like(w, 1.0 / w.shape[-1]), chosen

    modeling.Lfm2MoeTopKRouter.forward = uniform
    try:
        other = hf_logits64(moe_case.hf64, moe_case.ids)
    finally:
        modeling.Lfm2MoeTopKRouter.forward = saved
    assert np.abs(other - moe_case.ref).max() > 0.05


def test_moe_unsupported_config(tmp_path):
    from edgeseq.families.lfm2_moe import Lfm2Moe

    ck = make_lfm2(tmp_path / "hf", **MOE_CONFIGS["moe-top2-of-4"])
    _edit_config(ck, num_experts_per_tok=5)
    with pytest.raises(UnsupportedError, match="num_experts_per_tok 5"):
        Lfm2Moe.read_config(Checkpoint(str(ck)))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_moe_quantized_experts(quant, tmp_path_factory):
    """int8 / int4 expert weights: the three expert matrices are plain MatMul weights (MatMulNBits). On
    these tiny noisy models int8 alone moves the last logits by 0.19 (dense LFM2) / 0.20 (this MoE case),
    int4 by 2.9 / 1.8 and flips routes: the logits bound is int8's, a sanity bound (logits' std 1.5)."""
    import families

    moe_case = families.built("lfm2_moe/moe-top2-of-4", tmp_path_factory)
    import onnx

    bundle = moe_case.bundle(False, quant=quant)
    for kind in ("step", "prefill"):
        m = onnx.load(str(bundle / f"{kind}.onnx"), load_external_data=False)
        quantized = {n.input[1] for n in m.graph.node if n.op_type == "MatMulNBits"}
        for n in ("gate", "up", "down"):
            assert any(f"layers.1.experts_{n}" in q for q in quantized), (kind, n, sorted(quantized))
    if quant == "int8":
        got = moe_case.model(False, quant=quant).session().prefill(moe_case.ids[:40])
        assert np.abs(got - moe_case.ref[39]).max() < 0.5


def test_mobile_bundles(tmp_path):
    """The mobile export (ORT format, standard ops, no control flow in the step graph) of LFM2 and
    LFM2-MoE steps to transformers' float64 logits."""
    import edgeseq
    from edgeseq.exporters.mobile import export_mobile

    for c in (_build("gqa2-tied")(tmp_path / "dense"), _build_moe("moe-top2-of-4")(tmp_path / "moe")):
        s = edgeseq.load(export_mobile(str(c.ckpt), str(c.workdir / "mobile"))).session()
        got = np.array([s.step(i) for i in c.ids[:20]])
        assert np.abs(got - c.ref[:20]).max() < c.tol


def test_moe_without_llama_cpp_routing_is_generic_gguf(moe_case, tmp_path, lfm2_map):
    """llama.cpp's lfm2moe renormalises the top k, scales by 1 and adds exp_probs_b: other routings are
    written as edgeseq's generic GGUF, which says why."""
    from edgeseq.exporters.gguf_writer import export_gguf

    info = export_gguf(str(moe_case.ckpt), str(tmp_path / "m.gguf"))
    if moe_case.name == "moe-top2-of-4":
        assert info["architecture"] == "lfm2moe" and info["generic_because"] is None
    else:
        assert info["architecture"] == "edgeseq-lfm2_moe" and "norm_topk_prob" in info["generic_because"]


def test_moe_router_stays_f32_under_int4(tmp_path, monkeypatch):
    """int4 flips LFM2-MoE routes: on this 16-expert model an int4 router alone (the rest f32) changes the
    chosen experts of 28 % of token-layer routes (15 % in the first MoE layer), so the family keeps its
    routers f32 (as llama.cpp's converter keeps ffn_gate_inp). With 16 experts the router is large enough
    for the quantizer to take (it skips matrices under 16 rows): without the policy it goes 4-bit."""
    from edgeseq.exporters.export import export
    from edgeseq.families.base import Family
    from edgeseq.families.lfm2_moe import Lfm2Moe

    ck = make_lfm2(tmp_path / "hf", seed=5, layer_types=["conv", "full_attention", "conv"], num_hidden_layers=3,
                   hidden_size=64, moe=dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                                            num_dense_layers=1))

    def quantized(out):
        return json.loads((Path(export(str(ck), str(tmp_path / out), quant="int4")) / "edgeseq.json").read_text()
                          )["quant"]["tensors"]

    t = quantized("int4")
    routers = [f"layers.{i}.router" for i in (1, 2)]
    assert not any(r in t for r in routers), sorted(t)
    assert t["layers.1.experts_up"]["bits"] == 4 and t["layers.0.in_proj"]["bits"] == 4  # the rest as the recipe
    monkeypatch.setattr(Lfm2Moe, "quant_policy", Family.quant_policy)
    t = quantized("int4-router")
    assert all(t[r]["bits"] == 4 for r in routers)
