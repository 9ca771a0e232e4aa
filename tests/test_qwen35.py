"""Qwen3.5 (dense): what is special to it: the configuration (nested text_config, layer_types, partial
RoPE, the (1 + w) norms), the state against transformers' own cache, what the multimodal checkpoint
leaves out, and bad configurations. The common checks (transformers in float64, both flavours, the state
contract, plain onnxruntime, save/load/fork, GGUF) run over tests/family_qwen35.py's cases in
tests/test_conformance.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import families  # noqa: F401  (first: it imports family_qwen35 and registers its cases)
from conftest import hf_logits64
from family_qwen35 import CONFIGS, float64_delta_rule
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.qwen35 import Qwen35


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, family_case):
    return family_case(f"qwen35/{request.param}")


def text_config(case):
    return getattr(case.hf.config, "text_config", case.hf.config)


def test_config(case):
    hc = text_config(case)
    c = Qwen35.read_config(Checkpoint(str(case.ckpt)))
    assert c.layer_types == list(hc.layer_types) and c.n_layer == hc.num_hidden_layers
    assert c.rotary_dim == int(hc.head_dim * hc.rope_parameters["partial_rotary_factor"])
    assert (c.lin_k_heads, c.lin_v_heads, c.lin_k_dim, c.lin_v_dim, c.d_conv) == (
        hc.linear_num_key_heads, hc.linear_num_value_heads, hc.linear_key_head_dim, hc.linear_value_head_dim,
        hc.linear_conv_kernel_dim)
    assert c.tie_embeddings == bool(case.hf.config.tie_word_embeddings)
    m = case.model(False)
    assert m.manifest["family"] == "qwen35" and m.manifest["max_context"] == 4096
    names = {w for w in json.loads((case.bundle(False) / "edgeseq.json").read_text())["config"]}
    assert "layer_types" in names


def test_state_matches_transformers_cache(case):
    """After 40 tokens: each Gated DeltaNet layer's S (Hv, dk, dv) and conv state (HF keeps the last k
    inputs, edgeseq the last k-1), and each attention layer's keys (after QK-norm and RoPE) and values in
    ring slots 0..39, against transformers' cache (float64, the delta rule in float64)."""
    hc, n = text_config(case), 40
    with float64_delta_rule(), torch.no_grad():
        cache = case.hf64(torch.tensor([case.ids[:n]]), use_cache=True).past_key_values
    s = case.model(False).session()
    s.prefill(case.ids[:n])
    st = s.state()
    for i, kind in enumerate(hc.layer_types):
        if kind == "linear_attention":
            S = cache.get_recurrent_state(i).double().numpy()
            assert np.abs(st[f"past_key_values.{i}.recurrent_state"] - S).max() < 1e-4 * max(1, np.abs(S).max())
            conv = cache.get_conv_state(i).double().numpy()[..., 1:]
            assert np.abs(st[f"past_key_values.{i}.conv_state"] - conv).max() < 1e-4 * max(1, np.abs(conv).max())
        else:
            for name, ref in (("key", cache.layers[i].keys), ("value", cache.layers[i].values)):
                ref = ref.double().numpy()
                got = st[f"past_key_values.{i}.{name}"][:, :, :n]
                assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4 * max(1, np.abs(ref).max())


