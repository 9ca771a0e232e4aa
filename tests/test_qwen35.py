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

import edgeseq
import families  # noqa: F401  (first: it imports family_qwen35 and registers its cases)
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
