"""LFM3: what is special to it: the sliding window at its edges (prefills of W-1, W, W+1 and many W tokens,
chunks shorter than W, windows of 1 and longer than the text, the ring's slots against transformers'
cache), RoPE per layer type (the frequencies against transformers' own), config variants checked for
logits (no full-attention layer, transformers' default layer pattern, both names of the gate weight),
the mobile export, the generic GGUF, and clear errors. The common checks run over tests/family_lfm3.py's
cases in tests/test_conformance.py. The reference is transformers' Lfm3ForCausalLM in float64."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import families  # noqa: F401  (first: the suite's helpers)
from conftest import Built
from edgeseq.errors import UnsupportedError
from edgeseq.exporters.checkpoint import Checkpoint
from edgeseq.families.lfm3 import Lfm3
from family_lfm3 import A, C, S, built_lfm3, make_lfm3


@pytest.fixture(scope="module")
def swa7(tmp_path_factory) -> Built:
    return families.built("lfm3/swa7-gqa2-tied", tmp_path_factory)


@pytest.fixture(scope="module")
def swa16(tmp_path_factory) -> Built:
    return families.built("lfm3/swa16-mqa-bias-bf16", tmp_path_factory)


def _steps(s, ids) -> np.ndarray:
    return np.array([s.step(i) for i in ids])


def test_config(swa7, swa16):
    for case in (swa7, swa16):
        hc = case.hf.config
        c = Lfm3.read_config(Checkpoint(str(case.ckpt)))
        assert c.layer_types == list(hc.layer_types) and c.window == hc.sliding_window
        assert (c.attn_heads, c.kv_heads, c.head_dim, c.d_conv, c.ffn_dim) == (
            hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim, hc.conv_L_cache, hc.intermediate_size)
        assert (c.sandwich_norm, c.attention_gate, c.attention_bias, c.conv_bias, c.tie_embeddings) == (
            hc.use_sandwich_norm, hc.use_attention_gate, hc.attention_bias, hc.conv_bias, hc.tie_word_embeddings)
        # RoPE per layer type: the frequencies transformers computed, bit for bit
        for kind in (S, A):
            want = getattr(case.hf.model.rotary_emb, f"{kind}_inv_freq").numpy()
            np.testing.assert_array_equal(Lfm3(c).config.inv_freq(kind), want)
        m = case.model(False).manifest
        assert m["family"] == "lfm3" and m["max_context"] == 4096
        rings = {s["name"]: s["shape"] for s in m["state"] if s["name"].endswith(".key")}
        assert rings == {f"past_key_values.{i}.key": ["batch", hc.num_key_value_heads,
                                                        hc.sliding_window if k == S else "max_context", hc.head_dim]
                         for i, k in enumerate(hc.layer_types) if k != C}


@pytest.mark.parametrize("portable", [False, True])
def test_prefill_at_window_edges(swa7, portable):
    """Prefills of W-1, W, W+1 and 2W+1 tokens (in one call and in chunks of 3, shorter than the window
    and not dividing it), then steps past 4W: every logit as transformers'."""
    W, m = swa7.hf.config.sliding_window, swa7.model(portable)
    for n in (W - 1, W, W + 1, 2 * W + 1):
        for chunk in (None, 3):
            s = m.session(prefill_chunk=chunk)
            assert np.abs(s.prefill(swa7.ids[:n]) - swa7.ref[n - 1]).max() < swa7.tol, (n, chunk)
            assert np.abs(_steps(s, swa7.ids[n:4 * W + 2]) - swa7.ref[n:4 * W + 2]).max() < swa7.tol, (n, chunk)


def test_window_matters(swa7):
    """The case's reference changes when its sliding layers see one token more (so the suite's 1e-4 checks
    the window's edge)."""
    wide = Built(make_lfm3(swa7.workdir / "wide", seed=3, sliding_window=8), swa7.workdir / "wide", swa7.ids)
    assert np.abs(wide.ref[:7] - swa7.ref[:7]).max() < 1e-9  # the same model until the window fills
    assert np.abs(wide.ref[7:] - swa7.ref[7:]).max() > 0.05