@pytest.mark.parametrize("case", ["conditional-gva4-bf16"], indirect=True)
def test_conditional_generation_exports_the_language_model(case):
    """The released layout: a vision tower in the checkpoint (left out), the language model under
    model.language_model., the text config nested; the conformance suite checks its logits."""
    import onnx

    ck = Checkpoint(str(case.ckpt))
    assert ck.architecture == "Qwen3_5ForConditionalGeneration"
    assert any(k.startswith("model.visual.") for k in ck.keys())
    assert any(k.startswith("model.language_model.layers.") for k in ck.keys())
    g = onnx.load(str(case.bundle(False) / "prefill.onnx"), load_external_data=False)
    stored = {t.name for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert "layers.0.in_qkv" in stored and not any("visual" in n for n in stored)


BAD = [
    ("layer_types", lambda t: t.update(layer_types=["linear_attention"] * (t["num_hidden_layers"] - 1)
                                       + ["sliding_attention"]), "layer_types"),
    ("rope_type", lambda t: t["rope_parameters"].update(rope_type="yarn"), "rope_type 'yarn'"),
    ("gva", lambda t: t.update(linear_num_key_heads=3), "linear_num_value_heads"),
]


@pytest.mark.parametrize("case", ["3to1-gva2-untied"], indirect=True)
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_error_line(case, bad, tmp_path):
    _, edit, named = bad
    ck = tmp_path / "ckpt"
    shutil.copytree(case.ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    edit(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-P", "-m", "edgeseq", "export", str(ck), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0] and "config.json" in lines[0]
    assert not (tmp_path / "out").exists()


class _Reader:
    """gguf-py's reader behind the few calls an ArchMap's `config` and a table's `from_gguf` make
    (edgeseq's own reader refuses the converter's bool array `attention.recurrent_layers`: see Qwen35Gguf)."""

    def __init__(self, path):
        from gguf import GGUFReader

        r = GGUFReader(str(path))
        self.path, self.architecture = str(path), "qwen35"
        self.kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
        self.types = {f.name: [int(t) for t in f.types] for f in r.fields.values()}
        self.arrays = {t.name: np.array(t.data) for t in r.tensors}
        self.tensors = {n: type("T", (), {"shape": a.shape}) for n, a in self.arrays.items()}

    def arch_key(self, key):
        return f"qwen35.{key}"

    def get(self, key, default=None, kind=None):
        return self.kv.get(key, default)

    def need(self, key, kind=None):
        return self.kv[key]

    def tensor(self, name):
        return self.tensors[name]

    def array(self, name):
        return self.arrays[name]


@pytest.mark.slow
def test_same_tensors_and_metadata_as_llama_cpp_converter(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (--no-mtp) on a Qwen3.5 checkpoint with two value heads per key
    head: every tensor the table writes (names, shapes, values: the value heads reordered to llama.cpp's
    tiled order, 1 + w norms, -exp(A_log)) and every `qwen35.*` metadata key Qwen35Gguf writes (value and
    type) equal the converter's; the converter's tensors read back through the table give the canonical
    weights, and its metadata the family's config; llama.cpp runs the converter's file to transformers'
    float64 logits (1e-3)."""
    from gguf import GGUFValueType as V
    from gguf_helpers import converter_dir, write_neox_tokenizer
    from family_qwen35 import make_qwen35
    from edgeseq.families.qwen35 import Qwen35Gguf

    ck = tmp_path / "hf"
    ck.mkdir()
    write_neox_tokenizer(ck)
    # llama.cpp's qwen35 needs dv = dk and mrope sections within half the rotated channels
    make_qwen35(ck, seed=9, **{**CONFIGS["3to1-gva2-untied"], "vocab_size": 50288, "bos_token_id": 0,
                               "eos_token_id": 0, "pad_token_id": 1, "linear_value_head_dim": 8, "head_dim": 16,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                                                   "mrope_interleaved": True}})
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONSAFEPATH"}
    r = subprocess.run([sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), str(ck), "--outtype", "f32",
                        "--no-mtp", "--outfile", str(tmp_path / "ref.gguf")], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _Reader(tmp_path / "ref.gguf")

    src = Checkpoint(str(ck))
    fam = Qwen35(Qwen35.read_config(src))
    canon = dict(fam.convert(src))
    ours = dict(fam.table().to_gguf(canon.items(), "qwen35"))
    assert set(ours) == set(ref.arrays)
    for n, a in ref.arrays.items():
        assert ours[n].shape == a.shape, n
        np.testing.assert_allclose(ours[n], a, rtol=1e-6, atol=1e-7, err_msg=n)
    back = dict(fam.table().from_gguf(ref))
    assert set(back) == set(canon)
    for n, a in canon.items():
        np.testing.assert_allclose(back[n], a, rtol=1e-6, atol=1e-7, err_msg=n)

    kinds = {"u32": [V.UINT32], "f32": [V.FLOAT32], "bools": [V.ARRAY, V.BOOL], "i32s": [V.ARRAY, V.INT32]}
    meta = Qwen35Gguf().metadata(fam, {})
    assert {"qwen35." + k for k, _, _ in meta} == {k for k in ref.kv if k.startswith("qwen35.")}
    for k, v, kind in meta:
        assert ref.types["qwen35." + k] == kinds[kind], k
        assert ref.kv["qwen35." + k] == (pytest.approx(v, rel=1e-6) if kind == "f32" else v), k
    got = Qwen35Gguf().config(ref)  # the floats come back through float32
    assert got.pop("norm_eps") == pytest.approx(fam.config.norm_eps, rel=1e-6)
    assert Qwen35.Config(**got, norm_eps=fam.config.norm_eps) == fam.config
    assert Qwen35Gguf().supports(fam) is None

    # llama.cpp runs the converter's file (the same tensors and keys) to transformers' float64 logits
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the llamacpp extra)")
    ids = [5, 42, 0, 63, 17, 31, 8, 50, 1000, 20000, 7, 9]
    with float64_delta_rule():
        want = hf_logits64(ck, ids)
    llm = llama_cpp.Llama(str(tmp_path / "ref.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[:len(ids)]) - want).max() < 1e-3
    del llm

    # edgeseq's reader takes the converter's file (its bool array included) and runs it to the same logits
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    model = edgeseq.load(str(tmp_path / "ref.gguf"))
    assert model.family_name == "qwen35"
    assert np.abs(model.session().logits_all(ids) - want).max() < 1e-3
    # and llama.cpp runs the file edgeseq writes as llama.cpp's qwen35
    info = export_gguf(str(ck), str(tmp_path / "ours.gguf"))
    assert info["architecture"] == "qwen35" and not info["generic_because"]
    llm = llama_cpp.Llama(str(tmp_path / "ours.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[:len(ids)]) - want).max() < 1e-3