def test_ring_holds_transformers_keys(swa7):
    """After 40 tokens a sliding layer's ring slot p % W holds the key (after QK-norm and RoPE) and value of
    position p for the positions transformers' sliding cache keeps (the last W-1 or W)."""
    hc, n, W = swa7.hf.config, 40, swa7.hf.config.sliding_window
    with torch.no_grad():
        cache = swa7.hf64(torch.tensor([swa7.ids[:n]]), use_cache=True).past_key_values
    s = swa7.model(False).session()
    s.prefill(swa7.ids[:n])
    st = s.state()
    for i, kind in enumerate(hc.layer_types):
        if kind != S:
            continue
        for name, ref in (("key", cache.layers[i].keys), ("value", cache.layers[i].values)):
            ref = ref.double().numpy()  # (1, Hkv, K, hd): positions n-K .. n-1
            K = ref.shape[2]
            assert W - 1 <= K <= W
            got = st[f"past_key_values.{i}.{name}"]
            assert got.shape[2] == W
            got = got[:, :, [p % W for p in range(n - K, n)]]
            assert np.abs(got - ref).max() < 1e-4 * max(1, np.abs(ref).max()), (i, name)


@pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
def test_rows_at_their_own_positions(swa7, portable):
    """Rows before, at and past the window (3, 7, 21 tokens) stacked into one batch and stepped / prefilled
    together with their own positions: each row's logits and state as when it runs alone, and as
    transformers' (what edgeseq serve relies on; tests/test_batch_rows.py's check for LFM3's rings)."""
    from conftest import PlainOrt

    app = PlainOrt(swa7.bundle(portable=portable), max_context=32)  # the full ring holds them all
    ids, lengths = swa7.ids, [3, 7, 21]
    rows = [app.steps(ids[:n]) for n in lengths]
    state = {k: np.concatenate([s[k] for _, s in rows]) for k in rows[0][1]}
    for kind, feed in (("step", [[ids[n]] for n in lengths]), ("prefill", [ids[n:n + 3] for n in lengths])):
        g = app.manifest["graphs"][kind]
        outs = app.sessions[kind].run(g["outputs"], {"input_ids": np.asarray(feed, np.int64),
                                                     "position": np.array(lengths, np.int64), **state})
        for r, n in enumerate(lengths):
            alone_logits, alone_state = app.run(kind, feed[r], rows[r][1], position=n)
            assert np.abs(outs[0][r] - alone_logits[0]).max() < 1e-5, (kind, r)
            assert np.abs(outs[0][r] - swa7.ref[n + len(feed[r]) - 1]).max() < swa7.tol, (kind, r)
            for s, o in zip(app.spec, outs[1:]):
                assert np.abs(o[r] - alone_state[s["name"]][0]).max() < 1e-5, (kind, r, s["name"])


# config variants, checked for logits only: (name, config over family_lfm3.DEFAULTS, config.json edits)
VARIANTS = [
    ("window1", dict(sliding_window=1), {}),  # a sliding layer sees only its own token
    ("window-past-the-ids", dict(sliding_window=100), {}),  # never wraps: full attention in effect
    ("sliding-only", dict(layer_types=[C, S, C, S], num_hidden_layers=4, sliding_window=5), {}),
    # config.json without layer_types: transformers' default pattern (full at i % 4 == 2, sliding at the
    # other multiples of 4 past 0, conv elsewhere)
    ("default-pattern", dict(layer_types=None, num_hidden_layers=5), {"layer_types": None}),
    # the gate stored as g_proj (transformers' module name) rather than gate_proj (the saved name)
    ("gate-as-g_proj", dict(), "rename"),
]


@pytest.mark.parametrize("name, cfg, edit", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_logits(tmp_path, name, cfg, edit):
    c = built_lfm3(tmp_path, name, seed=4, **cfg)
    if edit == "rename":
        from safetensors.numpy import load_file, save_file

        f = c.ckpt / "model.safetensors"
        w = load_file(f)
        assert any(".gate_proj." in k for k in w)
        save_file({k.replace(".gate_proj.", ".g_proj."): v for k, v in w.items()}, f, metadata={"format": "pt"})
    elif edit:
        cfgf = c.ckpt / "config.json"
        j = json.loads(cfgf.read_text())
        j.pop("layer_types")
        cfgf.write_text(json.dumps(j))
        assert c.hf.config.layer_types == [C, C, A, C, S]
    m = c.model(False)
    if name == "sliding-only":  # no full-attention ring: no max_context, sessions are not bounded by one
        assert "max_context" not in m.manifest
    assert np.abs(_steps(m.session(), c.ids) - c.ref).max() < c.tol
    s = m.session()
    assert np.abs(s.prefill(c.ids[:40]) - c.ref[39]).max() < c.tol


def test_mobile_bundle(swa7):
    """The mobile export (ORT format, standard ops, no control flow in the step graph) steps to
    transformers' float64 logits past the window."""
    import edgeseq
    from edgeseq.exporters.mobile import export_mobile

    s = edgeseq.load(export_mobile(str(swa7.ckpt), str(swa7.workdir / "mobile"))).session()
    assert np.abs(_steps(s, swa7.ids[:20]) - swa7.ref[:20]).max() < swa7.tol


def test_generic_gguf(swa16, tmp_path):
    """llama.cpp has no LFM3: the GGUF is edgeseq's generic edgeseq-lfm3, and it reads back (biases, an
    untied head, no gate) to the reference."""
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf

    info = export_gguf(str(swa16.ckpt), str(tmp_path / "m.gguf"))
    assert info["architecture"] == "edgeseq-lfm3"
    s = edgeseq.load(tmp_path / "m.gguf").session()
    assert np.abs(s.prefill(swa16.ids[:40]) - swa16.ref[39]).max() < swa16.tol
    assert np.abs(_steps(s, swa16.ids[40:]) - swa16.ref[40:]).max() < swa16.tol


def test_int4_keeps_the_gates_f32(tmp_path):
    """int4 and int8 bundles keep the per-head gates f32 (16 heads: large enough for the quantizer, which
    skips matrices under 16 rows) and quantize q_proj; the int8 bundle stays near the reference."""
    import edgeseq
    from edgeseq.exporters.export import export

    c = built_lfm3(tmp_path, "heads16", seed=3, hidden_size=64, head_dim=16, num_attention_heads=16,
                   num_key_value_heads=4)
    for quant in ("int4", "int8"):
        b = export(str(c.ckpt), str(tmp_path / quant), quant=quant)
        t = json.loads((tmp_path / quant / "edgeseq.json").read_text())["quant"]["tensors"]
        assert not any(n.endswith(".g") for n in t) and t["layers.1.q"]["bits"] == int(quant[3:])
        if quant == "int8":  # a sanity bound: int8 moved any logit of this model by 0.82 at most
            assert np.abs(edgeseq.load(b).session().prefill(c.ids) - c.ref[-1]).max() < 1.5


def _edit(path, **kw):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(kw)
    f.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return make_lfm3(tmp_path_factory.mktemp("lfm3-bad") / "hf", num_hidden_layers=2, layer_types=[C, S])


@pytest.mark.parametrize("edit, message", [
    (dict(layer_types=[C, "linear_attention"]), "layer_types"),
    (dict(layer_types=[C]), "layer_types"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(rope_parameters={S: {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}), "rope_type 'yarn'"),
    (dict(head_dim=7), "head_dim 7"),
    (dict(num_key_value_heads=3), "num_key_value_heads 3"),
    # malformed values: one line naming the key, not a traceback
    (dict(num_attention_heads=0), "num_attention_heads must be a whole number"),
    (dict(hidden_size="big"), "hidden_size must be a whole number"),
    (dict(layer_types="conv"), "layer_types"),
    (dict(layer_types=[C, {"type": "conv"}]), "layer_types"),
    (dict(rope_parameters={S: 5}), "rope_parameters.sliding_attention must be an object"),
    (dict(rope_parameters={S: {"rope_type": "proportional", "partial_rotary_factor": "half"}}),
     "partial_rotary_factor must be a number"),
    (dict(conv_L_cache=1), "conv_L_cache must be a whole number >= 2"),
])
def test_unsupported_config(small_ckpt, tmp_path, edit, message):
    import shutil

    ck = tmp_path / "hf"
    shutil.copytree(small_ckpt, ck)
    _edit(ck, **edit)
    with pytest.raises(UnsupportedError, match=message) as e:
        Lfm3.read_config(Checkpoint(str(ck)))
    assert "config.json" in str(e.value)


def test_cli_error_is_one_line(small_ckpt, tmp_path):
    """`edgeseq export` of an unsupported LFM3: one error line naming the file and the key, exit 1, no
    traceback, nothing written."""
    import shutil

    ck = tmp_path / "hf"
    shutil.copytree(small_ckpt, ck)
    _edit(ck, rope_parameters={S: {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    r = subprocess.run([sys.executable, "-m", "edgeseq", "export", str(ck), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0] and "yarn" in lines[0]
    assert not (tmp_path / "out").exists()
